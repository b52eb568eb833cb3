"""``hpcvideo plan`` for Video-Infinity (Wan and UNet3D): memory, messages and FLOPs per rank, without weights.

Per rank r (clip r: F latent frames of (C, h, w); T steps; g = 2 CFG branches or 1; b = bytes per
element of ``model.dtype``), from the models built on the meta device from their JSON configs
(:mod:`hpcvideo.dryrun`: the patched forward of this rank's clip runs on meta tensors)::

    weights      every parameter and buffer of the denoiser (each rank holds the whole model);
                 the VAE (float32) on rank 0 (Wan: causal, rank 0 decodes every clip) or on every rank
                 (UNet3D: per-frame, each rank decodes its clip); the text encoder on rank 0 while the
                 prompts are encoded (then freed), with one prompt's activations; while the denoiser
                 loads, its safetensors files' pages on the host (``load`` phase, hpcvideo.plan.RankPlan:
                 diffusers' from_pretrained holds them all until it returns)
    activations  the live-tensor peak of one forward of the clip (Wan: batch 1, the cond and uncond
                 branches one after the other, as WanPipeline; UNet3D: batch g, as TextToVideoSDPipeline),
                 attention counted as a fused kernel; + the step's float32 predictions, 3 C F h w 4
    queue        the clip's state between steps: latents + scheduler state, float32 C F h w 4 x
                 (UniPC 4, DPM-Solver++ 3, DDIM / flow Euler 1)
    bytes/tick   what the patched layers send per step, by kind (halo frames to the neighbours, the
                 global set, GroupNorm sums), counted by :class:`hpcvideo.dryrun.CountingComm` with the
                 rules of the real exchange, so equal to a run's ``rank_stats`` ``bytes_sent`` / steps
    time/tick    the dry run's FLOPs (matmuls, convolutions, attention) per step / throughput

Checked against measured figures in tests/test_plan.py (tiny presets: weight bytes of the loaded model,
bytes sent per rank equal to the run's counters).
"""

from __future__ import annotations

from pathlib import Path

import torch

STATE_TENSORS = {"unipc": 4, "dpmsolver": 3, "ddim": 1, "flow_euler": 1}  # float32 (C, F, h, w) per clip


def _module_bytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def _meta_parts(model_path: Path, family: str, dtype: torch.dtype):
    """(denoiser, vae, text encoder or None) on the meta device, from the folder's JSON configs."""
    from accelerate import init_empty_weights

    from .dryrun import meta_model

    if family == "wan":
        from diffusers import AutoencoderKLWan as VAE
        from diffusers import WanTransformer3DModel as Denoiser
        sub = "transformer"
    else:
        from diffusers import AutoencoderKL as VAE
        from diffusers import UNet3DConditionModel as Denoiser
        sub = "unet"
    denoiser = meta_model(Denoiser, model_path / sub, dtype=dtype)
    vae = meta_model(VAE, model_path / "vae", dtype=torch.float32)
    encoder = None
    if (model_path / "text_encoder" / "config.json").is_file():
        from transformers import AutoConfig, CLIPTextModel, UMT5EncoderModel

        cls = UMT5EncoderModel if family == "wan" else CLIPTextModel
        with init_empty_weights(include_buffers=True):
            encoder = cls(AutoConfig.from_pretrained(model_path / "text_encoder"))
        if family == "wan":
            encoder.tie_weights()  # embed_tokens is shared's tensor once loaded: count it once
        encoder = encoder.to(dtype).eval()
    return denoiser, vae, encoder


def text_encoder_figures(encoder, sequence_length: int) -> tuple[int, int]:
    """(weight bytes, activation peak of one prompt) of a meta-device text encoder (0, 0 for None)."""
    from .dryrun import encoder_activation_bytes

    if encoder is None:
        return 0, 0
    weights = sum({id(p): p.numel() * p.element_size() for p in encoder.parameters()}.values())
    return weights, encoder_activation_bytes(encoder, sequence_length)


def make_videoinfinity_plan(cfg, *, num_ranks: int, model_path: Path, throughput_tflops: float | None = None):
    """The per-rank :class:`hpcvideo.plan.Plan` of a Video-Infinity config on ``num_ranks`` ranks (the clip
    length derived from the rank count when ``strategy.clip_latent_frames`` is null)."""
    from .dryrun import replay, videoinfinity_forward
    from .layout import resolve_config
    from .models.family import DTYPES, family_of
    from .plan import DTYPE_BYTES, Plan, RankPlan, checkpoint_tensor_bytes
    from .strategies.videoinfinity.clips import ClipLayout
    from .strategies.videoinfinity.executor import scope_of

    cfg = resolve_config(cfg, num_ranks)
    family = family_of(cfg)
    info = family.info(model_path)
    dtype, b = DTYPES[cfg.model.dtype], DTYPE_BYTES[cfg.model.dtype]
    st, s = cfg.strategy, cfg.sampling
    F = st.clip_latent_frames
    scale = info["vae_scale_factor_spatial"]
    C, h, w = info["latent_channels"], cfg.video.height // scale, cfg.video.width // scale
    g = 2 if s.guidance_scale > 1.0 else 1
    denoiser, vae, encoder = _meta_parts(Path(model_path), family.name, dtype)
    if family.name == "wan":
        batch, forwards, text_len = 1, g, s.max_sequence_length
        text_dim = denoiser.config.text_dim
    else:
        batch, forwards, text_len = g, 1, encoder.config.max_position_embeddings if encoder is not None else 77
        text_dim = denoiser.config.cross_attention_dim
    encoder_bytes, encoder_activations = text_encoder_figures(encoder, text_len)
    weights, vae_bytes = _module_bytes(denoiser), _module_bytes(vae)
    stored = sum(checkpoint_tensor_bytes(Path(model_path) / ("transformer" if family.name == "wan" else "unet")).values())
    clip_tensor = C * F * h * w * 4
    embeddings = (len(s.prompts) + (1 if g == 2 else 0)) * text_len * text_dim * b
    plan = Plan(model_id=info["model_id"], num_ranks=num_ranks, num_blocks=num_ranks, num_ticks=s.num_inference_steps,
                blocks_in_flight=num_ranks, tokens_per_block_forward=F * h * w, throughput_tflops=throughput_tflops,
                strategy="videoinfinity", text_encoder_device=cfg.model.text_encoder_device)
    forwards_by_shape: dict = {}  # halo lengths -> dry run (ranks with the same halos have the same shapes)
    calls = None
    for r in range(num_ranks):
        layout = ClipLayout(rank=r, world_size=num_ranks, clip_frames=F)
        if calls is None:
            dry = videoinfinity_forward(denoiser, family.name, layout=layout, scope=scope_of(cfg),
                                        latents_shape=(batch, C, F, h, w), text_shape=(batch, text_len, text_dim),
                                        dtype=dtype, sync=st.sync_clips)
            calls = dry["calls"]
            forwards_by_shape[tuple(dry["halo_lengths"])] = dry
        comm = replay(calls, layout, sync=st.sync_clips)
        shape_key = tuple(comm.halo_lengths)
        if shape_key not in forwards_by_shape:
            forwards_by_shape[shape_key] = videoinfinity_forward(
                denoiser, family.name, layout=layout, scope=scope_of(cfg), latents_shape=(batch, C, F, h, w),
                text_shape=(batch, text_len, text_dim), dtype=dtype, sync=st.sync_clips)
        dry = forwards_by_shape[shape_key]
        per_tick = {kind: forwards * n for kind, n in comm.sent.items()}
        flops = forwards * dry["flops"]
        plan.ranks.append(RankPlan(
            rank=r, layers=(0, info.get("num_layers", 0)), clip=(layout.start, layout.stop),
            weights_bytes=weights, checkpoint_bytes=stored,
            vae_bytes=vae_bytes if (r == 0 or family.vae_kind == "per_frame") else 0,
            text_encoder_bytes=encoder_bytes if r == 0 else 0,
            text_encoder_activations_bytes=encoder_activations if r == 0 else 0,
            text_encoder_on="host" if cfg.model.text_encoder_device == "cpu" else "device",
            device_is_host=cfg.runtime.device == "cpu",
            activations_bytes=dry["activations_bytes"] + 3 * clip_tensor,
            caches_bytes=0,
            queue_bytes=STATE_TENSORS.get(s.scheduler, 4) * clip_tensor,
            embeddings_bytes=embeddings,
            sent_bytes_per_tick=sum(per_tick.values()),
            sent_bytes_per_tick_by_kind=per_tick,
            sent_bytes_total=sum(per_tick.values()) * s.num_inference_steps,
            flops_per_tick=flops,
            seconds_per_tick=flops / (throughput_tflops * 1e12) if throughput_tflops else None,
        ))
    return plan
