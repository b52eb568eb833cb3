"""Model families behind one interface: where a model is, what its configs say, how it loads, how it
encodes prompts, which scheduler it takes, how it predicts noise and what kind of VAE it has.

The runner and the strategies ask :func:`family_of` for the family of a config and call these methods;
they never branch on ``model.family`` themselves. A new family is a new :class:`ModelFamily` subclass
registered in :data:`FAMILIES` (and its name in the config schema's allowed families).

* :class:`WanFamily` — Wan 2.1 DiTs (``WanTransformer3DModel``, causal 3-D VAE: 4 pixel frames per
  latent frame after the first, decoded in order with the streaming decoder).
* :class:`UNet3DFamily` — ``UNet3DConditionModel`` (ModelScope T2V, VideoCrafter2 conversions): CLIP
  text encoder, per-frame 2-D VAE (one pixel frame per latent frame, any clip decodes on its own).
"""

from __future__ import annotations

from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # model.dtype -> torch
VAE_KINDS = ("causal", "per_frame")


class ModelFamily:
    """One model family. ``name``: the ``model.family`` value; ``vae_kind``: "causal" (frames depend on
    every earlier latent frame: decode in video order, one decoder) or "per_frame" (each latent frame
    decodes alone)."""

    name: str = ""
    vae_kind: str = ""

    def path(self, cfg) -> Path:
        """``model.path`` as a folder: "tiny" builds/caches the family's tiny random-weight model, "demo"
        is the trained demo model shipped in the package (a Wan, :mod:`hpcvideo.demo`)."""
        from ..check import model_folder  # the one resolution of model.path, also used without torch

        return model_folder(cfg)

    def info(self, path: Path) -> dict:
        """Shape facts from the JSON configs (no weights): at least ``latent_channels``,
        ``vae_scale_factor_spatial``, ``stride`` (pixels the video height/width must be a multiple of),
        ``vae_temporal_stride`` (pixel frames per latent frame after the first) and ``model_id``.
        Raises FileNotFoundError / ValueError for a folder of another kind."""
        raise NotImplementedError

    def load(self, path: Path, *, device, dtype: torch.dtype, denoiser: bool = False, vae: bool = False,
             text: bool = False):
        """Components with ``.model`` (the denoiser), ``.vae``, ``.text_encoder``, ``.tokenizer`` (None
        when not asked for) and ``.scheduler_config`` (always)."""
        raise NotImplementedError

    def encode_prompts(self, components, cfg, *, dtype: torch.dtype) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """([embeddings (1, L, D) of each prompt of the schedule], negative (1, L, D) or None without CFG),
        on the CPU, as the family's diffusers pipeline computes them."""
        raise NotImplementedError

    def make_scheduler(self, cfg, scheduler_config: dict, device):
        """A scheduler at step 0 with ``sampling.num_inference_steps`` timesteps set."""
        raise NotImplementedError

    def noise_pred(self, model, latents: torch.Tensor, t, prompt_embeds: torch.Tensor, negative: torch.Tensor | None,
                   scheduler, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The model's (conditional, unconditional or None) float32 predictions for ``latents`` (1, C, F, h, w)
        at timestep ``t``, called as the family's diffusers pipeline calls it."""
        raise NotImplementedError

    def prepare_denoiser(self, model, path: Path, cfg) -> None:
        """Family-specific conditioning of a loaded denoiser (default: none)."""

    def experts(self, info: dict):
        """Which denoiser serves a timestep (:class:`hpcvideo.models.experts.Experts`, from the JSON facts
        ``info``): ``load(denoiser=True).models`` / ``load_stage(expert=name)`` hold them in ``names`` order."""
        from .experts import Experts

        return Experts.of(info)


class WanFamily(ModelFamily):
    name, vae_kind = "wan", "causal"

    def info(self, path: Path) -> dict:
        from .wan import read_model_info

        info = read_model_info(path)
        info["stride"] = info["vae_scale_factor_spatial"] * max(info["patch_size"][1:])
        info["vae_temporal_stride"] = info["vae_scale_factor_temporal"]
        return info

    def load(self, path, *, device, dtype, denoiser=False, vae=False, text=False):
        from .wan import load_wan

        experts = self.experts(self.info(path)).names if denoiser else ()
        parts = experts + (("vae",) if vae else ()) + (("text_encoder", "tokenizer") if text else ())
        components = load_wan(path, device=device, dtype=dtype, parts=parts)
        components.model = components.transformer
        components.models = [getattr(components, name) for name in experts]  # every expert (Wan2.2 A14B: two)
        return components

    def warm_up(self) -> None:
        """Import the code that loading the denoiser's stages and the VAE needs (seconds of Python imports): the
        ranks other than rank 0 call it while rank 0 encodes the prompts, instead of after."""
        import importlib

        for module in ("accelerate", "diffusers.models.transformers.transformer_wan",
                       "diffusers.models.autoencoders.autoencoder_kl_wan"):
            importlib.import_module(module)

    def load_stage(self, path, layers: range, *, device, dtype, expert: str = "transformer"):
        """The transformer ``expert`` (a name of :meth:`experts`) with only the blocks in ``layers`` (a
        pipeline stage)."""
        from .wan import load_wan_transformer_stage

        return load_wan_transformer_stage(path, layers, device=device, dtype=dtype, subfolder=expert)

    def encode_prompts(self, components, cfg, *, dtype):
        from .wan import encode_prompts

        s = cfg.sampling
        return encode_prompts(components, [p.prompt for p in s.prompts],
                              negative_prompt=s.negative_prompt if s.guidance_scale > 1.0 else None,
                              max_sequence_length=s.max_sequence_length, device="cpu", dtype=dtype)

    def make_scheduler(self, cfg, scheduler_config, device):
        from ..schedulers import make_scheduler

        s = cfg.sampling
        return make_scheduler(s.scheduler, scheduler_config=scheduler_config, flow_shift=s.flow_shift,
                              num_inference_steps=s.num_inference_steps, device=device)

    def noise_pred(self, model, latents, t, prompt_embeds, negative, scheduler, dtype):
        # as WanPipeline: the conditional forward, then the unconditional one; t: a timestep, or per token
        # (B, S) for an expand_timesteps model (hpcvideo.conditioning.token_timesteps)
        timestep = t if t.ndim == 2 else t.expand(latents.shape[0])
        cond = model(latents.to(dtype), timestep, prompt_embeds, return_dict=False)[0].float()
        if negative is None:
            return cond, None
        return cond, model(latents.to(dtype), timestep, negative, return_dict=False)[0].float()


class UNet3DFamily(ModelFamily):
    name, vae_kind = "unet3d", "per_frame"

    def info(self, path: Path) -> dict:
        from .unet3d import read_unet3d_info

        info = read_unet3d_info(path)
        info["stride"] = info["vae_scale_factor_spatial"] * info["spatial_multiple"]
        info["vae_temporal_stride"] = 1
        return info

    def load(self, path, *, device, dtype, denoiser=False, vae=False, text=False):
        from .unet3d import load_unet3d

        parts = (("unet",) if denoiser else ()) + (("vae",) if vae else ()) + (
            ("text_encoder", "tokenizer") if text else ())
        components = load_unet3d(path, device=device, dtype=dtype, parts=parts)
        components.model = components.unet
        components.models = [components.unet] if denoiser else []
        return components

    def prepare_denoiser(self, model, path, cfg) -> None:
        if cfg.model.fps_condition is not None:  # VideoCrafter2 conversions
            from .unet3d import apply_fps_condition

            apply_fps_condition(model, path, cfg.model.fps_condition)

    def encode_prompts(self, components, cfg, *, dtype):
        from .unet3d import encode_prompts_unet3d

        s = cfg.sampling
        return encode_prompts_unet3d(components, [p.prompt for p in s.prompts],
                                     negative_prompt=s.negative_prompt if s.guidance_scale > 1.0 else None,
                                     device="cpu", dtype=dtype)

    def make_scheduler(self, cfg, scheduler_config, device):
        from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

        s = cfg.sampling
        config = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
        if s.scheduler == "ddim":
            scheduler = DDIMScheduler.from_config(config)
        else:  # deterministic multistep DPM-Solver++ (the paper's SDE variant would need per-step noise)
            scheduler = DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++")
        scheduler.set_timesteps(s.num_inference_steps, device=device)
        return scheduler

    def noise_pred(self, model, latents, t, prompt_embeds, negative, scheduler, dtype):
        # as TextToVideoSDPipeline: one batch [uncond, cond]
        model_in = torch.cat([latents, latents]) if negative is not None else latents
        model_in = scheduler.scale_model_input(model_in, t).to(dtype)
        text = torch.cat([negative, prompt_embeds]) if negative is not None else prompt_embeds
        out = model(model_in, t, encoder_hidden_states=text, return_dict=False)[0].float()
        if negative is None:
            return out, None
        uncond, cond = out.chunk(2)
        return cond, uncond


FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (WanFamily(), UNet3DFamily())}


def family_of(cfg) -> ModelFamily:
    """The :class:`ModelFamily` of ``cfg.model.family``. Raises ValueError naming the allowed families."""
    try:
        return FAMILIES[cfg.model.family]
    except KeyError:
        raise ValueError(f"model.family={cfg.model.family!r}; allowed: {sorted(FAMILIES)}") from None


def resolve_model_path(cfg) -> Path:
    """``model.path`` of ``cfg`` as a folder (see :meth:`ModelFamily.path`)."""
    return family_of(cfg).path(cfg)
