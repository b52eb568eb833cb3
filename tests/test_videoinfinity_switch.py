"""Video-Infinity's global/local switch as a share of the steps (``strategy.switch_fraction``), the query frame's
own tokens exempt from the global bias (``strategy.exempt_own_frame``), their config rules, and the identity of
run stores made before these keys existed (they resume with the former behaviour or are refused)."""

import math

import pytest
import torch

from hpcvideo.config import ConfigError, RunConfig, load_config
from hpcvideo.store import ConfigMismatchError, RunStore
from hpcvideo.strategies.videoinfinity.clips import ClipComm, ClipLayout, DualScope, global_frame_indices
from hpcvideo.strategies.videoinfinity.masks import global_steps, phase, switch_timestep_for
from hpcvideo.strategies.videoinfinity.reference import patched

pytestmark = pytest.mark.unit

# UniPC's timesteps of 12 steps on a flow-matching model with flow_shift 3 (the demo preset's schedule)
DEMO_TIMESTEPS = [999.0, 970.0, 937.0, 900.0, 857.0, 807.0, 750.0, 682.0, 600.0, 500.0, 376.0, 216.0]


def test_a_share_of_the_steps_becomes_a_timestep_threshold_that_holds_in_any_dtype():
    assert [global_steps(f, 12) for f in (0.0, 0.2, 0.25, 0.5, 1.0)] == [0, 2, 3, 6, 12]
    assert (global_steps(0.2, 30), global_steps(0.5, 4), global_steps(0.125, 4)) == (6, 2, 1)  # 0.5 step rounds up
    scope = lambda t: DualScope(switch_timestep=t)  # noqa: E731
    raw = [phase(scope(800.0), t) for t in DEMO_TIMESTEPS]
    assert raw.count("global") == 6  # raw t >= 800: half of the shifted schedule, not the paper's share
    for fraction, want in ((0.2, 2), (0.5, 6), (0.0, 0), (1.0, 12)):
        switch = switch_timestep_for(fraction, torch.tensor(DEMO_TIMESTEPS))
        for dtype in (torch.float32, torch.bfloat16):  # the timestep as a bf16 model would see it
            seen = [phase(scope(switch), float(torch.tensor(t).to(dtype))) for t in DEMO_TIMESTEPS]
            assert seen == ["global"] * want + ["local"] * (12 - want), (fraction, dtype)
    assert switch_timestep_for(0.2, DEMO_TIMESTEPS) == (970.0 + 937.0) / 2
    assert (switch_timestep_for(0.0, DEMO_TIMESTEPS), switch_timestep_for(1.0, DEMO_TIMESTEPS)) == (math.inf, -math.inf)
    with pytest.raises(ValueError, match="do not decrease strictly"):
        switch_timestep_for(0.2, [999.0, 999.0, 500.0])


def test_config_rules_of_the_switch():
    cfg = load_config("tiny-vi-wan", check_paths=False)
    assert (cfg.strategy.switch_fraction, cfg.strategy.exempt_own_frame) == (0.5, True)
    assert (RunConfig().strategy.switch_fraction, RunConfig().strategy.exempt_own_frame) == (0.2, True)
    for value in ("1.5", "-0.1"):
        with pytest.raises(ConfigError) as error:
            load_config("tiny-vi-wan", [f"strategy.switch_fraction={value}"], check_paths=False)
        assert error.value.errors == [f"strategy.switch_fraction={float(value)!r} is out of range; allowed: 0 to 1 "
                                      "(the share of the steps in the global phase), or null (switch at "
                                      "strategy.switch_timestep)"]
    with pytest.raises(ConfigError) as error:  # a raw timestep that would be ignored
        load_config("tiny-vi-wan", ["strategy.switch_timestep=500"], check_paths=False)
    assert error.value.errors == ["strategy.switch_timestep=500.0 takes effect only with strategy.switch_fraction=null "
                                  "(now 0.5); allowed: strategy.switch_fraction=null to switch at this raw timestep, "
                                  "or strategy.switch_timestep left at 800.0"]
    raw = load_config("tiny-vi-wan", ["strategy.switch_fraction=null", "strategy.switch_timestep=500"], check_paths=False)
    assert (raw.strategy.switch_fraction, raw.strategy.switch_timestep) == (None, 500.0)
    with pytest.raises(ConfigError, match="strategy.exempt_own_frame"):
        load_config("tiny-vi-wan", ["strategy.exempt_own_frame=maybe"], check_paths=False)


def _store(path, config: dict) -> RunStore:
    return RunStore.create(path, config=config, num_latent_frames=8, block_latent_frames=2, latent_channels=4,
                           latent_height=4, latent_width=4, height=32, width=32, fps=16.0, model_id="tiny")


def test_stores_made_before_the_switch_keys_resume_with_the_former_behaviour_or_are_refused(tmp_path):
    """A store's config lacks keys added after it was made: a Video-Infinity store then ran with the raw-timestep
    switch and the own frame lowered (tests/test_golden_hashes.py pins those bits), so it resumes with those
    settings and is refused, naming the keys, with the new defaults; a DualParal store compares with the defaults."""
    former = ["strategy.switch_fraction=null", "strategy.switch_timestep=500", "strategy.exempt_own_frame=false"]
    old = load_config("tiny-vi-wan", former, check_paths=False).to_dict()
    for key in ("switch_fraction", "exempt_own_frame"):
        del old["strategy"][key]
    store = _store(tmp_path / "vi.zarr", old)
    store.check_config(load_config("tiny-vi-wan", former, check_paths=False).to_dict(), ignore=("store",))
    with pytest.raises(ConfigMismatchError) as error:
        store.check_config(load_config("tiny-vi-wan", check_paths=False).to_dict(), ignore=("store",))
    assert sorted(error.value.diff) == [("strategy.exempt_own_frame", False, True), ("strategy.switch_fraction", None, 0.5),
                                        ("strategy.switch_timestep", 500.0, 800.0)]
    dualparal = RunConfig().to_dict()
    for key in ("switch_fraction", "exempt_own_frame"):
        del dualparal["strategy"][key]
    _store(tmp_path / "dp.zarr", dualparal).check_config(RunConfig().to_dict(), ignore=("store",))


@torch.no_grad()
def test_wan_dual_scope_attention_matches_a_dense_definition(tiny_model_dir):
    """One Wan self-attention with the patch (one rank, whole video) against softmax written out per query frame:
    keys = the global frames at the rotary positions just before the window, then the window at its true
    positions; bias on the favoured scope, and on the query frame's own tokens in the global phase when exempt."""
    from hpcvideo.models import load_wan
    from hpcvideo.models.wan import apply_rotary_emb

    model = load_wan(tiny_model_dir, parts=("transformer",)).transformer
    g = torch.Generator().manual_seed(3)
    T, L, G, bias = 6, 1, 2, 3.0
    latents, text = torch.randn(1, 4, T, 4, 4, generator=g), torch.randn(1, 16, 32, generator=g)
    attn = model.blocks[0].attn1
    seen = {}
    handle = attn.register_forward_hook(lambda m, args, kwargs, out: seen.update(x=args[0], out=out), with_kwargs=True)
    glob, previous = global_frame_indices(T, G), None
    try:
        for t, exempt in ((900.0, True), (900.0, False), (100.0, True)):
            scope = DualScope(local_frames=L, global_frames=G, switch_timestep=500.0, global_bias=bias,
                              exempt_own_frame=exempt)
            comm = ClipComm(ClipLayout(rank=0, world_size=1, clip_frames=T))
            with patched(model, "wan", comm=comm, scope=scope):
                model(latents, torch.tensor([t]), text, return_dict=False)
                state = model._video_infinity[0]
                x = seen["x"]  # (1, T * hw, D)
                hw = x.shape[1] // T
                q, k = (norm(proj(x)).unflatten(2, (attn.heads, -1)) for norm, proj in
                        ((attn.norm_q, attn.to_q), (attn.norm_k, attn.to_k)))
                v = attn.to_v(x).unflatten(2, (attn.heads, -1))
                frames = lambda y, fs: torch.cat([y[:, f * hw:(f + 1) * hw] for f in fs], dim=1)  # noqa: E731
                rows = []
                for f in range(T):
                    window = list(range(max(0, f - L), min(T, f + L + 1)))
                    # positions shifted by G' (len(glob)); the globals sit at window[0] - G' + i
                    qf = apply_rotary_emb(frames(q, [f]), *state.rotary((f + len(glob),)))
                    kg = apply_rotary_emb(frames(k, glob), *state.rotary(tuple(window[0] + i for i in range(len(glob)))))
                    kl = apply_rotary_emb(frames(k, window), *state.rotary(tuple(w + len(glob) for w in window)))
                    keys, values = torch.cat([kg, kl], dim=1), torch.cat([frames(v, glob), frames(v, window)], dim=1)
                    if t >= 500:  # global phase
                        per_frame = [bias] * len(glob) + [bias if (exempt and w == f) else 0.0 for w in window]
                    else:
                        per_frame = [0.0] * len(glob) + [bias] * len(window)
                    logits = torch.einsum("bqhd,bkhd->bhqk", qf, keys) / qf.shape[-1] ** 0.5
                    logits = logits + torch.tensor(per_frame).repeat_interleave(hw)
                    rows.append(torch.einsum("bhqk,bkhd->bqhd", logits.softmax(-1), values))
                want = attn.to_out[1](attn.to_out[0](torch.cat(rows, dim=1).flatten(2, 3)))
            torch.testing.assert_close(seen["out"], want, atol=1e-5, rtol=1e-5, msg=lambda m: f"t={t}, exempt={exempt}: {m}")
            if t >= 500 and not exempt:
                assert not torch.allclose(seen["out"], previous, atol=1e-4)  # the exemption changes the result
            previous = seen["out"]
    finally:
        handle.remove()
