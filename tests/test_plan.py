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
    cfg = load_config("tiny-cpu", ["cluster.gpu_mem_gb=0.5026"], check_paths=False)  # 0.5 GiB CUDA context + 2.7 MiB: rank 0 needs 2.8 MiB alone, 2.6 MiB with 2 ranks
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
    cfg = load_config("tiny-cpu", ["cluster.gpu_mem_gb=0.5026", "cluster.gpus_per_node=1"], output=tmp_path / "x.zarr")
    with pytest.raises(ConfigError, match="would fit"):
        submit(cfg)
    assert not (tmp_path / "x.zarr").exists() and not (tmp_path / "x.zarr.slurm").exists()


def test_plan_cli_prints_every_rank_and_time_per_tick(tiny_model_dir):
    result = cli("plan", "tiny-test", "--ranks", "3", "--tflops", "0.001")
    lines = result.stdout.splitlines()
    assert lines[0].startswith("tiny-wan-v2-seed0: 3 rank(s), 4 blocks, 7 ticks")
    assert [line.split()[0] for line in lines[2:5]] == ["0", "1", "2"]
    assert "time per tick at 0.001 TFLOP/s" in result.stdout
