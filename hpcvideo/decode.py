"""Streaming Wan VAE decode: latent blocks in, pixel frames out, in order, with a carried causal cache.

``AutoencoderKLWan._decode`` runs the decoder one latent frame at a time; every causal 3-D
convolution keeps the last (up to 2) input frames it saw in a *feature cache* list
(``feat_cache[i]`` is ``None`` before the first frame, the string ``"Rep"`` for the temporal
upsampler after the very first frame, then a tensor (B, C_i, <=2, H_i, W_i)). ``StreamingDecoder``
keeps that list between calls instead of clearing it, so decoding a video block by block gives the
same frames as decoding it whole, and memory stays independent of the video's length.

Frame counts (Wan2.1, temporal factor 4): the video's first latent frame gives 1 pixel frame, every
later one gives 4; so a first block of n latent frames gives 1 + 4(n-1) frames, a later block 4n.

Spatial tiling (``vae.enable_tiling()``) is not supported: tiles are decoded with their own caches
and blended, which cannot be continued across blocks. ``StreamingDecoder`` raises if it is on.

Convolutions on CPU (float32) run through oneDNN (:func:`onednn_convolutions`), whatever their size:
PyTorch picks its own im2col kernel for small inputs (batch 1, fewer than 20,480 values over the first
four dimensions: every convolution of a small VAE), whose sums depend on the number of intra-op threads, so
the frames of the same latents differed between a run on 1 rank (2 threads on a 2-core node) and on 2 ranks
(1 thread each). oneDNN's convolution gives the same bits for any thread count and is ~2.4x faster on one
thread on the demo model's VAE (42.7 vs 102 ms per latent frame). Its results differ from the im2col
kernel's by float rounding (max abs 1.2e-6 on the demo VAE; uint8 frames differ by 1 on ~1.5e-5 of values).
"""

from __future__ import annotations

import contextlib
import types

import numpy as np
import torch

STATE_FORMAT = 1


def _denormalize(vae, latents: torch.Tensor) -> torch.Tensor:
    """Undo the latent normalisation, with the same operations as ``WanPipeline.__call__``."""
    z_dim = vae.config.z_dim
    latents = latents.to(vae.device, dtype=vae.dtype)
    latents_mean = torch.tensor(vae.config.latents_mean).view(1, z_dim, 1, 1, 1).to(latents.device, latents.dtype)
    latents_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z_dim, 1, 1, 1).to(
        latents.device, latents.dtype
    )
    return latents / latents_std + latents_mean


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Reference decode of a whole latent video, as ``WanPipeline`` does it.

    latents: (B, z_dim, num_latent_frames, h, w), normalised (as the transformer produces them).
    Returns (B, 3, num_frames, H, W) in [-1, 1] on the VAE's device, num_frames = 1 + 4 (num_latent_frames - 1).
    """
    return vae.decode(_denormalize(vae, latents), return_dict=False)[0]


def _onednn_eligible(conv: torch.nn.Module) -> bool:
    return (isinstance(conv, (torch.nn.Conv2d, torch.nn.Conv3d)) and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str) and conv.weight.device.type == "cpu"
            and conv.weight.dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and torch.backends.mkldnn.enabled)


def convolution(conv: torch.nn.Module, x: torch.Tensor, padding) -> torch.Tensor:
    """``conv`` (an ``nn.Conv2d`` / ``nn.Conv3d``) applied to ``x`` with zero ``padding`` (one int per spatial
    dimension) in place of its own: through oneDNN where :func:`onednn_convolutions` would use it, else
    ``F.conv2d`` / ``F.conv3d``."""
    if _onednn_eligible(conv):
        return torch.ops.aten.mkldnn_convolution(x.contiguous(), conv.weight, conv.bias, tuple(padding), conv.stride,
                                                 conv.dilation, conv.groups)
    function = torch.nn.functional.conv3d if isinstance(conv, torch.nn.Conv3d) else torch.nn.functional.conv2d
    return function(x, conv.weight, conv.bias, conv.stride, tuple(padding), conv.dilation, conv.groups)


def _onednn_conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``nn.Conv2d`` / ``nn.Conv3d._conv_forward`` (zero padding) through oneDNN: the same convolution."""
    return torch.ops.aten.mkldnn_convolution(x.contiguous(), weight, bias, self.padding, self.stride, self.dilation,
                                             self.groups)


@contextlib.contextmanager
def onednn_convolutions(module: torch.nn.Module):
    """Within the block, the ``nn.Conv2d`` / ``nn.Conv3d`` of ``module`` (zero padding, float32, on CPU) run
    through oneDNN (the module docstring says why); their own ``_conv_forward`` is restored on exit (also on an
    error). A no-op on other devices or dtypes, or where PyTorch has no oneDNN (``torch.backends.mkldnn``)."""
    targets = [conv for conv in module.modules() if _onednn_eligible(conv)]
    try:
        for conv in targets:
            conv._conv_forward = types.MethodType(_onednn_conv_forward, conv)
        yield
    finally:
        for conv in targets:
            conv.__dict__.pop("_conv_forward", None)


def _num_causal_convs(vae) -> int:
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    return sum(isinstance(m, WanCausalConv3d) for m in vae.decoder.modules())


class StreamingDecoder:
    """Decode a Wan latent video block by block, in order, carrying the decoder's causal cache.

    ``decode_block`` must see the latent frames of the video in order, each exactly once; the
    concatenation of its outputs equals :func:`decode_latents` of the whole video (up to float
    rounding of the convolutions: max abs diff ~1e-7 on CPU float32). ``state_dict`` /
    ``load_state_dict`` save and restore the carry-over so a resumed run continues exactly.

    The VAE is moved to ``device`` (a no-op when it is already there) and runs in its own dtype
    (float32, as :func:`hpcvideo.models.load_wan` loads it).
    """

    def __init__(self, vae, *, device="cpu"):
        if getattr(vae, "use_tiling", False):
            raise ValueError(
                "StreamingDecoder does not support VAE tiling (tiles keep separate caches that cannot be "
                "carried across blocks); call vae.disable_tiling() first"
            )
        self.device = torch.device(device)
        self.vae = vae.to(self.device).eval()  # a no-op when it is already there
        self.num_convs = _num_causal_convs(vae)
        self.temporal_factor = 2 ** sum(bool(x) for x in vae.config.temperal_downsample)
        self.num_latent_frames_decoded = 0
        self._feat_cache: list = [None] * self.num_convs

    def reset(self) -> None:
        """Forget the carried cache; the next block is the start of a new video."""
        self.num_latent_frames_decoded = 0
        self._feat_cache = [None] * self.num_convs

    def num_frames_for(self, num_latent_frames: int) -> int:
        """Pixel frames that the next block of ``num_latent_frames`` latent frames will give."""
        first = self.num_latent_frames_decoded == 0 and num_latent_frames > 0
        return self.temporal_factor * num_latent_frames - (self.temporal_factor - 1) * int(first)

    @torch.no_grad()
    def decode_block(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode the next block of the video.

        latents: (B, z_dim, n, h, w), normalised, the next n latent frames of the video.
        Returns (B, 3, f, 8h, 8w) float32 in [-1, 1] on ``device``; f = 1 + 4(n-1) for the video's
        first block, 4n after.
        """
        vae = self.vae
        if vae.use_tiling:
            raise ValueError("StreamingDecoder: VAE tiling was enabled after construction; call vae.disable_tiling()")
        if latents.ndim != 5 or latents.shape[1] != vae.config.z_dim:
            raise ValueError(
                f"decode_block: latents must have shape (B, {vae.config.z_dim}, n, h, w); got {tuple(latents.shape)}"
            )
        if latents.shape[2] == 0:
            raise ValueError("decode_block: empty block (0 latent frames)")
        outs = []
        with onednn_convolutions(vae):
            x = vae.post_quant_conv(_denormalize(vae, latents.to(self.device)))  # (B, z, n, h, w), kernel 1
            for i in range(x.shape[2]):
                first_chunk = self.num_latent_frames_decoded == 0
                out = vae.decoder(
                    x[:, :, i : i + 1], feat_cache=self._feat_cache, feat_idx=[0], first_chunk=first_chunk
                )  # (B, 3 * p * p, 1 or 4, H/p, W/p)
                outs.append(out)
                self.num_latent_frames_decoded += 1
        video = torch.cat(outs, dim=2)
        if vae.config.patch_size is not None:
            from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

            video = unpatchify(video, patch_size=vae.config.patch_size)
        return torch.clamp(video, min=-1.0, max=1.0).float()

    def state_dict(self) -> dict:
        """The carry-over, cloned to CPU: loadable with ``torch.load(..., weights_only=True)``."""
        cache = []
        for entry in self._feat_cache:
            if isinstance(entry, torch.Tensor):
                cache.append(entry.detach().to("cpu", copy=True))
            else:
                cache.append(entry)  # None or "Rep"
        return {
            "format": STATE_FORMAT,
            "num_latent_frames_decoded": int(self.num_latent_frames_decoded),
            "num_convs": int(self.num_convs),
            "feat_cache": cache,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a ``state_dict()`` taken from a decoder of the same VAE."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"StreamingDecoder state format {state.get('format')!r}; expected {STATE_FORMAT}")
        cache = list(state["feat_cache"])
        if len(cache) != self.num_convs or state.get("num_convs") != self.num_convs:
            raise ValueError(
                f"StreamingDecoder state has {len(cache)} cache entries; this VAE's decoder has {self.num_convs} "
                "causal convolutions (state from a different VAE?)"
            )
        restored = []
        for entry in cache:
            if isinstance(entry, torch.Tensor):
                restored.append(entry.to(self.device, dtype=self.vae.dtype))
            elif entry is None or entry == "Rep":
                restored.append(entry)
            else:
                raise ValueError(f"StreamingDecoder state: unexpected cache entry of type {type(entry).__name__}")
        self._feat_cache = restored
        self.num_latent_frames_decoded = int(state["num_latent_frames_decoded"])


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """(1, 3, f, H, W) in [-1, 1] -> (f, H, W, 3) uint8, as ``((x / 2 + 0.5).clamp(0, 1) * 255).round()``."""
    if video.ndim != 5 or video.shape[0] != 1 or video.shape[1] != 3:
        raise ValueError(f"to_uint8: expected a video of shape (1, 3, f, H, W); got {tuple(video.shape)}")
    x = ((video[0].detach().float() / 2 + 0.5).clamp(0, 1) * 255).round()  # (3, f, H, W)
    return x.permute(1, 2, 3, 0).to(torch.uint8).cpu().numpy()  # (f, H, W, 3)
