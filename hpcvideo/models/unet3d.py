"""UNet3D text-to-video models (ModelScope / Zeroscope / VideoCrafter2 conversions) from a local
diffusers folder, and a tiny random-weight one for CPU tests.

Expected layout (as ``TextToVideoSDPipeline.save_pretrained`` writes it, e.g. a download of
``cerspense/zeroscope_v2_576w`` or ``ali-vilab/text-to-video-ms-1.7b``)::

    model_index.json
    unet/          UNet3DConditionModel   (config.json + safetensors)
    vae/           AutoencoderKL          (per-frame 2-D VAE: num_latent_frames == num_frames)
    text_encoder/  CLIPTextModel
    tokenizer/     any tokenizer AutoTokenizer loads (CLIPTokenizer for the real models)
    scheduler/     scheduler_config.json  (DDIM-style, epsilon prediction)

Nothing touches the network (``local_files_only=True``).

Tiny preset (``TINY_UNET3D_VERSION = "v1"``; bump it when a number changes): UNet3D with blocks
(CrossAttnDown, Down) / (Up, CrossAttnUp), channels (8, 16), 1 layer per block, GroupNorm 4 groups,
2 heads, cross-attention dim 32; AutoencoderKL 4 levels of 8 channels (8x spatial), 4 latent
channels; CLIP text model hidden 32, 2 layers, 2 heads, 77 positions; the word-level tokenizer of
:mod:`.tiny`; DDIMScheduler with Zeroscope's settings. Every parameter that diffusers initialises to
zero (e.g. the last conv of each TemporalConvLayer, which makes it an identity) is redrawn at random,
so tests see every layer act.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config.schema import ConfigError

TINY_UNET3D_VERSION = "v1"
_COMPLETE = ".hpcvideo-complete"
PARTS = ("unet", "vae", "text_encoder", "tokenizer")


def build_tiny_unet3d(path, *, seed: int = 0) -> Path:
    """Build the tiny UNet3D text-to-video model as a diffusers folder at ``path``. Deterministic."""
    from diffusers import AutoencoderKL, DDIMScheduler, TextToVideoSDPipeline, UNet3DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from .tiny import _build_tokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_tokenizer()
    tokenizer.model_max_length = 77

    torch.manual_seed(seed)
    unet = UNet3DConditionModel(
        sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"), up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, cross_attention_dim=32,
        attention_head_dim=2,
    )
    with torch.no_grad():
        for parameter in unet.parameters():
            if not parameter.any():
                parameter.normal_(0.0, 0.1)

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=64,
    )

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, pad_token_id=0, bos_token_id=1, eos_token_id=1,
    ))
    scheduler = DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
    )
    TextToVideoSDPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                          scheduler=scheduler).save_pretrained(path)
    return path


def ensure_tiny_unet3d(cache_dir: str | Path) -> Path:
    """The cached tiny model ``<cache_dir>/tiny-unet3d-{version}-seed0``, built once. ``cache_dir``: the model
    cache, resolved by the caller (:func:`hpcvideo.check.cache_folder`: ``$HPCVIDEO_CACHE`` or ~/.cache/hpcvideo);
    created if missing. Safe when several ranks call it at once (build in a private folder, marker last, atomic
    rename; a loser of the race discards its copy)."""
    cache = Path(cache_dir)
    final = cache / f"tiny-unet3d-{TINY_UNET3D_VERSION}-seed0"
    if (final / _COMPLETE).is_file():
        return final
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=cache))
    try:
        os.chmod(tmp, 0o755)
        build_tiny_unet3d(tmp)
        (tmp / _COMPLETE).write_text(f"tiny-unet3d {TINY_UNET3D_VERSION} seed 0\n")
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / _COMPLETE).is_file():
                raise
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read_json(file: Path) -> dict:
    with open(file, encoding="utf-8") as f:
        return json.load(f)


def read_unet3d_info(path) -> dict:
    """Shape facts from the JSON configs (no weights): ``latent_channels``, ``vae_scale_factor_spatial``
    (2 ** (len(vae block_out_channels) - 1)), ``spatial_multiple`` (latent size multiple: 2 ** number
    of UNet downsamplings), ``scaling_factor``, ``model_id``. Raises FileNotFoundError for a missing part."""
    path = Path(path)
    for part, name in (("unet", "config.json"), ("vae", "config.json"), ("scheduler", "scheduler_config.json")):
        if not (path / part / name).is_file():
            raise FileNotFoundError(f"{str(path)!r} is not a UNet3D diffusers folder: {part}/{name} is missing "
                                    f"(expected subfolders: {', '.join(PARTS)}, scheduler)")
    from .support import check_supported

    check_supported(path, "unet3d")  # entries hpcvideo does not use: refused by name
    ucfg, vcfg = _read_json(path / "unet" / "config.json"), _read_json(path / "vae" / "config.json")
    if ucfg.get("_class_name", "UNet3DConditionModel") != "UNet3DConditionModel":
        raise ConfigError(f"{str(path)!r}: unet/config.json has _class_name {ucfg['_class_name']!r}; expected UNet3DConditionModel")
    index = path / "model_index.json"
    name = _read_json(index).get("_name_or_path") if index.is_file() else None
    return {
        "latent_channels": int(vcfg.get("latent_channels", 4)),
        "vae_scale_factor_spatial": 2 ** (len(vcfg.get("block_out_channels", [64])) - 1),
        "spatial_multiple": 2 ** (len(ucfg.get("block_out_channels", [320, 640, 1280, 1280])) - 1),
        "scaling_factor": float(vcfg.get("scaling_factor", 0.18215)),
        "model_id": name if isinstance(name, str) and name and not Path(name).is_absolute() else path.resolve().name,
    }


@dataclass(kw_only=True)
class UNet3DComponents:
    """Loaded parts (``None`` when not asked for) and the folder's scheduler config."""

    unet: object | None
    vae: object | None
    text_encoder: object | None
    tokenizer: object | None
    scheduler_config: dict
    path: Path


def load_unet3d(path, *, device="cpu", dtype: torch.dtype = torch.float32, parts=PARTS) -> UNet3DComponents:
    """Load ``parts`` of the UNet3D model folder ``path`` (UNet and text encoder in ``dtype``, VAE in float32)."""
    from diffusers import AutoencoderKL, UNet3DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    path = Path(path)
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ValueError(f"load_unet3d: unknown parts {unknown}; allowed: {list(PARTS)}")
    read_unet3d_info(path)
    got = dict.fromkeys(PARTS)
    if "unet" in parts:
        got["unet"] = UNet3DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype,
                                                           local_files_only=True).to(device).eval()
    if "vae" in parts:
        got["vae"] = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=torch.float32,
                                                   local_files_only=True).to(device).eval()
    if "text_encoder" in parts:
        got["text_encoder"] = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=dtype,
                                                            local_files_only=True).to(device).eval()
    if "tokenizer" in parts:
        got["tokenizer"] = AutoTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True)
    return UNet3DComponents(**got, scheduler_config=_read_json(path / "scheduler" / "scheduler_config.json"), path=path)


@torch.no_grad()
def encode_prompts_unet3d(components: UNet3DComponents, prompts: list[str], *, negative_prompt: str | None, device,
                          dtype: torch.dtype) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """CLIP text embeddings exactly as ``TextToVideoSDPipeline.encode_prompt`` computes them, one prompt
    at a time. Returns ([(1, 77, D) per prompt], (1, 77, D) for the negative prompt or None)."""
    from diffusers import TextToVideoSDPipeline

    pipe = TextToVideoSDPipeline(vae=None, text_encoder=components.text_encoder, tokenizer=components.tokenizer,
                                 unet=None, scheduler=None)
    embeds = [pipe.encode_prompt(p, device, 1, False)[0].to(dtype) for p in prompts]
    negative = None
    if negative_prompt is not None:
        negative = pipe.encode_prompt(negative_prompt, device, 1, False)[0].to(dtype)
    return embeds, negative


FPS_PREFIX = "fps_embedding."


def apply_fps_condition(unet, path, fps: float) -> None:
    """VideoCrafter2's frames-per-second condition on a stock ``UNet3DConditionModel`` (reversible).

    A VideoCrafter2 diffusers conversion stores ``fps_embedding.linear_1/2`` next to the UNet weights
    (diffusers ignores them when loading). As its pipeline does, the embedding
    ``fps_embedding(fps_proj(fps))`` (``Timesteps(c0, flip_sin_to_cos=True, shift=0)`` of the fps,
    float64, then ``TimestepEmbedding(c0, 4 * c0)``; c0 = block_out_channels[0]) is added to the
    output of ``unet.time_embedding`` for every sample. Raises FileNotFoundError when the folder's unet
    weights have no fps_embedding (not a VideoCrafter2 conversion). Undo with :func:`remove_fps_condition`.
    """
    from diffusers.models.embeddings import TimestepEmbedding, Timesteps
    from safetensors import safe_open

    folder = Path(path) / "unet"
    weights = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            weights.update({k[len(FPS_PREFIX):]: handle.get_tensor(k) for k in handle.keys() if k.startswith(FPS_PREFIX)})
    if not weights:
        raise FileNotFoundError(f"model.fps_condition is set but {str(folder)!r} has no {FPS_PREFIX}* weights (not a "
                                "VideoCrafter2 conversion); allowed: model.fps_condition=null for this model")
    c0 = unet.config.block_out_channels[0]
    embedding = TimestepEmbedding(c0, 4 * c0, act_fn=unet.config.act_fn)
    embedding.load_state_dict(weights)
    parameter = next(unet.parameters())
    embedding = embedding.to(parameter.device, parameter.dtype).eval()
    fps_emb = Timesteps(c0, True, 0)(torch.tensor([float(fps)], dtype=torch.float64, device=parameter.device))

    def hook(module, args, output):  # output: (B, 4 * c0) time embedding
        return output + embedding(fps_emb.to(output.dtype)).expand_as(output)

    remove_fps_condition(unet)
    unet._fps_condition = (embedding, unet.time_embedding.register_forward_hook(hook))


def remove_fps_condition(unet) -> None:
    """Undo :func:`apply_fps_condition` (a no-op when it is not applied)."""
    state = vars(unet).get("_fps_condition")
    if state is not None:
        state[1].remove()
        del unet._fps_condition
