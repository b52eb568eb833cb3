"""Video-Infinity (arXiv 2406.16260): clip parallelism with dual-scope attention, for UNet3D and Wan.

Four nouns: :class:`~.clips.ClipLayout` (which frames a rank owns), :class:`~.clips.ClipComm` (halos,
the global set and GroupNorm sums between clips), the patches (:mod:`.unet3d`, :mod:`.wan`: reversible
apply/remove transforms of the stock diffusers models) and the executor (:mod:`.executor`: one
denoising step of all clips per tick, driven by :mod:`hpcvideo.runner`). The
single-process executor of the same algorithm is the patch on one rank whose clip is the whole video
(:mod:`.reference`).
"""

from .clips import ClipComm, ClipLayout, DualScope, global_frame_indices
from .reference import patched, reference_forward
from .unet3d import apply_video_infinity_unet3d, remove_video_infinity_unet3d
from .wan import apply_video_infinity_wan, remove_video_infinity_wan

__all__ = [
    "ClipComm", "ClipLayout", "DualScope", "apply_video_infinity_unet3d", "apply_video_infinity_wan",
    "global_frame_indices", "patched", "reference_forward", "remove_video_infinity_unet3d", "remove_video_infinity_wan",
]
