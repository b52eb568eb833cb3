"""Video-Infinity (arXiv 2406.16260): clip parallelism with dual-scope attention, for UNet3D and Wan.

Four nouns: :class:`~.clips.ClipLayout` (which frames a rank owns), :class:`~.clips.ClipComm` (halos,
the global set and GroupNorm sums between clips), the patches (:mod:`.unet3d`, :mod:`.wan`: reversible
apply/remove transforms of the stock diffusers models) and the executor (:mod:`.executor`: one
denoising step of all clips per tick, driven by :mod:`hpcvideo.runner`). The
single-process executor of the same algorithm is the patch on one rank whose clip is the whole video
(:mod:`.reference`).
"""

from importlib import import_module

# The names below import torch: they load on first use, so that the light modules of this package
# (config_rules.py, imported by config validation on a login node) do not pull torch in.
_LAZY = {
    "ClipComm": ".clips", "ClipLayout": ".clips", "DualScope": ".clips", "global_frame_indices": ".clips",
    "patched": ".reference", "reference_forward": ".reference",
    "apply_video_infinity_unet3d": ".unet3d", "remove_video_infinity_unet3d": ".unet3d",
    "apply_video_infinity_wan": ".wan", "remove_video_infinity_wan": ".wan",
}

__all__ = [
    "ClipComm", "ClipLayout", "DualScope", "apply_video_infinity_unet3d", "apply_video_infinity_wan",
    "global_frame_indices", "patched", "reference_forward", "remove_video_infinity_unet3d", "remove_video_infinity_wan",
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
