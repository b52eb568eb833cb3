"""The JSON configs of public checkpoints, to plan and benchmark real architectures without downloading them.

:data:`ARCHS` holds the configs of ``Wan-AI/Wan2.1-T2V-1.3B-Diffusers`` (transformer: 30 layers, hidden
1536 = 12 heads x 128, FFN 8960; VAE: base_dim 96; text encoder: umT5-XXL, d_model 4096, 24 layers;
UniPC scheduler with flow shift 3), as published in that repository's ``*/config.json`` files.
:func:`write_config_folder` writes them as a diffusers folder without weights: ``hpcvideo plan`` and
``hpcvideo check`` read only JSON, so they run on it (``--set model.path=FOLDER``);
``bench/bench_real_arch.py`` adds random weights to such a folder.
"""

from __future__ import annotations

import json
from pathlib import Path

WAN21_LATENTS_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                      0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
WAN21_LATENTS_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                     3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.916]

UMT5_XXL = {
    "_class_name": "UMT5EncoderModel", "architectures": ["UMT5EncoderModel"], "model_type": "umt5",
    "d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "num_layers": 24, "num_decoder_layers": 24,
    "vocab_size": 256384, "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128, "dropout_rate": 0.1, "layer_norm_epsilon": 1e-6,
    "initializer_factor": 1.0, "is_encoder_decoder": True, "tie_word_embeddings": False, "use_cache": True,
    "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0, "scalable_attention": True,
    "torch_dtype": "float32",
}

ARCHS = {
    "wan2.1-t2v-1.3b": {
        "model_index": {"_class_name": "WanPipeline", "_name_or_path": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
                        "scheduler": ["diffusers", "UniPCMultistepScheduler"],
                        "text_encoder": ["transformers", "UMT5EncoderModel"],
                        "tokenizer": ["transformers", "T5TokenizerFast"],
                        "transformer": ["diffusers", "WanTransformer3DModel"],
                        "vae": ["diffusers", "AutoencoderKLWan"]},
        "transformer": {"_class_name": "WanTransformer3DModel", "added_kv_proj_dim": None, "attention_head_dim": 128,
                        "cross_attn_norm": True, "eps": 1e-06, "ffn_dim": 8960, "freq_dim": 256, "image_dim": None,
                        "in_channels": 16, "num_attention_heads": 12, "num_layers": 30, "out_channels": 16,
                        "patch_size": [1, 2, 2], "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 1024,
                        "text_dim": 4096},
        "vae": {"_class_name": "AutoencoderKLWan", "attn_scales": [], "base_dim": 96, "dim_mult": [1, 2, 4, 4],
                "dropout": 0.0, "latents_mean": WAN21_LATENTS_MEAN, "latents_std": WAN21_LATENTS_STD,
                "num_res_blocks": 2, "temperal_downsample": [False, True, True], "z_dim": 16},
        "text_encoder": UMT5_XXL,
        "scheduler": {"_class_name": "UniPCMultistepScheduler", "beta_end": 0.02, "beta_schedule": "linear",
                      "beta_start": 0.0001, "disable_corrector": [], "dynamic_thresholding_ratio": 0.995,
                      "final_sigmas_type": "zero", "flow_shift": 3.0, "lower_order_final": True,
                      "num_train_timesteps": 1000, "predict_x0": True, "prediction_type": "flow_prediction",
                      "rescale_betas_zero_snr": False, "sample_max_value": 1.0, "solver_order": 2,
                      "solver_p": None, "solver_type": "bh2", "steps_offset": 0, "thresholding": False,
                      "timestep_spacing": "linspace", "trained_betas": None, "use_beta_sigmas": False,
                      "use_exponential_sigmas": False, "use_flow_sigmas": True, "use_karras_sigmas": False},
    },
}


def write_config_folder(path, arch: str = "wan2.1-t2v-1.3b", *, text_encoder: dict | None = None) -> Path:
    """Write the JSON configs of ``arch`` (a key of :data:`ARCHS`) as a diffusers folder at ``path`` (no
    weights, no tokenizer files). ``text_encoder``: keys that replace those of the text encoder's config
    (e.g. fewer layers for a small random encoder). Returns the folder. Raises ValueError for an unknown arch."""
    if arch not in ARCHS:
        raise ValueError(f"arch={arch!r}; allowed: {sorted(ARCHS)}")
    spec = ARCHS[arch]
    path = Path(path)
    files = {
        "model_index.json": spec["model_index"],
        "transformer/config.json": spec["transformer"],
        "vae/config.json": spec["vae"],
        "text_encoder/config.json": {**spec["text_encoder"], **(text_encoder or {})},
        "scheduler/scheduler_config.json": spec["scheduler"],
    }
    for name, content in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(json.dumps(content, indent=2) + "\n")
    (path / "tokenizer").mkdir(exist_ok=True)
    return path


def build_random_folder(path, arch: str = "wan2.1-t2v-1.3b", *, seed: int = 0, text_encoder: dict | None = None,
                        max_shard_size: str = "5GB", device="cpu") -> Path:
    """A complete diffusers folder of ``arch`` with random weights, saved as the real checkpoint is
    (float32 safetensors; Wan2.1-1.3B's transformer in two shards of at most ``max_shard_size`` with an
    index file), so the loading code reads it as it reads the real one. The text encoder is the
    architecture's with the keys of ``text_encoder`` replaced (default: 2 layers, 8 heads, d_ff 1024, the
    real d_model, which the transformer's text_dim needs) and the word-level tokenizer of
    :mod:`hpcvideo.models.tiny` (its vocabulary size). Deterministic for a ``seed``. Returns the folder.

    Memory: the float32 model is built whole in this process (Wan2.1-1.3B: 5.7 GB); ``device="cuda"`` builds it there.
    """
    import torch
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from .tiny import _build_tokenizer

    spec = ARCHS[arch]
    tokenizer = _build_tokenizer()
    small = {"num_layers": 2, "num_decoder_layers": 2, "num_heads": 8, "d_ff": 1024, **(text_encoder or {}),
             "vocab_size": len(tokenizer)}
    text_config = {k: v for k, v in {**spec["text_encoder"], **small}.items() if not k.startswith("_")
                   and k not in ("architectures", "model_type", "torch_dtype")}
    with torch.device(device):
        torch.manual_seed(seed)
        transformer = WanTransformer3DModel.from_config(spec["transformer"])
        torch.manual_seed(seed)
        vae = AutoencoderKLWan.from_config(spec["vae"])
        torch.manual_seed(seed)
        encoder = UMT5EncoderModel(UMT5Config(**text_config))
    scheduler = UniPCMultistepScheduler.from_config(spec["scheduler"])
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=vae, scheduler=scheduler, transformer=transformer)
    path = Path(path)
    pipe.save_pretrained(path, max_shard_size=max_shard_size)
    return path
