"""Loading diffusers components from a local folder, and tiny model presets for CPU tests."""

from hpcvideo.models.tiny import TINY_VERSION, build_tiny_wan, ensure_tiny_wan
from hpcvideo.models.wan import WanComponents, encode_prompts, load_wan, load_wan_transformer_stage, read_model_info

__all__ = [
    "TINY_VERSION",
    "WanComponents",
    "build_tiny_wan",
    "encode_prompts",
    "ensure_tiny_wan",
    "load_wan",
    "load_wan_transformer_stage",
    "read_model_info",
]
