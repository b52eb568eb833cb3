"""``hpcvideo plan`` against measured figures of the tiny presets: exact weight bytes per stage (both
dtypes), VAE and text encoder bytes, the queue state of the reference executor, and the bytes each
rank really sent in a 2-rank run; refusals that name what would fit, before anything is submitted."""

from __future__ import annotations

import pytest
import torch

from hpcvideo.config import ConfigError, load_config
from hpcvideo.models import encode_prompts, load_wan, load_wan_transformer_stage
from hpcvideo.noise import block_noise
from hpcvideo.plan import check_fits, format_plan, make_plan
from hpcvideo.schedulers import make_scheduler
from hpcvideo.store import RunStore
from hpcvideo.strategies.dualparal.pipeline import split_layers
from hpcvideo.strategies.dualparal.reference import DualParalReference
from tests.helpers import cli



def tensor_bytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_weight_bytes_per_stage_are_exact(tiny_model_dir, dtype):
    cfg = load_config("tiny-test", [f"model.dtype={dtype}"], check_paths=False)
    plan = make_plan(cfg, num_ranks=2)
    torch_dtype = getattr(torch, dtype)
    for rank, layers in zip(plan.ranks, split_layers(4, 2)):
        stage = load_wan_transformer_stage(tiny_model_dir, layers, dtype=torch_dtype)
        assert rank.layers == (layers.start, layers.stop)
        assert rank.weights_bytes == tensor_bytes(stage)
    parts = load_wan(tiny_model_dir, dtype=torch_dtype, parts=("vae", "text_encoder"))
    assert plan.ranks[0].vae_bytes == sum(p.numel() * p.element_size() for p in parts.vae.parameters())
    assert plan.ranks[0].text_encoder_bytes == sum(p.numel() * p.element_size() for p in parts.text_encoder.parameters())
    assert plan.ranks[1].vae_bytes == plan.ranks[1].text_encoder_bytes == 0


def test_queue_bytes_bound_the_reference_executors_state(tiny_model_dir):
    """Rank 0's queue (latents + UniPC state of every block in flight + the tail block), measured at
    every tick boundary of a run with more blocks than steps: the plan is its largest value."""
    cfg = load_config("tiny-test", num_frames=4 * (2 * 8 - 1) + 1, check_paths=False)  # 8 blocks, 4 steps
    s, st = cfg.sampling, cfg.strategy
    components = load_wan(tiny_model_dir, dtype=torch.float32)
    embeds, negative = encode_prompts(components, [p.prompt for p in s.prompts], negative_prompt=s.negative_prompt,
                                      max_sequence_length=s.max_sequence_length, device="cpu", dtype=torch.float32)
    shape = dict(latent_channels=4, latent_height=cfg.video.height // 8, latent_width=cfg.video.width // 8)
    executor = DualParalReference(
        transformer=components.transformer,
        scheduler_template=make_scheduler(s.scheduler, scheduler_config=components.scheduler_config,
                                          flow_shift=s.flow_shift, num_inference_steps=s.num_inference_steps),
        prompt_embeds=embeds, negative_prompt_embeds=negative, prompt_index_for_block=cfg.prompt_index_for_block,
        guidance_scale=s.guidance_scale, num_blocks=cfg.num_blocks, block_latent_frames=st.block_latent_frames,
        context_latent_frames=st.context_latent_frames, feature_cache=st.feature_cache,
        noise_fn=lambda j: block_noise(seed=s.seed, block_index=j, block_latent_frames=st.block_latent_frames,
                                       context_latent_frames=st.context_latent_frames, **shape),
    )

    def latent_bytes(obj) -> int:  # tensors of latent shape (the scalars of timestep lists are not queue memory)
        if torch.is_tensor(obj):
            return obj.numel() * obj.element_size() if obj.dim() > 1 else 0
        if isinstance(obj, dict):
            return sum(latent_bytes(v) for v in obj.values())
        if isinstance(obj, (list, tuple)):
            return sum(latent_bytes(v) for v in obj)
        return 0

    measured = []
    while not executor.done:
        executor.run_tick()
        measured.append(latent_bytes(executor.state_dict()))
    executor.close()
    assert max(measured) == make_plan(cfg, num_ranks=1).ranks[0].queue_bytes


@pytest.mark.e2e
@pytest.mark.mpi
def test_bytes_sent_per_rank_equal_the_pipelines_counters(two_rank_run):
    """The session's 2-rank tiny-test run (tests/conftest.py; test_pipeline.py checks its result)."""
    path = two_rank_run
    measured = {r["rank"]: r["bytes_sent"] for r in RunStore.open(path).attrs["rank_stats"]}
    plan = make_plan(load_config("tiny-test", check_paths=False), num_ranks=2)
    assert [r.sent_bytes_total for r in plan.ranks] == [measured[0], measured[1]]
    assert plan.ranks[0].sent_bytes_per_tick > 0 and plan.ranks[1].sent_bytes_per_tick > 0


def test_a_layout_that_does_not_fit_is_refused_naming_what_fits(tiny_model_dir):
    # 0.5 GiB CUDA context + 2.7 MiB: rank 0 needs 2.8 MiB alone, 2.6 MiB with 2 ranks (prompts of 16 tokens: the
    # text encoder's phase stays below the run's)
    cfg = load_config("tiny-cpu", ["cluster.gpu_mem_gb=0.5026", "sampling.max_sequence_length=16"], check_paths=False)
    one = make_plan(cfg, num_ranks=1)
    assert "does NOT fit" in format_plan(one, 0.5026)
    with pytest.raises(ConfigError) as error:
        check_fits(one, cfg)
    message = str(error.value)
    assert "cluster.gpu_mem_gb=0.5026 is too small" in message and "rank 0 needs" in message
    assert "would fit: 2 ranks" in message  # the VAE and half the blocks: fits on two
    check_fits(make_plan(cfg, num_ranks=2), cfg)  # no error


def test_submit_refuses_before_creating_or_submitting_anything(tmp_path, tiny_model_dir, monkeypatch):
    from hpcvideo.launch import slurm
    from hpcvideo.launch.slurm import submit

    def no_executor(*args, **kwargs):
        raise AssertionError("a layout that does not fit reached the submission")

    monkeypatch.setattr(slurm, "make_executor", no_executor)
    cfg = load_config("tiny-cpu", ["cluster.gpu_mem_gb=0.5026", "cluster.gpus_per_node=1", "sampling.max_sequence_length=16"],
                      output=tmp_path / "x.zarr")
    with pytest.raises(ConfigError, match="would fit"):
        submit(cfg)
    assert not (tmp_path / "x.zarr").exists() and not (tmp_path / "x.zarr.slurm").exists()


def test_plan_cli_prints_every_rank_and_time_per_tick(tiny_model_dir):
    result = cli("plan", "tiny-test", "--ranks", "3", "--tflops", "0.001")
    lines = result.stdout.splitlines()
    assert lines[0].startswith("tiny-wan-v2-seed0: 3 rank(s), 4 blocks, 7 ticks")
    assert [line.split()[0] for line in lines[2:5]] == ["0", "1", "2"]
    assert "time per tick at 0.001 TFLOP/s" in result.stdout


# --------------------------------------------------------------- phases, the text encoder's device, --json


@pytest.fixture(scope="module")
def wan13_folder(tmp_path_factory):
    """Wan2.1-T2V-1.3B's JSON configs (no weights): what `hpcvideo plan` reads of the real checkpoint."""
    from hpcvideo.models.arch import write_config_folder

    return write_config_folder(tmp_path_factory.mktemp("wan13") / "Wan2.1-T2V-1.3B-Diffusers")


def test_phases_are_not_added_and_the_encoder_on_the_cpu_levels_rank_0(wan13_folder):
    """The 1.3B preset on 4 GPUs: the umT5 encoder (10.6 GiB bf16) is freed before the run loads, so rank 0's
    peak is the larger of its two phases, not their sum; on the host it leaves rank 0's GPU within 1.3x of
    the other stages."""
    from hpcvideo.plan import model_bytes

    sizes = model_bytes(wan13_folder, "bfloat16", 512)
    plans = {device: make_plan(load_config("wan2.1-t2v-1.3b", [f"model.path={wan13_folder}",
                                                               f"model.text_encoder_device={device}"], check_paths=False),
                               model_bytes_cache=sizes) for device in ("rank", "cpu")}
    on_gpu, on_host = plans["rank"].ranks[0], plans["cpu"].ranks[0]
    encode = on_gpu.text_encoder_bytes + on_gpu.text_encoder_activations_bytes
    run = sum(on_gpu.phases()["run"]["device"].values())
    assert on_gpu.text_encoder_bytes > 10 * 2**30 and on_gpu.text_encoder_activations_bytes > 0
    assert on_gpu.peak_bytes == max(encode, run) == encode and on_gpu.peak_phase == "encode"
    assert on_host.peak_bytes == run and on_host.host_peak_bytes == encode and on_host.peak_phase == "run"
    others = max(r.peak_bytes for r in plans["cpu"].ranks[1:])
    assert on_host.peak_bytes <= 1.3 * others < on_gpu.peak_bytes


def test_text_encoder_device_is_checked(tmp_path):
    with pytest.raises(ConfigError, match=r"model.text_encoder_device='gpu'.*allowed.*'rank'.*'cpu'"):
        load_config("tiny-test", ["model.text_encoder_device=gpu"], check_paths=False)


def test_the_runner_encodes_where_the_option_says_and_frees_the_encoder():
    """hpcvideo.runner's encoding step: the text encoder loads on the CPU with model.text_encoder_device=cpu
    (on the rank's device otherwise) and nothing holds it once the embeddings are made."""
    import gc
    import weakref
    from types import SimpleNamespace

    from hpcvideo.runner import _encode_prompts

    class Family:
        def load(self, path, *, device, dtype, text):
            self.device, encoder = device, torch.nn.Linear(2, 2)
            self.alive = weakref.ref(encoder)
            return SimpleNamespace(text_encoder=encoder)

        def encode_prompts(self, components, cfg, *, dtype):
            return [components.text_encoder.weight.detach().clone()], None

    env = SimpleNamespace(is_main=True, world_size=1, device="meta")  # a device no encoder could load on here
    for option, expected in (("cpu", "cpu"), ("rank", "meta")):
        family = Family()
        cfg = load_config("tiny-test", [f"model.text_encoder_device={option}"], check_paths=False)
        gc.disable()  # the runner's own collection must free it
        try:
            embeds, negative = _encode_prompts(cfg, env, family, None, torch.float32)
            assert family.device == expected and family.alive() is None
        finally:
            gc.enable()
        assert embeds[0].device.type == "meta" and negative is None


def test_plan_json_gives_every_ranks_phases_and_peaks(tiny_model_dir):
    import json

    result = cli("plan", "tiny-test", "--ranks", "2", "--json", "--set", "model.text_encoder_device=cpu")
    plan = json.loads(result.stdout)
    assert [r["rank"] for r in plan["ranks"]] == [0, 1] and plan["text_encoder_device"] == "cpu"
    for rank in plan["ranks"]:
        phases = rank["phases"]
        assert rank["peak_bytes"] == max(sum(p["device"].values()) + sum(p["host"].values()) for p in phases.values())
        assert phases["run"]["device"]["weights"] == rank["weights_bytes"]
    assert list(plan["ranks"][0]["phases"]) == ["encode", "load", "run"] and list(plan["ranks"][1]["phases"]) == ["load", "run"]
    # while a stage loads, the pages of its tensors in the safetensors file are mapped: their bytes as stored
    from safetensors import safe_open

    with safe_open(str(tiny_model_dir / "transformer" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        stored = {k: f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys()}
    for rank, layers in zip(plan["ranks"], split_layers(4, 2)):
        own = sum(v for k, v in stored.items() if not k.startswith("blocks.") or int(k.split(".")[1]) in layers)
        assert rank["phases"]["load"]["host"]["checkpoint_pages"] == rank["checkpoint_bytes"] == own


# ----------------------------------------------------------------------------------------- Video-Infinity


@pytest.mark.parametrize("preset", ["tiny-vi-wan", "tiny-vi-unet3d"])
def test_videoinfinity_weight_bytes_are_those_of_the_loaded_model(preset, tiny_model_dir, tiny_unet3d_dir):
    from hpcvideo.models.family import family_of

    cfg = load_config(preset, check_paths=False)
    plan = make_plan(cfg, num_ranks=2)
    family = family_of(cfg)
    parts = family.load(family.path(cfg), device="cpu", dtype=torch.float32, denoiser=True, vae=True, text=True)
    assert [r.weights_bytes for r in plan.ranks] == [tensor_bytes(parts.model)] * 2
    vae = tensor_bytes(parts.vae)
    assert [r.vae_bytes for r in plan.ranks] == ([vae, 0] if preset == "tiny-vi-wan" else [vae, vae])  # causal / per frame
    assert plan.ranks[0].text_encoder_bytes == sum(p.numel() * p.element_size() for p in parts.text_encoder.parameters())
    assert [r.clip for r in plan.ranks] == [(0, plan.ranks[0].clip[1]), (plan.ranks[0].clip[1], 2 * plan.ranks[0].clip[1])]
    assert all(r.activations_bytes > 0 and r.queue_bytes > 0 for r in plan.ranks)
    if preset == "tiny-vi-unet3d":  # GroupNorm statistics travel too
        assert all(r.sent_bytes_per_tick_by_kind["sum"] > 0 for r in plan.ranks)


@pytest.mark.e2e
@pytest.mark.mpi
@pytest.mark.parametrize("ranks, name, args", [(4, "tiny-vi-wan", []), (2, "tiny-vi-wan-25-frames", ["--frames", "25"])])
def test_videoinfinity_bytes_sent_per_rank_equal_the_runs_counters(mpi_runs, ranks, name, args):
    """The session's Video-Infinity runs (tests/conftest.py; test_videoinfinity_run.py checks their results)."""
    run = mpi_runs(ranks)[name]
    assert run["returncode"] == 0, run["stderr"]
    measured = {r["rank"]: r["bytes_sent"] for r in RunStore.open(run["path"]).attrs["rank_stats"]}
    num_frames = int(args[1]) if args else None
    plan = make_plan(load_config("tiny-vi-wan", num_frames=num_frames, check_paths=False), num_ranks=ranks)
    assert [r.sent_bytes_total for r in plan.ranks] == [measured[r] for r in range(ranks)]
    assert all(r.sent_bytes_per_tick_by_kind["halo"] > 0 for r in plan.ranks)


@pytest.mark.mpi
def test_videoinfinity_unet3d_dry_run_receives_what_the_real_exchange_did(mpi_world, tiny_unet3d_dir):
    """The "vi_forward" scenario's rank 0 counters (tests/mpi/videoinfinity_forward.py: one UNet3D forward of
    a CFG batch on 2 ranks) against the meta-device dry run the plan makes of the same forward."""
    from diffusers import UNet3DConditionModel

    from hpcvideo.dryrun import meta_model, videoinfinity_forward
    from hpcvideo.strategies.videoinfinity.clips import ClipLayout
    from tests.mpi.videoinfinity_forward import DUAL, EXACT, NUM_FRAMES

    recorded = torch.load(mpi_world(2)["vi_forward"])["bytes_received_rank0"]
    unet = meta_model(UNet3DConditionModel, tiny_unet3d_dir / "unet", dtype=torch.float32)
    for name, scope in (("unet3d-exact", EXACT), ("unet3d-dual-early", DUAL)):
        dry = videoinfinity_forward(unet, "unet3d", layout=ClipLayout(rank=0, world_size=2, clip_frames=NUM_FRAMES // 2),
                                    scope=scope, latents_shape=(2, 4, NUM_FRAMES // 2, 8, 8), text_shape=(2, 77, 32),
                                    dtype=torch.float32)
        assert dry["bytes_received"] == recorded[name] > 0, name


def test_gpu_check_says_no_gpu_and_exits_0_on_a_cpu_machine(monkeypatch, capsys):
    """bench/gpu_check.py on this machine (in this process: torch is imported already)."""
    import importlib.util
    import json
    import sys
    from pathlib import Path

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: bench/gpu_check.py would measure it (minutes)")
    spec = importlib.util.spec_from_file_location("gpu_check", Path(__file__).parent.parent / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", ["gpu_check.py"])
    assert module.main() == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == {"gpu": None, "status": "no GPU"} and "no GPU" in err
