"""Tiny random-weight Wan2.2 TI2V model in diffusers format, built offline for CPU tests.

The layout of ``Wan-AI/Wan2.2-TI2V-5B-Diffusers`` at a toy size: ``model_index.json`` with
``expand_timesteps: true`` (per-token timesteps; an image, when given, replaces the first latent frame
and its tokens run at timestep 0), a 16x residual VAE with patch 2 (``is_residual``, ``patch_size`` 2,
12 pixel channels after patchify, 4x temporal), and a transformer whose in/out channels equal the VAE's
``z_dim``. ``WanPipeline.from_pretrained(folder)`` and ``WanImageToVideoPipeline.from_pretrained(folder)``
load it offline.

Sizes (``TINY_TI2V_VERSION``; change it whenever a number below changes): transformer as the tiny Wan2.1
(:mod:`hpcvideo.models.tiny`: patch (1, 2, 2), 4 layers, 2 heads x 12, text_dim 32) with in/out channels
8; VAE base_dim 4, decoder_base_dim 8, dim_mult [1, 2, 4, 4], num_res_blocks 1, z_dim 8 (a video of
H x W pixels has H/16 x W/16 latents); the tiny umT5 text encoder and word-level tokenizer; UniPC with
flow shift 5 (Wan2.2-TI2V-5B's).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

TINY_TI2V_VERSION = "v1"
TINY_TI2V_Z_DIM = 8
COMPLETE_MARKER = ".hpcvideo-complete"


def _text_parts(seed: int):
    from transformers import UMT5Config, UMT5EncoderModel

    from .tiny import _build_tokenizer

    tokenizer = _build_tokenizer()
    torch.manual_seed(seed)
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=2,
        relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ))
    return tokenizer, text_encoder


def build_tiny_ti2v(path, *, seed: int = 0) -> Path:
    """Build the tiny Wan2.2 TI2V model as a diffusers folder at ``path`` (deterministic for a ``seed``).
    Returns the folder's path; existing files in it are overwritten."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer, text_encoder = _text_parts(seed)
    z = TINY_TI2V_Z_DIM
    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=z, out_channels=z,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=4, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=1024,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKLWan(
        base_dim=4, decoder_base_dim=8, z_dim=z, dim_mult=[1, 2, 4, 4], num_res_blocks=1, attn_scales=[],
        temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12, patch_size=2,
        scale_factor_spatial=16, scale_factor_temporal=4,
        latents_mean=[round(0.1 * (i - z / 2), 4) for i in range(z)],
        latents_std=[round(1.0 + 0.25 * i, 4) for i in range(z)],
    )
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=5.0,
    )
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                       transformer=transformer, expand_timesteps=True)
    pipe.save_pretrained(path)
    return path


def _ensure(cache_dir: str | Path, name: str, build) -> Path:
    """``<cache_dir>/<name>``, built once by ``build(folder)`` (private temporary sibling, completion marker
    last, atomic rename; a loser of a race discards its copy)."""
    cache_dir = Path(cache_dir)
    final = cache_dir / name
    if (final / COMPLETE_MARKER).is_file():
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=cache_dir))
    try:
        os.chmod(tmp, 0o755)
        build(tmp)
        (tmp / COMPLETE_MARKER).write_text(f"{name}\n")
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / COMPLETE_MARKER).is_file():
                raise
        return final
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def ensure_tiny_ti2v(cache_dir: str | Path) -> Path:
    """The cached tiny TI2V folder ``<cache_dir>/tiny-wan22-ti2v-{TINY_TI2V_VERSION}-seed0``, built once."""
    return _ensure(cache_dir, f"tiny-wan22-ti2v-{TINY_TI2V_VERSION}-seed0", lambda folder: build_tiny_ti2v(folder))


def ensure_tiny_i2v(cache_dir: str | Path, *, image_encoder: bool = True) -> Path:
    """The cached tiny image-to-video folder (:func:`build_tiny_i2v`), built once:
    ``<cache_dir>/tiny-wan21-i2v-...`` with an image encoder, ``tiny-wan22-i2v-...`` without."""
    name = f"tiny-wan{'21' if image_encoder else '22'}-i2v-{TINY_I2V_VERSION}-seed0"
    return _ensure(cache_dir, name, lambda folder: build_tiny_i2v(folder, image_encoder=image_encoder))


TINY_I2V_VERSION = "v1"


def build_tiny_i2v(path, *, seed: int = 0, image_encoder: bool = True) -> Path:
    """Build a tiny Wan image-to-video model (``WanImageToVideoPipeline`` layout) at ``path``: the transformer
    takes the latents (4 channels) ++ the condition channels (4 mask + 4 image-latent channels) = 12 input
    channels and gives 4 (VAE as the tiny Wan2.1's with one residual block per level, so that it can encode);
    ``image_encoder=True`` adds a tiny CLIP vision encoder and its image processor
    (Wan2.1-I2V: the image's CLIP features, ``image_dim`` 16, reach every cross-attention through added K/V),
    ``False`` gives the Wan2.2-I2V layout (no image encoder; one expert). Text encoder, tokenizer and scheduler
    are the tiny Wan2.1's (:mod:`hpcvideo.models.tiny`). Deterministic for a ``seed``. Returns the folder."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanImageToVideoPipeline, WanTransformer3DModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    from .tiny import TINY_Z_DIM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer, text_encoder = _text_parts(seed)
    z = TINY_Z_DIM
    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=2 * z + 4, out_channels=z,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=4, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=1024, image_dim=16 if image_encoder else None, added_kv_proj_dim=24 if image_encoder else None,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKLWan(
        base_dim=4, z_dim=z, dim_mult=[1, 2, 4, 4], num_res_blocks=1, attn_scales=[],  # (0 cannot encode)
        temperal_downsample=[False, True, True],
        latents_mean=[round(0.25 * (i - z / 2), 4) for i in range(z)], latents_std=[round(1.0 + 0.5 * i, 4) for i in range(z)],
    )
    clip = processor = None
    if image_encoder:
        torch.manual_seed(seed)
        clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                                num_attention_heads=2, image_size=32, patch_size=8, projection_dim=16))
        processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=3.0,
    )
    pipe = WanImageToVideoPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                                   image_processor=processor, image_encoder=clip, transformer=transformer)
    pipe.save_pretrained(path)
    return path
