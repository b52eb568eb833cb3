"""Loading Wan text-to-video models (diffusers format) from a local folder.

One code path for a real checkpoint on a cluster (``Wan-AI/Wan2.1-T2V-1.3B-Diffusers``, ``...-14B-...``)
and the tiny CPU model of :mod:`hpcvideo.models.tiny`. Expected layout of the folder::

    model_index.json
    transformer/   WanTransformer3DModel      (config.json + safetensors)
    vae/           AutoencoderKLWan           (config.json + safetensors)
    text_encoder/  UMT5EncoderModel           (config.json + safetensors)
    tokenizer/     any tokenizer AutoTokenizer loads
    scheduler/     scheduler_config.json

Nothing here touches the network: every ``from_pretrained`` runs with ``local_files_only=True``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..config.schema import ConfigError
from .support import check_supported

if TYPE_CHECKING:
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import PreTrainedTokenizerBase, UMT5EncoderModel

ALL_PARTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
EXPERT_PARTS = ("transformer_2",)  # Wan2.2 A14B's low-noise expert: loaded when asked for (hpcvideo.models.experts)
_CONFIG_FILE = {
    "transformer": "config.json",
    "transformer_2": "config.json",
    "vae": "config.json",
    "text_encoder": "config.json",
    "scheduler": "scheduler_config.json",
}


@dataclass(kw_only=True)
class WanComponents:
    """The loaded parts of a Wan model; a part not asked for in ``load_wan(parts=...)`` is ``None``."""

    transformer: WanTransformer3DModel | None
    transformer_2: WanTransformer3DModel | None = None  # Wan2.2 A14B's low-noise expert, when asked for
    vae: AutoencoderKLWan | None
    text_encoder: UMT5EncoderModel | None
    tokenizer: PreTrainedTokenizerBase | None
    scheduler_config: dict  # the folder's scheduler/scheduler_config.json (always read; it is tiny)
    model_id: str  # e.g. "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", or the folder name
    path: Path


def _check_folder(path: Path, parts: Iterable[str]) -> None:
    """Raise FileNotFoundError naming the folder and the first missing subfolder / config file."""
    if not path.is_dir():
        raise FileNotFoundError(f"Wan model folder {str(path)!r} does not exist or is not a directory")
    for part in parts:
        sub = path / part
        if not sub.is_dir():
            raise FileNotFoundError(
                f"{str(path)!r} is not a Wan diffusers folder: subfolder {part!r} is missing "
                f"(expected subfolders: {', '.join(ALL_PARTS)}; e.g. a download of "
                f"Wan-AI/Wan2.1-T2V-1.3B-Diffusers)"
            )
        cfg = _CONFIG_FILE.get(part)
        if cfg is not None and not (sub / cfg).is_file():
            raise FileNotFoundError(f"{str(path)!r} is not a Wan diffusers folder: {part}/{cfg} is missing")


def _read_json(file: Path) -> dict:
    with open(file, encoding="utf-8") as f:
        return json.load(f)


def _model_id(path: Path) -> str:
    """``_name_or_path`` of model_index.json if set; a hub cache snapshot's repo id; else the folder name."""
    index = path / "model_index.json"
    if index.is_file():
        name = _read_json(index).get("_name_or_path")
        if isinstance(name, str) and name and not Path(name).is_absolute():
            return name
    resolved = path.resolve()
    # huggingface hub cache: .../models--Org--Name/snapshots/<commit>
    if resolved.parent.name == "snapshots" and resolved.parent.parent.name.startswith("models--"):
        return resolved.parent.parent.name[len("models--") :].replace("--", "/")
    return resolved.name


def read_model_info(path) -> dict:
    """Shape facts of a Wan folder, from its JSON configs only (no weights are read).

    Returns a dict with ``latent_channels`` (VAE z_dim == transformer in/out channels),
    ``vae_scale_factor_spatial`` (2**len(temperal_downsample), times the VAE patch size if any: 8 for
    Wan2.1), ``vae_scale_factor_temporal`` (2**sum(temperal_downsample): 4), ``patch_size`` (t, h, w),
    ``num_layers``, ``hidden_dim`` (num_attention_heads * attention_head_dim), ``num_attention_heads``,
    ``attention_head_dim``, ``text_dim``, ``ffn_dim``, ``rope_max_seq_len``, ``model_id``, ``experts``
    (["transformer"], or Wan2.2 A14B's ["transformer", "transformer_2"]) and ``boundary_timestep``
    (None, or where the experts switch: :mod:`hpcvideo.models.experts`). Raises
    :class:`hpcvideo.models.support.UnsupportedModelError` (a ValueError) naming what the folder sets
    that hpcvideo does not use. Also ``expand_timesteps`` (model_index.json: the pipeline passes one
    timestep per token, Wan2.2 TI2V), ``condition_channels`` (image-to-video: the 4 mask + z_dim
    image-latent input channels after the latents; 0 for text-to-video), ``image_dim`` (the CLIP feature
    size of Wan2.1-I2V's image encoder, or None), ``pos_embed_seq_len`` (first-last-frame checkpoints) and
    ``vae_encodes`` (False for a VAE that can only decode).
    """
    path = Path(path)
    _check_folder(path, ("transformer", "vae"))
    check_supported(path, "wan")  # entries of model_index.json / configs hpcvideo does not use: refused by name
    tcfg = _read_json(path / "transformer" / "config.json")
    vcfg = _read_json(path / "vae" / "config.json")
    if tcfg.get("_class_name", "WanTransformer3DModel") != "WanTransformer3DModel":
        raise ConfigError(
            f"{str(path)!r}: transformer/config.json has _class_name {tcfg['_class_name']!r}; "
            "expected 'WanTransformer3DModel'"
        )
    if vcfg.get("_class_name", "AutoencoderKLWan") != "AutoencoderKLWan":
        raise ConfigError(
            f"{str(path)!r}: vae/config.json has _class_name {vcfg['_class_name']!r}; expected 'AutoencoderKLWan'"
        )
    # Defaults are those of the diffusers classes (a config.json may omit a default value).
    z_dim = int(vcfg.get("z_dim", 16))
    temperal_downsample = list(vcfg.get("temperal_downsample", [False, True, True]))
    vae_patch = vcfg.get("patch_size") or 1
    in_channels = int(tcfg.get("in_channels", 16))
    out_channels = int(tcfg.get("out_channels") or in_channels)
    image_to_video = in_channels == 2 * z_dim + 4 and out_channels == z_dim  # WanImageToVideoPipeline layout
    if (in_channels != z_dim or out_channels != z_dim) and not image_to_video:
        raise ConfigError(
            f"{str(path)!r}: transformer in/out channels ({in_channels}/{out_channels}) fit neither a text-to-video "
            f"model (both the VAE z_dim {z_dim}) nor an image-to-video one (in {2 * z_dim + 4} = latents + 4 mask + "
            f"{z_dim} condition channels, out {z_dim})"
        )
    heads = int(tcfg.get("num_attention_heads", 40))
    head_dim = int(tcfg.get("attention_head_dim", 128))
    return {
        "latent_channels": z_dim,
        "vae_scale_factor_spatial": 2 ** len(temperal_downsample) * int(vae_patch),
        "vae_scale_factor_temporal": 2 ** sum(bool(x) for x in temperal_downsample),
        "patch_size": tuple(int(p) for p in tcfg.get("patch_size", (1, 2, 2))),
        "num_layers": int(tcfg.get("num_layers", 40)),
        "hidden_dim": heads * head_dim,
        "num_attention_heads": heads,
        "attention_head_dim": head_dim,
        "text_dim": int(tcfg.get("text_dim", 4096)),
        "ffn_dim": int(tcfg.get("ffn_dim", 13824)),
        "rope_max_seq_len": int(tcfg.get("rope_max_seq_len", 1024)),
        "model_id": _model_id(path),
        "expand_timesteps": bool(_model_index(path).get("expand_timesteps") or False),
        "condition_channels": in_channels - z_dim if image_to_video else 0,
        "image_dim": tcfg.get("image_dim"),
        "pos_embed_seq_len": tcfg.get("pos_embed_seq_len"),  # set by first-last-frame (FLF2V) checkpoints
        # the encoder changes its width inside residual blocks: without any (the tiny Wan2.1) it cannot encode
        "vae_encodes": int(vcfg.get("num_res_blocks", 2)) >= 1 or len(set(vcfg.get("dim_mult", [1, 2, 4, 4]))) == 1,
        **_read_experts(path, tcfg),
    }


def _read_experts(path: Path, tcfg: dict) -> dict:
    """``experts`` (denoiser subfolders, high noise first) and ``boundary_timestep`` (None with one
    expert) of a Wan folder: Wan2.2 A14B names ``transformer_2`` and ``boundary_ratio`` in
    model_index.json (:mod:`hpcvideo.models.experts`). Raises ConfigError (a ValueError) for a half-named
    pair or a second expert of another shape."""

    from .support import is_set

    index = _model_index(path)
    second, ratio = is_set(index.get("transformer_2")), index.get("boundary_ratio")
    if not second and ratio is None:
        return {"experts": ["transformer"], "boundary_timestep": None}
    where = f"model.path={str(path)!r}: model_index.json"
    if not second or ratio is None:
        missing = "boundary_ratio" if second else "transformer_2"
        raise ConfigError(f"{where} sets {'transformer_2' if second else 'boundary_ratio'} without {missing}; "
                         "allowed: both (Wan2.2 A14B, two experts) or neither")
    if not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise ConfigError(f"{where} sets boundary_ratio={ratio!r}; allowed: a number in (0, 1]")
    _check_folder(path, ("transformer_2",))
    tcfg_2 = _read_json(path / "transformer_2" / "config.json")
    differ = sorted(k for k in set(tcfg) | set(tcfg_2) if not k.startswith("_") and tcfg.get(k) != tcfg_2.get(k))
    if differ:
        raise ConfigError(f"model.path={str(path)!r}: transformer_2/config.json differs from transformer/config.json in "
                         f"{differ}; the two experts must have the same shape")
    scheduler_file = path / "scheduler" / "scheduler_config.json"
    num_train = _read_json(scheduler_file).get("num_train_timesteps", 1000) if scheduler_file.is_file() else 1000
    return {"experts": ["transformer", "transformer_2"], "boundary_timestep": ratio * num_train}


def _model_index(path: Path) -> dict:
    """model_index.json of a folder ({} when absent)."""
    index = path / "model_index.json"
    return _read_json(index) if index.is_file() else {}


def _release_checkpoint_pages(model, dtype: torch.dtype) -> None:
    """Copy the float32-kept parameters of a model loaded in another ``dtype``: from_pretrained leaves them
    on the memory-mapped safetensors file, and while one tensor holds the mapping every page read from
    that file stays resident (on CPU runs: the whole checkpoint, for the whole run)."""
    if dtype == torch.float32:
        return  # every tensor is the file's own (no second copy is made)
    for param in model.parameters():
        if param.dtype == torch.float32 and param.device.type == "cpu":
            param.data = param.data.clone()


def load_wan(
    path,
    *,
    device="cpu",
    dtype: torch.dtype = torch.float32,
    parts: Iterable[str] = ALL_PARTS,
) -> WanComponents:
    """Load the ``parts`` of the Wan model in ``path`` (the others are ``None``).

    The transformer and the text encoder are loaded in ``dtype``; the VAE always in float32 (as
    diffusers and Wan recommend). Modules are put on ``device`` in eval mode. ``scheduler_config``
    is always read. Raises FileNotFoundError naming the folder and the missing subfolder.
    """
    path = Path(path)
    parts = tuple(parts)
    unknown = sorted(set(parts) - set(ALL_PARTS + EXPERT_PARTS))
    if unknown:
        raise ValueError(f"load_wan: unknown parts {unknown}; allowed: {list(ALL_PARTS + EXPERT_PARTS)}")
    _check_folder(path, tuple(p for p in ALL_PARTS + EXPERT_PARTS if p in parts) + ("scheduler",))

    transformer = transformer_2 = vae = text_encoder = tokenizer = None
    if "transformer" in parts:
        from diffusers import WanTransformer3DModel

        transformer = WanTransformer3DModel.from_pretrained(
            path, subfolder="transformer", torch_dtype=dtype, local_files_only=True
        )
        _release_checkpoint_pages(transformer, dtype)
        transformer = transformer.to(device).eval()
    if "transformer_2" in parts:
        from diffusers import WanTransformer3DModel

        transformer_2 = WanTransformer3DModel.from_pretrained(
            path, subfolder="transformer_2", torch_dtype=dtype, local_files_only=True
        )
        _release_checkpoint_pages(transformer_2, dtype)
        transformer_2 = transformer_2.to(device).eval()
    if "vae" in parts:
        from diffusers import AutoencoderKLWan

        vae = AutoencoderKLWan.from_pretrained(path, subfolder="vae", torch_dtype=torch.float32, local_files_only=True)
        vae = vae.to(device).eval()
    if "text_encoder" in parts:
        from transformers import UMT5EncoderModel

        text_encoder = UMT5EncoderModel.from_pretrained(
            path, subfolder="text_encoder", dtype=dtype, local_files_only=True
        )
        text_encoder = text_encoder.to(device).eval()
    if "tokenizer" in parts:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True)

    scheduler_config = dict(_read_json(path / "scheduler" / "scheduler_config.json"))
    return WanComponents(
        transformer=transformer,
        transformer_2=transformer_2,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler_config=scheduler_config,
        model_id=_model_id(path),
        path=path,
    )


def _folder_scheduler(scheduler_config: dict):
    """A fresh scheduler object of the class named in ``scheduler_config`` (``_class_name``)."""
    import diffusers

    name = scheduler_config.get("_class_name", "UniPCMultistepScheduler")
    cls = getattr(diffusers, name, None)
    if cls is None:
        raise ValueError(f"scheduler _class_name {name!r} is not a diffusers scheduler class")
    return cls.from_config(scheduler_config)


def _pipeline_for_text(components: WanComponents):
    """A WanPipeline sharing (not copying) the loaded tokenizer and text encoder."""
    from diffusers import WanPipeline

    return WanPipeline(
        tokenizer=components.tokenizer,
        text_encoder=components.text_encoder,
        vae=None,
        scheduler=_folder_scheduler(components.scheduler_config),
        transformer=None,
    )


@torch.no_grad()
def encode_prompts(
    components: WanComponents,
    prompts: list[str],
    *,
    negative_prompt: str | None,
    max_sequence_length: int,
    device,
    dtype: torch.dtype,
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Text embeddings exactly as ``WanPipeline.encode_prompt`` computes them.

    Each prompt is encoded on its own (batch of one, as WanPipeline does for a single prompt), so a
    prompt's embeddings do not depend on the other prompts in the list.

    Returns ``(prompt_embeds, negative_prompt_embeds)``: a list with one tensor of shape
    (1, max_sequence_length, text_dim) per prompt, and the negative prompt's tensor of the same shape,
    or ``None`` when ``negative_prompt`` is ``None`` (no classifier-free guidance). Use ``""`` for
    WanPipeline's default negative prompt.
    """
    if components.text_encoder is None or components.tokenizer is None:
        raise ValueError("encode_prompts needs components loaded with parts including 'text_encoder' and 'tokenizer'")
    if isinstance(prompts, str):
        raise TypeError("encode_prompts: `prompts` must be a list of strings, not a string")
    pipe = _pipeline_for_text(components)
    prompt_embeds = []
    for prompt in prompts:
        embeds, _ = pipe.encode_prompt(
            prompt=prompt,
            do_classifier_free_guidance=False,
            max_sequence_length=max_sequence_length,
            device=device,
            dtype=dtype,
        )
        prompt_embeds.append(embeds)
    negative_embeds = None
    if negative_prompt is not None:
        negative_embeds, _ = pipe.encode_prompt(
            prompt=negative_prompt,
            do_classifier_free_guidance=False,
            max_sequence_length=max_sequence_length,
            device=device,
            dtype=dtype,
        )
    return prompt_embeds, negative_embeds


def apply_rotary_emb(hidden_states: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's interleaved RoPE, the same arithmetic as diffusers' WanAttnProcessor (B, S, heads, head_dim)."""
    x1, x2 = hidden_states.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(hidden_states)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(hidden_states)


class AbsentBlock(torch.nn.Module):
    """Stands in ``transformer.blocks`` for a block another pipeline stage owns (no weights)."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def forward(self, *args, **kwargs):
        raise RuntimeError(f"transformer block {self.index} belongs to another pipeline stage")


def load_wan_transformer_stage(path, layers: range, *, device="cpu", dtype: torch.dtype = torch.float32,
                               subfolder: str = "transformer"):
    """A ``WanTransformer3DModel`` holding only transformer blocks ``layers`` plus the small shared
    modules (patch embedding, condition embedder, rope, output norm/projection): one DualParal
    pipeline stage (arXiv 2505.21070). Other blocks are :class:`AbsentBlock` placeholders, so block
    indices stay global.

    Only the needed tensors are read from the safetensors file(s) (single file or sharded with an
    index), straight onto ``device``: a stage never materialises the whole model. Dtypes follow
    ``from_pretrained(torch_dtype=dtype)``: modules named in ``_keep_in_fp32_modules`` stay float32,
    so every stage's weights equal the full model's bit for bit (tested). Raises FileNotFoundError
    for a folder without transformer weights, ValueError for layers outside the model. ``subfolder``:
    the expert to load ("transformer", or Wan2.2 A14B's "transformer_2").
    """
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from diffusers import WanTransformer3DModel
    from safetensors import safe_open

    if subfolder not in ("transformer",) + EXPERT_PARTS:
        raise ValueError(f"subfolder={subfolder!r}; allowed: {('transformer',) + EXPERT_PARTS}")
    folder = Path(path) / subfolder
    _check_folder(Path(path), (subfolder,))
    config = WanTransformer3DModel.load_config(folder)
    num_layers = int(config["num_layers"])
    if len(layers) and (layers.start < 0 or layers.stop > num_layers):
        raise ValueError(f"layers {layers} outside the model's {num_layers} transformer blocks")
    with init_empty_weights():
        model = WanTransformer3DModel.from_config(config)
    keep_fp32 = tuple(WanTransformer3DModel._keep_in_fp32_modules or ())

    def wanted(key: str) -> bool:
        parts = key.split(".")
        return parts[0] != "blocks" or int(parts[1]) in layers

    index_file = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index_file.is_file():
        files = sorted(set(_read_json(index_file)["weight_map"].values()))
    else:
        files = ["diffusion_pytorch_model.safetensors"]
    if not all((folder / f).is_file() for f in files):
        raise FileNotFoundError(f"{str(folder)!r} has no safetensors weights ({files})")
    loaded = set()
    for name in files:
        with safe_open(str(folder / name), framework="pt", device="cpu") as handle:
            for key in handle.keys():
                if not wanted(key):
                    continue
                tensor = handle.get_tensor(key)
                if tensor.is_floating_point():
                    fp32 = any(module in key.split(".") for module in keep_fp32)
                    # a copy even when the dtype is the file's: a tensor left on the memory-mapped file would
                    # keep every page read from that shard resident for the whole run (measured: 5.4 GB on 1.3B)
                    tensor = tensor.to(torch.float32 if fp32 else dtype, copy=True)
                set_module_tensor_to_device(model, key, device, value=tensor, dtype=tensor.dtype)
                loaded.add(key)
    for index in range(num_layers):
        if index not in layers:
            model.blocks[index] = AbsentBlock(index)
    missing = [k for k, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise FileNotFoundError(f"{str(folder)!r}: weights missing for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    model = model.to(device)  # non-persistent buffers (rope tables) were built on the CPU
    return model.eval()
