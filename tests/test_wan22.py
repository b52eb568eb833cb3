"""Wan2.2 model folders: what hpcvideo does not use is refused by name before any work; the two experts of
T2V-A14B (tiny two-expert folder: hpcvideo/models/tiny_wan22.py) in both strategies."""

import functools
import json
import shutil

import pytest

from hpcvideo.models.support import REFUSED, refused
from tests.helpers import cli


def variant(tmp_path, source, name, *, index=None, transformer=None):
    """A copy of the model folder ``source`` (subfolders linked, not copied) whose model_index.json and
    transformer/config.json get the entries of ``index`` / ``transformer``."""
    folder = tmp_path / name
    folder.mkdir()
    for item in source.iterdir():
        if item.is_dir() and not (item.name == "transformer" and transformer):
            (folder / item.name).symlink_to(item, target_is_directory=True)
    model_index = json.loads((source / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**model_index, **(index or {})}))
    if transformer:
        shutil.copytree(source / "transformer", folder / "transformer")
        config = json.loads((folder / "transformer" / "config.json").read_text())
        (folder / "transformer" / "config.json").write_text(json.dumps({**config, **transformer}))
    return folder


# what a folder sets -> the name the refusal must give
UNSUPPORTED = {
    "vace": ({"vace_encoder": ["diffusers", "Something"]}, None, "vace_encoder"),
    "flf2v": (None, {"pos_embed_seq_len": 514}, "pos_embed_seq_len"),
    "pipeline": ({"_class_name": "WanVACEPipeline"}, None, "WanVACEPipeline"),
}


@pytest.mark.unit
def test_supported_folders_are_not_refused(tiny_model_dir, tiny_unet3d_dir):
    from hpcvideo.config import DEMO_WEIGHTS_DIR

    assert refused(tiny_model_dir, "wan") == [] and refused(DEMO_WEIGHTS_DIR, "wan") == []
    assert refused(tiny_unet3d_dir, "unet3d") == []


@pytest.mark.unit
@pytest.mark.parametrize("case", sorted(UNSUPPORTED))
def test_a_folder_naming_what_hpcvideo_does_not_use_is_refused_by_name(tmp_path, tiny_model_dir, case):
    index, transformer, name = UNSUPPORTED[case]
    folder = variant(tmp_path, tiny_model_dir, case, index=index, transformer=transformer)
    problems = refused(folder, "wan")
    assert len(problems) == 1 and name in problems[0] and "allowed" in problems[0], problems
    if name in REFUSED:
        assert REFUSED[name] in problems[0]  # says what it is


@pytest.mark.unit
@pytest.mark.parametrize("case", ["flf2v"])
def test_support_lands_by_leaving_the_one_list(tmp_path, tiny_model_dir, monkeypatch, case):
    """REFUSED is the one place: without the entry's name there, the same folder is no longer refused."""
    index, transformer, name = UNSUPPORTED[case]
    folder = variant(tmp_path, tiny_model_dir, case, index=index, transformer=transformer)
    monkeypatch.delitem(REFUSED, name)
    assert refused(folder, "wan") == []


@pytest.mark.e2e
@pytest.mark.parametrize("command", ["check", "plan", "generate"])
def test_refused_before_any_work(tmp_path, tiny_model_dir, command):
    """check, plan and generate (and so sbatch/submit, which run the same checks) exit 2 naming the entry,
    and nothing is created."""
    folder = variant(tmp_path, tiny_model_dir, "vace", index={"vace_encoder": ["diffusers", "Something"]})
    output = tmp_path / "run.zarr"
    result = cli(command, "tiny-test", "--set", f"model.path={folder}", "--output", output, check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "vace_encoder=" in result.stderr and "Traceback" not in result.stderr
    assert not output.exists()


# ------------------------------------------------------------------------------ Wan2.2 T2V-A14B: two experts


def a14b(*overrides, frames=None, output=None, preset="tiny-test", folder=None):
    from hpcvideo.config import load_config

    return load_config(preset, [f"model.path={folder}", *overrides], num_frames=frames, output=output)


@functools.lru_cache(maxsize=1)
def wan_pipeline(folder):
    import torch
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    assert pipe.transformer_2 is not None and pipe.config.boundary_ratio == 0.875  # both experts loaded
    pipe.set_progress_bar_config(disable=True)
    return pipe


def wan_pipeline_latents(folder, cfg, noise, num_frames):
    """WanPipeline's latents for ``cfg``'s first prompt from ``noise`` (1, C, F, h, w)."""
    pipe = wan_pipeline(folder)
    s = cfg.sampling
    return pipe(
        prompt=s.prompts[0].prompt, negative_prompt=s.negative_prompt, height=cfg.video.height, width=cfg.video.width,
        num_frames=num_frames, num_inference_steps=s.num_inference_steps, guidance_scale=s.guidance_scale,
        guidance_scale_2=s.guidance_scale_2, latents=noise.clone(), output_type="latent",
        max_sequence_length=s.max_sequence_length,
    ).frames


@pytest.mark.e2e
def test_a14b_one_block_equals_wan_pipeline(tmp_path, tiny_wan22_dir):
    """A one-block video of the two-expert model gives WanPipeline's latents bit for bit: timesteps 999, 900
    with ``transformer`` at guidance 5, then 750, 500 with ``transformer_2`` at guidance_scale_2 3."""
    import torch

    from hpcvideo.generate import generate
    from hpcvideo.models.experts import Experts
    from hpcvideo.models.wan import read_model_info
    from hpcvideo.noise import block_noise
    from hpcvideo.store import RunStore

    experts = Experts.of(read_model_info(tiny_wan22_dir))
    assert [experts.index(t) for t in (999, 900, 750, 500)] == [0, 0, 1, 1]
    cfg = a14b("strategy.block_latent_frames=3", "sampling.guidance_scale_2=3.0", frames=9,
               output=tmp_path / "one.zarr", folder=tiny_wan22_dir)
    assert cfg.num_blocks == 1
    generate(cfg, progress=False)
    ours = torch.from_numpy(RunStore.open(cfg.store.path).read_latents(0, 3)).permute(1, 0, 2, 3).unsqueeze(0)
    noise = block_noise(seed=cfg.sampling.seed, block_index=0, block_latent_frames=3,
                        context_latent_frames=cfg.strategy.context_latent_frames, latent_channels=ours.shape[1],
                        latent_height=ours.shape[3], latent_width=ours.shape[4])
    theirs = wan_pipeline_latents(tiny_wan22_dir, cfg, noise, 9)
    assert theirs.shape == ours.shape and torch.equal(ours, theirs)


@pytest.mark.e2e
def test_a14b_blocks_of_one_tick_use_the_expert_of_their_own_step(tmp_path, tiny_wan22_dir):
    """Without context frames the blocks of a DualParal video are independent: each must equal WanPipeline on its
    own noise, although at ticks 2 and 3 the blocks in flight take steps of different experts."""
    import torch

    from hpcvideo.generate import generate
    from hpcvideo.noise import block_noise
    from hpcvideo.store import RunStore

    cfg = a14b("strategy.context_latent_frames=0", "sampling.guidance_scale_2=3.0", output=tmp_path / "run.zarr",
               folder=tiny_wan22_dir)
    assert cfg.num_blocks == 4 and cfg.strategy.block_latent_frames == 2
    generate(cfg, progress=False)
    store = RunStore.open(cfg.store.path)
    for j in range(cfg.num_blocks):
        ours = torch.from_numpy(store.read_latents(2 * j, 2 * j + 2)).permute(1, 0, 2, 3).unsqueeze(0)
        noise = block_noise(seed=cfg.sampling.seed, block_index=j, block_latent_frames=2, context_latent_frames=0,
                            latent_channels=ours.shape[1], latent_height=ours.shape[3], latent_width=ours.shape[4])
        prompt = cfg.sampling.prompts[cfg.prompt_index_for_block(j)].prompt
        block_cfg = a14b("sampling.guidance_scale_2=3.0", f"sampling.prompt={prompt}", frames=5, output="x.zarr",
                         folder=tiny_wan22_dir)
        assert torch.equal(ours, wan_pipeline_latents(tiny_wan22_dir, block_cfg, noise, 5)), j


@pytest.mark.mpi
@pytest.mark.parametrize("name", ["dualparal", "videoinfinity"])
def test_a14b_on_two_ranks_equals_one_rank(tmp_path, tiny_wan22_dir, mpi_world, name):
    """Both strategies on 2 ranks (the session's 2-rank scenarios launch: tests/mpi/experts.py) equal 1 rank bit
    for bit. DualParal: each stage holds its 2 layers of both experts; at ticks 2 and 3 blocks of one tick use
    different experts. Video-Infinity: one clip per rank, every rank switches expert at the same step."""
    from tests.helpers import assert_same_run, store_arrays
    from tests.mpi.experts import RUNS

    preset, overrides = RUNS[name]
    one = tmp_path / "one.zarr"
    single = ["--set", "strategy.clip_latent_frames=8"] if name == "videoinfinity" else []  # one clip: the whole video
    cli("generate", preset, "--no-progress", "--output", one, "--set", f"model.path={tiny_wan22_dir}",
        *[a for o in overrides for a in ("--set", o)], *single)
    path = mpi_world(2)["experts"][name]
    assert_same_run(path, store_arrays(one))
    if name == "dualparal":
        from hpcvideo.store import RunStore

        assert [s["layers"] for s in RunStore.open(path).attrs["rank_stats"]] == [[0, 2], [2, 4]]


@pytest.mark.unit
def test_the_feature_cache_links_only_blocks_of_the_same_expert():
    """tiny-test's queue (4 blocks, 4 steps; steps 0-1 high noise, 2-3 low noise): a block appends the K/V of
    its newer neighbour only when both use the same expert; otherwise neither records nor appends."""
    from hpcvideo.strategies.dualparal.queue import num_ticks, tick_plan

    step_experts = (0, 0, 1, 1)
    mixed = 0
    for tick in range(num_ticks(4, 4)):
        kwargs = dict(num_blocks=4, num_inference_steps=4, context_latent_frames=1, feature_cache=True)
        plan, single = tick_plan(tick, step_experts=step_experts, **kwargs), tick_plan(tick, **kwargs)
        by_block = {w.block_index: w for w in plan}
        for work, one in zip(plan, single):
            newer = by_block.get(work.block_index + 1)
            same = newer is not None and step_experts[newer.step_index] == step_experts[work.step_index]
            assert work.append == (one.append and same)
            if newer is not None:
                assert newer.record == work.append  # recorded exactly when the older neighbour reads it
                mixed += not same
    assert mixed == 3  # one tick per adjacent pair of blocks, where one crosses the boundary a step before the other


@pytest.mark.e2e
def test_two_expert_folders_are_checked(tmp_path, tiny_model_dir, tiny_wan22_dir):
    from hpcvideo.models.wan import read_model_info

    info = read_model_info(tiny_wan22_dir)
    assert info["experts"] == ["transformer", "transformer_2"] and info["boundary_timestep"] == 875.0
    half = variant(tmp_path, tiny_wan22_dir, "half", index={"boundary_ratio": None})
    with pytest.raises(ValueError, match="sets transformer_2 without boundary_ratio"):
        read_model_info(half)
    result = cli("generate", "tiny-test", "--set", f"model.path={half}", "--output", tmp_path / "run.zarr", check=False)
    assert result.returncode == 2 and "without boundary_ratio" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run.zarr").exists()
    bad = variant(tmp_path, tiny_wan22_dir, "ratio", index={"boundary_ratio": 1.5})
    with pytest.raises(ValueError, match=r"boundary_ratio=1.5; allowed: a number in \(0, 1\]"):
        read_model_info(bad)


@pytest.mark.e2e
def test_guidance_scale_2_needs_two_experts(tmp_path):
    output = tmp_path / "run.zarr"
    result = cli("check", "tiny-test", "--set", "sampling.guidance_scale_2=3", "--output", output, check=False)
    assert result.returncode == 2 and "sampling.guidance_scale_2=3.0 needs a two-expert model" in result.stderr
    assert not output.exists()


@pytest.mark.unit
def test_plan_counts_the_stage_slice_of_both_experts(tiny_wan22_dir):
    """The plan's weights per rank equal the bytes of what each rank loads: its layers of both experts."""
    import torch

    from hpcvideo.models.family import FAMILIES
    from hpcvideo.plan import make_plan

    cfg = a14b(output="x.zarr", folder=tiny_wan22_dir)
    plan = make_plan(cfg, num_ranks=2)
    for rank in plan.ranks:
        loaded = 0
        for expert in ("transformer", "transformer_2"):
            stage = FAMILIES["wan"].load_stage(tiny_wan22_dir, range(*rank.layers), device="cpu", dtype=torch.float32,
                                               expert=expert)
            loaded += sum(t.numel() * t.element_size() for t in [*stage.parameters(), *stage.buffers()])
        assert rank.weights_bytes == loaded


def a14b_configs(folder):
    """A folder with the JSON configs (no weights) of Wan-AI/Wan2.2-T2V-A14B-Diffusers: what `plan` and `check` read."""
    transformer = {"_class_name": "WanTransformer3DModel", "added_kv_proj_dim": None, "attention_head_dim": 128,
                   "cross_attn_norm": True, "eps": 1e-06, "ffn_dim": 13824, "freq_dim": 256, "image_dim": None,
                   "in_channels": 16, "num_attention_heads": 40, "num_layers": 40, "out_channels": 16,
                   "patch_size": [1, 2, 2], "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 1024, "text_dim": 4096}
    files = {
        "model_index.json": {"_class_name": "WanPipeline", "_name_or_path": "Wan-AI/Wan2.2-T2V-A14B-Diffusers",
                             "boundary_ratio": 0.875, "transformer": ["diffusers", "WanTransformer3DModel"],
                             "transformer_2": ["diffusers", "WanTransformer3DModel"], "vae": ["diffusers", "AutoencoderKLWan"],
                             "text_encoder": ["transformers", "UMT5EncoderModel"],
                             "tokenizer": ["transformers", "T5TokenizerFast"],
                             "scheduler": ["diffusers", "UniPCMultistepScheduler"]},
        "transformer/config.json": transformer, "transformer_2/config.json": transformer,
        "vae/config.json": {"_class_name": "AutoencoderKLWan", "attn_scales": [], "base_dim": 96, "dim_mult": [1, 2, 4, 4],
                            "num_res_blocks": 2, "temperal_downsample": [False, True, True], "z_dim": 16},
        "text_encoder/config.json": {"architectures": ["UMT5EncoderModel"], "model_type": "umt5", "d_model": 4096,
                                     "d_ff": 10240, "d_kv": 64, "num_heads": 64, "num_layers": 24, "vocab_size": 256384,
                                     "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False},
        "scheduler/scheduler_config.json": {"_class_name": "UniPCMultistepScheduler", "num_train_timesteps": 1000,
                                            "prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": 3.0},
    }
    for name, content in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(json.dumps(content))
    (folder / "tokenizer").mkdir()
    return folder


@pytest.mark.e2e
def test_a14b_preset_plans_both_experts_on_its_gpus(tmp_path, monkeypatch):
    """The real A14B preset (its JSON configs, no weights): `plan` accepts it on its 8 GPUs (80 GB) with each stage
    holding 5 layers of both experts, and refuses one GPU naming the fewest that fit (2)."""
    import functools

    from hpcvideo import plan as plan_module
    from hpcvideo.config import load_config

    cfg = load_config("wan2.2-t2v-a14b", check_paths=False)
    assert (cfg.sampling.guidance_scale, cfg.sampling.guidance_scale_2, cfg.sampling.num_inference_steps) == (4.0, 3.0, 40)
    assert (cfg.cluster.nodes, cfg.cluster.gpus_per_node, cfg.cluster.gpu_mem_gb) == (1, 8, 80)
    folder = a14b_configs(tmp_path / "Wan2.2-T2V-A14B-Diffusers")
    monkeypatch.setattr(plan_module, "model_bytes", functools.lru_cache(plan_module.model_bytes))  # built once here
    plan = json.loads(cli("plan", "wan2.2-t2v-a14b", "--set", f"model.path={folder}", "--json").stdout)
    assert plan["num_ranks"] == 8 and [r["layers"] for r in plan["ranks"]][:2] == [[0, 5], [5, 10]]
    assert all(r["peak_bytes"] < 80 * 2**30 for r in plan["ranks"])
    # both experts: 5 of 40 layers of 2 x 14B parameters in bf16 (one expert would be half: 3.76 GiB)
    assert 7.5 * 2**30 < plan["ranks"][1]["weights_bytes"] < 7.6 * 2**30
    one = cli("plan", "wan2.2-t2v-a14b", "--set", f"model.path={folder}", "--ranks", 1, check=False)
    assert one.returncode == 2 and "would fit: 2 ranks" in one.stderr, one.stderr


@pytest.mark.e2e
def test_a_folder_of_another_model_class_is_a_user_error_not_a_traceback(tmp_path, tiny_model_dir):
    """A transformer of another class (or channels that fit no Wan pipeline) is exit 2 naming it, from generate too."""
    folder = variant(tmp_path, tiny_model_dir, "flux", transformer={"_class_name": "FluxTransformer2DModel"})
    output = tmp_path / "run.zarr"
    result = cli("generate", "tiny-test", "--set", f"model.path={folder}", "--output", output, check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "'FluxTransformer2DModel'" in result.stderr and "Traceback" not in result.stderr
    assert not output.exists()
