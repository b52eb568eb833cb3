"""Wan2.2 TI2V (per-token timesteps, 16x residual VAE with patch 2) and videos that start from an image.

A one-block (DualParal) or one-clip (Video-Infinity, exact mode) video of the tiny TI2V model equals diffusers'
``WanPipeline`` (text only, ``expand_timesteps``) and ``WanImageToVideoPipeline`` (with an image: first
latent frame = the image's latent, its tokens at timestep 0) bit for bit; longer videos agree between the
DualParal executors; a changed image is not resumed; an image on a text-only model is refused by name.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import cli, needs_mpiexec, store_arrays
from tests.helpers import MPI_RUNS, write_start_image

pytestmark = pytest.mark.e2e

HEIGHT = WIDTH = 64  # 4 x 4 latents (VAE 16x), 2 x 2 tokens per latent frame
STEPS, GUIDANCE, PROMPT = 3, 4.0, "a cat"
VI_EXACT = ["--set", "strategy.name=videoinfinity", "--set", "strategy.global_frames=0", "--set",
            "strategy.local_frames=8"]  # one clip, the whole video in the window: the unsplit model


@pytest.fixture(scope="module")
def ti2v_dir(hpcvideo_cache):
    from hpcvideo.models.tiny_cond import ensure_tiny_ti2v

    return ensure_tiny_ti2v(hpcvideo_cache)


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    return write_start_image(tmp_path_factory.mktemp("image") / "start.png")  # 48 x 80, resized to 64 x 64


def _args(model, *extra):
    return ["--set", f"model.path={model}", "--set", "model.dtype=float32", "--set", f"video.height={HEIGHT}",
            "--set", f"video.width={WIDTH}", "--set", f"sampling.num_inference_steps={STEPS}",
            "--set", f"sampling.guidance_scale={GUIDANCE}", "--set", "sampling.flow_shift=5.0",
            "--set", f"sampling.prompt={PROMPT}", "--set", "strategy.block_latent_frames=3",
            "--set", "strategy.context_latent_frames=1", "--no-progress", *extra]


def _pipeline_latents(model, noise, image):
    """diffusers' own pipeline on the same model, prompt embeddings and initial latents: (F, C, h, w)."""
    from diffusers import WanImageToVideoPipeline, WanPipeline
    from diffusers.utils import load_image

    from hpcvideo.config import load_config

    negative = load_config("tiny-test", check_paths=False).sampling.negative_prompt
    text = WanPipeline.from_pretrained(model, local_files_only=True)
    with torch.no_grad():  # as inside the pipelines' __call__
        embeds, negative_embeds = text.encode_prompt(prompt=PROMPT, negative_prompt=negative, max_sequence_length=512)
    if image is None:
        pipe, extra = text, {}
    else:  # (its prompt cleaning needs ftfy: the embeddings are passed instead)
        pipe, extra = WanImageToVideoPipeline.from_pretrained(model, local_files_only=True), {"image": load_image(str(image))}
    assert pipe.config.expand_timesteps
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt_embeds=embeds, negative_prompt_embeds=negative_embeds, height=HEIGHT, width=WIDTH, num_frames=9,
               num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=noise.clone(), output_type="latent", **extra)
    return out.frames[0].permute(1, 0, 2, 3).numpy(), pipe.vae


@pytest.mark.parametrize("strategy, with_image", [("dualparal", False), ("dualparal", True), ("videoinfinity", True)],
                         ids=["dualparal-text", "dualparal-image", "videoinfinity-image"])
def test_one_block_equals_the_diffusers_pipeline(tmp_path, ti2v_dir, image_file, strategy, with_image):
    from hpcvideo.decode import decode_latents, onednn_convolutions, to_uint8
    from hpcvideo.noise import block_noise, frame_noise

    extra = (["--image", str(image_file)] if with_image else []) + (VI_EXACT if strategy == "videoinfinity" else [])
    out = tmp_path / "run.zarr"
    cli("generate", "tiny-test", "--output", out, "--frames", "9", *_args(ti2v_dir, *extra))
    latents, frames = store_arrays(out)
    shape = dict(latent_channels=latents.shape[1], latent_height=HEIGHT // 16, latent_width=WIDTH // 16)
    if strategy == "dualparal":
        noise = block_noise(seed=0, block_index=0, block_latent_frames=3, context_latent_frames=1, **shape)
    else:
        noise = frame_noise(seed=0, start=0, stop=3, **shape)
    expected, vae = _pipeline_latents(ti2v_dir, noise, image_file if with_image else None)
    assert latents.shape == expected.shape == (3, 8, 4, 4)
    assert np.array_equal(latents, expected)
    # the frames: the streaming decode of the 16x residual VAE equals vae.decode of the whole video (with the
    # convolution kernel the run decodes with: oneDNN on CPU, hpcvideo.decode)
    with onednn_convolutions(vae):
        video = decode_latents(vae, torch.from_numpy(expected).permute(1, 0, 2, 3).unsqueeze(0))
    assert np.array_equal(frames, to_uint8(video))


@pytest.fixture(scope="module")
def long_ti2v_run(tmp_path_factory, ti2v_dir, image_file):
    """(argv, latents) of a 3-block TI2V run started from the image, on one rank in this process."""
    out = tmp_path_factory.mktemp("long-ti2v") / "run.zarr"
    argv = _args(ti2v_dir, "--image", str(image_file))
    cli("generate", "tiny-test", "--output", out, "--frames", "33", *argv)  # 9 latent frames = 3 blocks
    return argv, store_arrays(out)[0], out


def test_a_longer_video_agrees_between_the_dualparal_executors(long_ti2v_run, ti2v_dir, image_file):
    """Three blocks with context and feature cache, started from an image: the run (the pipeline executor)
    equals the single-process reference executor; the first latent frame is the image's latent."""
    from hpcvideo.conditioning import encode_image, frame_condition
    from hpcvideo.config import load_config
    from hpcvideo.models.family import family_of
    from hpcvideo.noise import block_noise
    from hpcvideo.strategies.dualparal.reference import DualParalReference

    argv, latents, _ = long_ti2v_run
    overrides = [a for a in argv[1::2] if "=" in a] + [f"condition.image={image_file}"]
    cfg = load_config("tiny-test", overrides, num_frames=33, check_paths=False)
    family = family_of(cfg)
    info = family.info(ti2v_dir)
    components = family.load(ti2v_dir, device="cpu", dtype=torch.float32, denoiser=True, vae=True, text=True)
    embeds, negative = family.encode_prompts(components, cfg, dtype=torch.float32)
    condition = frame_condition(cfg, info, components.vae, "cpu")
    reference = DualParalReference(
        transformer=components.model, scheduler_template=family.make_scheduler(cfg, components.scheduler_config, "cpu"),
        prompt_embeds=embeds, negative_prompt_embeds=negative, prompt_index_for_block=cfg.prompt_index_for_block,
        guidance_scale=GUIDANCE, num_blocks=3, block_latent_frames=3, context_latent_frames=1, feature_cache=True,
        noise_fn=lambda j: block_noise(seed=0, block_index=j, block_latent_frames=3, context_latent_frames=1,
                                       latent_channels=8, latent_height=4, latent_width=4),
        expand_timesteps=True, condition=condition,
    )
    blocks = {}
    while not reference.done:
        blocks.update(reference.run_tick())
    reference.close()
    expected = torch.cat([blocks[j] for j in range(3)], dim=2)[0].permute(1, 0, 2, 3).numpy()
    assert np.array_equal(latents, expected)
    image_latent = encode_image(components.vae, image_file, height=HEIGHT, width=WIDTH, device="cpu")
    assert np.array_equal(latents[0], image_latent[0, :, 0].numpy())


@needs_mpiexec
@pytest.mark.mpi
def test_two_ranks_equal_one_rank(long_ti2v_run, image_file, mpi_runs):
    """Per-token timesteps and the image latent across two pipeline stages: the same bits as one rank (the 2-rank
    run: the session's 2-rank launch, tests/conftest.py; its image written by the same write_start_image)."""
    from pathlib import Path

    from hpcvideo.store import RunStore

    argv, latents, _ = long_ti2v_run
    name = "tiny-ti2v-image-33-frames"
    assert MPI_RUNS[2][name] == ["tiny-test", "--frames", "33", *_args("{ti2v}", "--image", "{image}")]
    run = mpi_runs(2)[name]
    assert run["returncode"] == 0, run["stderr"]
    image = RunStore.open(run["path"]).config["condition"]["image"]
    assert Path(image).read_bytes() == image_file.read_bytes()
    assert np.array_equal(store_arrays(run["path"])[0], latents)


@pytest.mark.parametrize("timesteps", ["per-token", "per-sample"])
def test_continue_a_video_from_a_store(tmp_path, long_ti2v_run, ti2v_dir, timesteps):
    """``--init-store``: block 0 reads the VAE latents of the earlier video's last frames as its context (clean
    at timestep 0 for a per-token model; re-noised one step ahead of block 0 otherwise): the run equals the
    reference executor given those latents, encoded here from the store's frames."""
    import json
    import shutil

    from hpcvideo.config import RunConfig
    from hpcvideo.continuation import InitContext, encode_frames
    from hpcvideo.models.family import family_of
    from hpcvideo.noise import block_noise
    from hpcvideo.store import RunStore
    from hpcvideo.strategies.dualparal.reference import DualParalReference

    _, _, previous = long_ti2v_run
    model = ti2v_dir
    if timesteps == "per-sample":  # the same weights as a text-to-video model (one timestep per forward)
        model = shutil.copytree(ti2v_dir, tmp_path / "t2v")
        index = json.loads((model / "model_index.json").read_text())
        (model / "model_index.json").write_text(json.dumps({**index, "expand_timesteps": False}))
    out = tmp_path / "next.zarr"
    cli("generate", "tiny-test", "--output", out, "--frames", "21", *_args(model, "--init-store", str(previous)))
    latents, _ = store_arrays(out)
    cfg = RunConfig.from_dict(RunStore.open(out).attrs["config"])
    assert cfg.condition.init_sha256 and cfg.condition.init_store == str(previous)

    family = family_of(cfg)
    components = family.load(model, device="cpu", dtype=torch.float32, denoiser=True, vae=True, text=True)
    embeds, negative = family.encode_prompts(components, cfg, dtype=torch.float32)
    template = family.make_scheduler(cfg, components.scheduler_config, "cpu")
    last = RunStore.open(previous).read_frames(32, 33)  # context 1 latent frame = the last pixel frame
    context = InitContext(encode_frames(components.vae, last, height=HEIGHT, width=WIDTH, device="cpu"),
                          sigmas=template.sigmas, seed=0, clean=timesteps == "per-token")
    reference = DualParalReference(
        transformer=components.model, scheduler_template=template, prompt_embeds=embeds, negative_prompt_embeds=negative,
        prompt_index_for_block=cfg.prompt_index_for_block, guidance_scale=GUIDANCE, num_blocks=2, block_latent_frames=3,
        context_latent_frames=1, feature_cache=True, expand_timesteps=timesteps == "per-token",
        noise_fn=lambda j: block_noise(seed=0, block_index=j, block_latent_frames=3, context_latent_frames=1,
                                       latent_channels=8, latent_height=4, latent_width=4),
        initial_context=True, init_context=context,
    )
    blocks = {}
    while not reference.done:
        blocks.update(reference.run_tick())
    reference.close()
    assert np.array_equal(latents, torch.cat([blocks[0], blocks[1]], dim=2)[0].permute(1, 0, 2, 3).numpy())
    plain = tmp_path / "plain.zarr"  # the same run without the earlier video differs
    cli("generate", "tiny-test", "--output", plain, "--frames", "21", *_args(model))
    assert not np.array_equal(store_arrays(plain)[0], latents)


def test_continue_a_video_file(tmp_path, long_ti2v_run, ti2v_dir):
    """``--init-video`` reads an mp4 (PyAV; the frames after compression); bad inputs are refused by name."""
    _, _, previous = long_ti2v_run
    video = tmp_path / "previous.mp4"
    cli("export", previous, video)
    cli("generate", "tiny-test", "--output", tmp_path / "a.zarr", "--frames", "9", *_args(ti2v_dir, "--init-video", str(video)))
    assert store_arrays(tmp_path / "a.zarr")[0].shape == (3, 8, 4, 4)
    both = cli("generate", "tiny-test", "--output", tmp_path / "b.zarr", *_args(ti2v_dir, "--init-video", str(video),
               "--init-store", str(previous)), check=False)
    assert both.returncode == 2 and "condition.init_video=" in both.stderr and "condition.init_store=" in both.stderr
    missing = cli("generate", "tiny-test", "--output", tmp_path / "c.zarr", "--init-store", str(tmp_path / "no.zarr"),
                  check=False)
    assert missing.returncode == 2 and "is not a run store" in missing.stderr
    decode_only = cli("generate", "tiny-test", "--output", tmp_path / "e.zarr", "--init-store", str(previous), check=False)
    assert decode_only.returncode == 2 and "cannot encode" in decode_only.stderr, decode_only.stderr
    vi = cli("generate", "tiny-test", "--output", tmp_path / "d.zarr", *_args(ti2v_dir, "--init-video", str(video)),
             *VI_EXACT, check=False)
    assert vi.returncode == 2 and "needs DualParal" in vi.stderr
    assert not any((tmp_path / n).exists() for n in ("b.zarr", "c.zarr", "d.zarr", "e.zarr"))


def test_a_changed_image_is_not_resumed_and_bad_images_are_refused(tmp_path, ti2v_dir, tiny_model_dir, image_file):
    from PIL import Image

    image = tmp_path / "start.png"
    image.write_bytes(image_file.read_bytes())
    out = tmp_path / "run.zarr"
    cli("generate", "tiny-test", "--output", out, "--frames", "9", *_args(ti2v_dir, "--image", str(image)))
    Image.fromarray(np.zeros((48, 80, 3), np.uint8)).save(image)  # same path, other pixels
    again = cli("generate", "tiny-test", "--output", out, "--frames", "9", *_args(ti2v_dir, "--image", str(image)),
                check=False)
    assert again.returncode == 2 and "condition.image_sha256" in again.stderr, again.stderr

    missing = cli("generate", "tiny-test", "--output", tmp_path / "b.zarr", "--image", str(tmp_path / "nope.png"),
                  check=False)
    assert missing.returncode == 2 and "condition.image=" in missing.stderr and "does not exist" in missing.stderr
    assert "Traceback" not in missing.stderr
    text_only = cli("generate", "tiny-test", "--output", tmp_path / "c.zarr", "--image", str(image), check=False)
    assert text_only.returncode == 2 and "condition.image=" in text_only.stderr, text_only.stderr
    assert "does not take an image" in text_only.stderr
    assert not (tmp_path / "c.zarr").exists()


@pytest.fixture(scope="module")
def i2v_dirs(hpcvideo_cache):
    """Tiny image-to-video folders: {"wan2.1": with a CLIP image encoder, "wan2.2": without}."""
    from hpcvideo.models.tiny_cond import ensure_tiny_i2v

    return {"wan2.1": ensure_tiny_i2v(hpcvideo_cache, image_encoder=True),
            "wan2.2": ensure_tiny_i2v(hpcvideo_cache, image_encoder=False)}


@pytest.mark.parametrize("layout", ["wan2.1", "wan2.2"])
def test_image_to_video_checkpoints_equal_the_i2v_pipeline(tmp_path, i2v_dirs, image_file, layout):
    """One block of an image-to-video checkpoint (mask + image-latent channels; Wan2.1: CLIP image tokens in
    every cross-attention) equals WanImageToVideoPipeline bit for bit."""
    from diffusers import WanImageToVideoPipeline, WanPipeline
    from diffusers.utils import load_image

    from hpcvideo.config import load_config
    from hpcvideo.noise import block_noise

    model = i2v_dirs[layout]
    argv = ["--set", f"model.path={model}", "--set", "model.dtype=float32", "--set", "video.height=64", "--set",
            "video.width=64", "--set", f"sampling.num_inference_steps={STEPS}", "--set", f"sampling.guidance_scale={GUIDANCE}",
            "--set", f"sampling.prompt={PROMPT}", "--set", "sampling.max_sequence_length=512", "--set",
            "strategy.block_latent_frames=3", "--set", "strategy.context_latent_frames=1", "--image", str(image_file),
            "--no-progress"]
    cli("generate", "tiny-test", "--output", tmp_path / "one.zarr", "--frames", "9", *argv)
    latents, _ = store_arrays(tmp_path / "one.zarr")
    noise = block_noise(seed=0, block_index=0, block_latent_frames=3, context_latent_frames=1, latent_channels=4,
                        latent_height=8, latent_width=8)
    negative = load_config("tiny-test", check_paths=False).sampling.negative_prompt
    with torch.no_grad():
        embeds, negative_embeds = WanPipeline.from_pretrained(model, local_files_only=True).encode_prompt(
            prompt=PROMPT, negative_prompt=negative, max_sequence_length=512)
    pipe = WanImageToVideoPipeline.from_pretrained(model, local_files_only=True)
    assert (pipe.image_encoder is not None) == (layout == "wan2.1") and not pipe.config.expand_timesteps
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(image=load_image(str(image_file)), prompt_embeds=embeds, negative_prompt_embeds=negative_embeds,
                    height=64, width=64, num_frames=9, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                    latents=noise.clone(), output_type="latent").frames[0].permute(1, 0, 2, 3).numpy()
    assert np.array_equal(latents, expected)


def test_image_to_video_checkpoints_refuse_what_they_cannot_run(tmp_path, i2v_dirs, image_file):
    model = ["--set", f"model.path={i2v_dirs['wan2.1']}"]
    no_image = cli("generate", "tiny-test", "--output", tmp_path / "a.zarr", *model,
                   "--set", "sampling.max_sequence_length=24", check=False)
    assert no_image.returncode == 2 and "condition.image=None" in no_image.stderr, no_image.stderr
    assert "sampling.max_sequence_length=24" in no_image.stderr  # the image tokens go before 512 text tokens
    vi = cli("generate", "tiny-test", "--output", tmp_path / "b.zarr", *model, "--image", str(image_file),
             *VI_EXACT, check=False)
    assert vi.returncode == 2 and "DualParal only" in vi.stderr, vi.stderr
    import json
    import shutil

    flf2v = shutil.copytree(i2v_dirs["wan2.1"], tmp_path / "flf2v")  # first-last-frame: two images, refused
    config = json.loads((flf2v / "transformer" / "config.json").read_text())
    (flf2v / "transformer" / "config.json").write_text(json.dumps({**config, "pos_embed_seq_len": 34}))
    two = cli("generate", "tiny-test", "--output", tmp_path / "c.zarr", "--set", f"model.path={flf2v}", "--image",
              str(image_file), check=False)
    assert two.returncode == 2 and "first-last-frame" in two.stderr, two.stderr
    assert not any((tmp_path / name).exists() for name in ("a.zarr", "b.zarr", "c.zarr"))


def _ti2v_5b_configs(path):
    """A folder with the JSON configs of Wan-AI/Wan2.2-TI2V-5B-Diffusers and no weights (``plan`` and ``check``
    read only the configs). The VAE's latents_mean/std are placeholders (they do not change any size)."""
    import json

    def write(rel, data):
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_text(json.dumps(data))

    write("model_index.json", {"_class_name": "WanPipeline", "_name_or_path": "Wan-AI/Wan2.2-TI2V-5B-Diffusers",
                               "boundary_ratio": None, "expand_timesteps": True,
                               "scheduler": ["diffusers", "UniPCMultistepScheduler"],
                               "text_encoder": ["transformers", "UMT5EncoderModel"],
                               "tokenizer": ["transformers", "T5TokenizerFast"], "transformer": ["diffusers",
                               "WanTransformer3DModel"], "transformer_2": [None, None],
                               "vae": ["diffusers", "AutoencoderKLWan"]})
    write("transformer/config.json", {
        "_class_name": "WanTransformer3DModel", "added_kv_proj_dim": None, "attention_head_dim": 128,
        "cross_attn_norm": True, "eps": 1e-06, "ffn_dim": 14336, "freq_dim": 256, "image_dim": None, "in_channels": 48,
        "num_attention_heads": 24, "num_layers": 30, "out_channels": 48, "patch_size": [1, 2, 2],
        "pos_embed_seq_len": None, "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 1024, "text_dim": 4096})
    write("vae/config.json", {
        "_class_name": "AutoencoderKLWan", "attn_scales": [], "base_dim": 160, "decoder_base_dim": 256,
        "dim_mult": [1, 2, 4, 4], "dropout": 0.0, "in_channels": 12, "is_residual": True, "num_res_blocks": 2,
        "out_channels": 12, "patch_size": 2, "scale_factor_spatial": 16, "scale_factor_temporal": 4,
        "temperal_downsample": [False, True, True], "z_dim": 48, "latents_mean": [0.0] * 48, "latents_std": [1.0] * 48})
    write("text_encoder/config.json", {
        "architectures": ["UMT5EncoderModel"], "d_ff": 10240, "d_kv": 64, "d_model": 4096, "feed_forward_proj":
        "gated-gelu", "model_type": "umt5", "num_heads": 64, "num_layers": 24, "relative_attention_max_distance": 128,
        "relative_attention_num_buckets": 32, "tie_word_embeddings": False, "vocab_size": 256384})
    write("scheduler/scheduler_config.json", {"_class_name": "UniPCMultistepScheduler", "flow_shift": 5.0,
                                              "prediction_type": "flow_prediction", "use_flow_sigmas": True,
                                              "num_train_timesteps": 1000})
    (path / "tokenizer").mkdir()
    return path


def test_the_ti2v_5b_preset_plans_on_its_gpus(tmp_path):
    """The preset on the real model's sizes: 5.0e9 transformer parameters, a 16x VAE with 48 channels, and a
    plan that fits 80 GB GPUs on the preset's 4 ranks (and on 1)."""
    import json

    folder = _ti2v_5b_configs(tmp_path / "Wan2.2-TI2V-5B-Diffusers")
    base = ["--set", f"model.path={folder}", "--set", "cluster.gpu_mem_gb=80", "--json"]
    plan = json.loads(cli("plan", "wan2.2-ti2v-5b", *base).stdout)
    assert plan["model_id"] == "Wan-AI/Wan2.2-TI2V-5B-Diffusers" and plan["num_ranks"] == 4
    assert plan["num_blocks"] == 45 and plan["tokens_per_block_forward"] == 10 * 22 * 40
    assert all(r["peak_bytes"] < 20 * 2**30 for r in plan["ranks"])
    one = json.loads(cli("plan", "wan2.2-ti2v-5b", *base, "--ranks", "1").stdout)["ranks"][0]
    assert 5.0e9 * 2 < one["weights_bytes"] < 5.05e9 * 2  # 5.0e9 parameters in bfloat16 (a few float32 norms)
    assert 7.0e8 * 4 < one["vae_bytes"] < 7.1e8 * 4  # the 48-channel residual VAE, float32
    assert one["peak_bytes"] < 30 * 2**30
    assert cli("check", "wan2.2-ti2v-5b", "--set", f"model.path={folder}", "--output", tmp_path / "x.zarr").returncode == 0
