"""The runner in-process against a fake strategy and a fake model family (no weights, no subprocess):
checkpoint cadence, resume from a checkpoint after a failure, preemption at a tick boundary, the
extension snapshot and stale done markers. A third strategy is exactly this: an executor and a spec."""

import os
import signal

import numpy as np
import pytest
import torch

from hpcvideo.config import load_config
from hpcvideo.faults import FaultPlan
from hpcvideo.runner import run
from hpcvideo.runtime import init_rank_env, shutdown_rank_env
from hpcvideo.runtime.preempt import Preempted, StopRequest
from hpcvideo.store import RunStore
from hpcvideo.strategies.base import StrategySpec


class FakeFamily:
    name, vae_kind = "fake", "per_frame"

    def path(self, cfg):
        return cfg.store.path  # never read

    def info(self, path):
        return {"latent_channels": 2, "vae_scale_factor_spatial": 8, "vae_temporal_stride": 4, "model_id": "fake"}

    def load(self, path, **parts):
        return None

    def encode_prompts(self, components, cfg, *, dtype):
        return [torch.full((1, 1, 1), float(i)) for i in range(len(cfg.sampling.prompts))], None


class FakeExecutor:
    """A queue of ``num_units`` units, ``steps`` ticks each, one entering per tick (as DualParal's):
    unit j leaves after tick j + steps; the state is one number per unit in flight."""

    def __init__(self, num_units, steps, *, fail_at=None, stop_at=None):
        self.num_units, self.steps, self.tick = num_units, steps, 0
        self.num_ticks = num_units + steps - 1
        self.values = {}
        self.fail_at, self.stop_at, self.closed = fail_at, stop_at, False
        self.stats = {"fake": True}

    done = property(lambda self: self.tick >= self.num_ticks)
    extend_tick = property(lambda self: self.num_units)
    stale_from = property(lambda self: max(0, self.tick - self.steps + 1))

    def run_tick(self):
        if self.tick == self.fail_at:
            raise RuntimeError("injected")
        if self.tick == self.stop_at:
            os.kill(os.getpid(), signal.SIGUSR2)  # USR2 arrives during this tick (the test installed a stop request)
        if self.tick < self.num_units:
            self.values[self.tick] = torch.tensor([float(self.tick)])
        finished = []
        for j in sorted(self.values):
            self.values[j] = self.values[j] * 1.5 + self.tick
            if self.tick - j == self.steps - 1:
                finished.append((j, self.values.pop(j)))
        self.tick += 1
        return finished

    def drain(self):
        return []

    def state_dict(self):
        return {"tick": self.tick, "values": {j: v.clone() for j, v in self.values.items()}}

    def load_state_dict(self, state):
        self.tick, self.values = int(state["tick"]), dict(state["values"])

    def close(self):
        self.closed = True


class FakeSink:
    """Keeps the units; marks them done in the store (no data: nothing here reads it)."""

    decode_s = wait_s = write_s = 0.0

    def __init__(self, store):
        self.store, self.units = store, {}

    def submit(self, unit, latents):
        self.units[unit] = latents.clone()
        self.store.mark_done("latents", unit)
        self.store.mark_done("frames", unit)

    def flush(self):
        pass

    def finish(self):
        pass

    def close(self):
        pass

    def state_dict(self):
        return None

    def load_state_dict(self, state):
        pass


class FakeSpec(StrategySpec):
    name, title, every_rank_writes, extendable = "fake", "Fake", False, True

    def __init__(self, every_rank_writes=False, **executor_args):
        self.every_rank_writes = every_rank_writes  # True: the state is gathered from (scattered to) every rank
        self.executor_args, self.executor, self.sink = executor_args, None, None

    def unit_latent_frames(self, cfg):
        return cfg.strategy.block_latent_frames

    def problems(self, cfg, family, info, world_size):
        return []

    def build(self, ctx):
        self.executor = FakeExecutor(ctx.cfg.num_blocks, ctx.cfg.sampling.num_inference_steps, **self.executor_args)
        self.sink = FakeSink(ctx.store)
        return self.executor, self.sink


@pytest.fixture
def env():
    env = init_rank_env(device="cpu")
    yield env
    shutdown_rank_env(env)


def _cfg(path, *overrides):
    # tiny-test: 29 frames = 8 latent frames = 4 blocks of 2, 4 steps -> 7 ticks
    return load_config("tiny-test", [f"store.path={path}", *overrides], check_paths=False)


def _saves(monkeypatch):
    saves = []
    original = RunStore.save_state

    def record(self, blob, *, tick, num_blocks, kind="resume", **more):
        saves.append((kind, tick))
        return original(self, blob, tick=tick, num_blocks=num_blocks, kind=kind, **more)

    monkeypatch.setattr(RunStore, "save_state", record)
    return saves


def _whole(tmp_path, env):
    spec = FakeSpec()
    run(_cfg(tmp_path / "whole.zarr"), env, progress=False, spec=spec, family=FakeFamily())
    return spec.sink.units


def test_checkpoint_cadence_by_ticks_extension_snapshot_and_final(tmp_path, env, monkeypatch):
    saves = _saves(monkeypatch)
    spec = FakeSpec()
    status = run(_cfg(tmp_path / "run.zarr", "store.checkpoint_every_ticks=3"), env, progress=False, spec=spec,
                 family=FakeFamily())
    assert status["status"] == "complete" and spec.executor.closed and sorted(spec.sink.units) == [0, 1, 2, 3]
    # every 3 ticks from the start, the extension snapshot at tick num_blocks = 4, one after the last tick
    assert saves == [("resume", 3), ("extend", 4), ("resume", 6), ("resume", 7)]
    assert RunStore.open(tmp_path / "run.zarr").attrs["rank_stats"][0]["fake"] is True


def test_checkpoint_by_seconds(tmp_path, env, monkeypatch):
    saves = _saves(monkeypatch)
    run(_cfg(tmp_path / "run.zarr", "store.checkpoint_every_ticks=1000", "store.checkpoint_every_s=1e-9"), env,
        progress=False, spec=FakeSpec(), family=FakeFamily())
    assert [t for k, t in saves if k == "resume"] == [0, 1, 2, 3, 4, 5, 6, 7]  # due already at the first boundary


@pytest.mark.parametrize("every_rank_writes", [False, True])
def test_a_failed_run_resumes_from_its_checkpoint_and_equals_the_uninterrupted_one(tmp_path, env, monkeypatch,
                                                                                   every_rank_writes):
    whole = _whole(tmp_path, env)
    path = tmp_path / "run.zarr"
    cfg = _cfg(path, "store.checkpoint_every_ticks=2")
    with pytest.raises(RuntimeError, match="injected"):
        run(cfg, env, progress=False, spec=FakeSpec(every_rank_writes, fail_at=5), family=FakeFamily())
    store = RunStore.open(path)
    assert not store.status_dict()["complete"] and store.load_state("resume")[1]["tick"] == 4
    assert list(store.done("latents")) == [True, True, False, False]  # units 0, 1 left after ticks 3, 4
    RunStore.open(path, mode="r+").mark_done("latents", 2)  # in flight at tick 4, yet marked: must go on resume
    with pytest.raises(RuntimeError, match="injected"):  # resumes at tick 4, fails at once
        run(cfg, env, progress=False, spec=FakeSpec(every_rank_writes, fail_at=4), family=FakeFamily())
    # unit 1 left after the checkpoint (stale_from = 4 - 4 + 1 = 1): it will come again, so its marker went too
    assert list(RunStore.open(path).done("latents")) == [True, False, False, False]
    saves = _saves(monkeypatch)
    spec = FakeSpec(every_rank_writes)
    run(cfg, env, progress=False, spec=spec, family=FakeFamily())
    assert saves[0] == ("extend", 4)  # resumed at tick 4 = num_blocks: the extension snapshot again
    # units 0 and 1 left the queue before the checkpoint (tick 4, 4 steps): only 1.. come again
    assert sorted(spec.sink.units) == [1, 2, 3]
    for j, latents in spec.sink.units.items():
        assert torch.equal(latents, whole[j]), j


def test_a_preempted_run_stops_at_the_next_tick_boundary_with_a_checkpoint_there(tmp_path, env):
    whole = _whole(tmp_path, env)
    path = tmp_path / "run.zarr"
    cfg = _cfg(path, "store.checkpoint_every_ticks=1000")
    with StopRequest() as request, pytest.raises(Preempted) as stopped:
        run(cfg, env, progress=False, spec=FakeSpec(stop_at=2), family=FakeFamily(), stop=request)
    assert stopped.value.step == 3
    assert RunStore.open(path).status_dict()["last_checkpoint_tick"] == 3
    spec = FakeSpec()
    run(cfg, env, progress=False, spec=spec, family=FakeFamily())
    assert sorted(spec.sink.units) == [0, 1, 2, 3]  # stale_from(3) = 0: unit 0 leaves at tick 3 -> comes again
    assert all(np.array_equal(spec.sink.units[j].numpy(), whole[j].numpy()) for j in range(4))


def test_the_planned_fault_is_the_one_handed_down_and_fires_at_its_tick_on_its_rank(tmp_path, env, monkeypatch):
    monkeypatch.setenv("HPCVIDEO_FAULT", "raise:tick:1")  # read only when the caller hands no plan down
    path = tmp_path / "run.zarr"
    cfg = _cfg(path, "store.checkpoint_every_ticks=1")
    with pytest.raises(RuntimeError, match="injected fault at tick 3 on rank 0"):
        run(cfg, env, progress=False, spec=FakeSpec(), family=FakeFamily(), faults=FaultPlan.parse("raise:tick:3"))
    assert RunStore.open(path).load_state("resume")[1]["tick"] == 3  # the checkpoint of tick 3 came first
    other = tmp_path / "other.zarr"  # another rank's fault never fires on rank 0
    run(_cfg(other), env, progress=False, spec=FakeSpec(), family=FakeFamily(), faults=FaultPlan.parse("raise:tick:3@1"))
    assert RunStore.open(other).status_dict()["complete"]
    with pytest.raises(RuntimeError, match="injected fault at tick 1 on rank 0"):  # no plan: the environment's
        run(_cfg(tmp_path / "third.zarr"), env, progress=False, spec=FakeSpec(), family=FakeFamily())


def test_a_malformed_fault_names_the_variable_the_value_and_the_form():
    with pytest.raises(ValueError, match=r"HPCVIDEO_FAULT='tick:x': expected '\[raise:\]point:index\[@rank\]'"):
        FaultPlan.from_env({"HPCVIDEO_FAULT": "tick:x"})
    assert FaultPlan.from_env({}) == FaultPlan() == FaultPlan.parse("")  # unset or empty: nothing fires
    assert FaultPlan.parse("raise:frames:2@1") == FaultPlan(point="frames", index=2, rank=1, action="raise")


def test_the_config_allows_exactly_the_registered_families_strategies_and_dtypes():
    """The config schema lists allowed names without importing torch; the registries the runner uses
    must hold the same names."""
    from hpcvideo import config
    from hpcvideo.models.family import DTYPES, FAMILIES
    from hpcvideo.strategies import specs

    assert set(FAMILIES) == set(config.MODEL_FAMILIES)
    assert set(specs()) == set(config.STRATEGIES)
    assert tuple(DTYPES) == tuple(config.DTYPES)
