"""Which denoiser serves a timestep: one expert (Wan2.1, UNet3D) or two (Wan2.2 T2V-A14B).

Wan2.2-A14B is a mixture of two experts with the same architecture: ``transformer`` denoises the
high-noise steps, ``transformer_2`` the low-noise ones, switched at ``boundary_ratio`` of the
training timesteps (its ``model_index.json``). diffusers' ``WanPipeline`` (0.35-0.42) picks, at every
step::

    boundary_timestep = boundary_ratio * scheduler.config.num_train_timesteps
    if boundary_timestep is None or t >= boundary_timestep:  transformer,   guidance_scale
    else:                                                     transformer_2, guidance_scale_2

:meth:`Experts.index` is that rule, the one place an executor asks "which transformer for timestep
t"; each block (DualParal) or clip step (Video-Infinity) uses the expert of its own timestep.
``guidance_scale_2`` null means ``guidance_scale`` (as WanPipeline); whether CFG runs at all is
decided by ``guidance_scale`` alone (WanPipeline's ``do_classifier_free_guidance``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Experts:
    """The denoisers of a model (subfolder names, high noise first) and the switch between them.

    ``boundary_timestep``: ``boundary_ratio * num_train_timesteps`` (two experts), None with one.
    """

    names: tuple[str, ...] = ("transformer",)
    boundary_timestep: float | None = None

    def __post_init__(self) -> None:
        if len(self.names) not in (1, 2) or (len(self.names) == 2) != (self.boundary_timestep is not None):
            raise ValueError(f"Experts: {self.names} with boundary_timestep={self.boundary_timestep}: two experts "
                             "need a boundary timestep, one expert none")

    @classmethod
    def of(cls, info: dict) -> Experts:
        """The experts a model's JSON facts name (``info["experts"]``, ``info["boundary_timestep"]``; one
        ``transformer`` when absent)."""
        return cls(tuple(info.get("experts") or ("transformer",)), info.get("boundary_timestep"))

    def index(self, t) -> int:
        """0 (``names[0]``, high noise) or 1 (``names[1]``) for timestep ``t`` (a number or 0-d tensor),
        compared as WanPipeline compares it: ``t >= boundary_timestep`` -> 0."""
        if self.boundary_timestep is None or bool(t >= self.boundary_timestep):
            return 0
        return 1

    def guidance_scale(self, t, guidance_scale: float, guidance_scale_2: float | None) -> float:
        """The CFG scale of timestep ``t``: ``guidance_scale`` for expert 0, ``guidance_scale_2`` (None:
        ``guidance_scale``) for expert 1."""
        if self.index(t) == 1 and guidance_scale_2 is not None:
            return guidance_scale_2
        return guidance_scale


def expert_problems(cfg, info: dict) -> list[str]:
    """Config keys that need a two-expert model: ``sampling.guidance_scale_2`` set with one expert (as
    WanPipeline refuses it without ``boundary_ratio``). One line each; [] when it fits."""
    value = getattr(cfg.sampling, "guidance_scale_2", None)
    if value is not None and len(Experts.of(info).names) < 2:
        return [f"sampling.guidance_scale_2={value!r} needs a two-expert model (Wan2.2 A14B: transformer_2 and "
                f"boundary_ratio in model_index.json); {info.get('model_id', 'this model')} has one transformer; "
                "allowed: null"]
    return []
