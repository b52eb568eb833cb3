"""Wan image-to-video checkpoints (diffusers' ``WanImageToVideoPipeline`` without ``expand_timesteps``): the
image's CLIP features and the condition channels, computed as the pipeline computes them.

Layout: the transformer takes ``in_channels = 2 * z_dim + 4``: the latents (z_dim), then 4 mask channels
and z_dim channels of the VAE latent of the "condition video" (the image, then black frames). Wan2.1-I2V
also has ``image_encoder/`` (CLIPVisionModel) and ``image_processor/``: the image's penultimate CLIP hidden
states go through the transformer's image embedder and are put before the text tokens of every
cross-attention (added K/V); Wan2.2-I2V has no image encoder.

For a video longer than one clip the condition video is the image followed by black frames up to the
video's end, as one clip of that length would have: the mask is 1 on latent frame 0 only, and the
condition latents past the image reach a fixed point (the VAE encoder's causal caches stop changing once
they only hold black frames), after which every latent frame is the same; so only the frames up to that
point are encoded (:class:`ConditionChannels`). A one-block video equals the pipeline bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import torch


def load_image(path):
    """The image as diffusers' ``load_image`` gives it (PIL, RGB)."""
    from diffusers.utils import load_image as diffusers_load_image

    return diffusers_load_image(str(path))


@torch.no_grad()
def encode_image_clip(model_path, image_path, *, device) -> torch.Tensor:
    """The image's CLIP features (1, tokens, image_dim) float32, as ``WanImageToVideoPipeline.encode_image``:
    ``image_processor(images=image)`` then the penultimate hidden states of ``image_encoder`` (both loaded
    from ``model_path``, float32, offline)."""
    from transformers import AutoImageProcessor, CLIPVisionModel

    model_path = Path(model_path)
    processor = AutoImageProcessor.from_pretrained(model_path / "image_processor", local_files_only=True)
    encoder = CLIPVisionModel.from_pretrained(model_path / "image_encoder", local_files_only=True).to(device).eval()
    inputs = processor(images=load_image(image_path), return_tensors="pt").to(device)
    return encoder(**inputs, output_hidden_states=True).hidden_states[-2].float()


class ConditionChannels:
    """The condition channels (1, 4 + z_dim, F, h, w) float32 of any window of the video.

    Built from the image file on the ranks that assemble model inputs: the condition video [image, black
    frames] is encoded chunk by chunk as ``AutoencoderKLWan._encode`` does (first frame alone, then 4 frames
    per latent frame), until the video's ``num_latent_frames`` or the encoder's causal caches repeat
    exactly; later latent frames equal the last one encoded. Normalised with the VAE's latents_mean/std.
    """

    def __init__(self, vae, image_path, *, height: int, width: int, num_latent_frames: int, device) -> None:
        from diffusers.video_processor import VideoProcessor

        scale = 2 ** len(vae.config.temperal_downsample) * int(vae.config.patch_size or 1)
        image = VideoProcessor(vae_scale_factor=scale).preprocess(load_image(image_path), height=height, width=width)
        image = image.to(device, dtype=torch.float32).unsqueeze(2).to(device=vae.device, dtype=vae.dtype)
        self.latents = self._encode(vae, image, num_latent_frames).to(device=device, dtype=torch.float32)
        z_dim = vae.config.z_dim
        mean = torch.tensor(vae.config.latents_mean).view(1, z_dim, 1, 1, 1).to(self.latents.device, self.latents.dtype)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z_dim, 1, 1, 1).to(self.latents.device,
                                                                                             self.latents.dtype)
        self.latents = (self.latents - mean) * inv_std  # (1, z, K, h, w), K <= num_latent_frames
        self.num_latent_frames = num_latent_frames

    @staticmethod
    @torch.no_grad()
    def _encode(vae, image: torch.Tensor, num_latent_frames: int) -> torch.Tensor:
        """The posterior mode of [image, black frames] (1, z, K, h, w): ``_encode``'s loop and quant_conv."""
        from diffusers.models.autoencoders.autoencoder_kl_wan import patchify

        vae.clear_cache()
        black = torch.zeros_like(image).expand(-1, -1, 4, -1, -1)
        outs, previous = [], None
        for i in range(num_latent_frames):
            x = image if i == 0 else black
            if vae.config.patch_size is not None:
                x = patchify(x, patch_size=vae.config.patch_size)
            vae._enc_conv_idx = [0]
            outs.append(vae.encoder(x, feat_cache=vae._enc_feat_map, feat_idx=vae._enc_conv_idx))
            cache = [c.clone() if isinstance(c, torch.Tensor) else c for c in vae._enc_feat_map]
            if i > 1 and previous is not None and all(
                    (a is b) or (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b))
                    for a, b in zip(cache, previous)) and torch.equal(outs[-1], outs[-2]):
                break  # same caches, same (black) input: every later latent frame equals this one
            previous = cache
        enc = vae.quant_conv(torch.cat(outs, 2))
        vae.clear_cache()
        mu, _ = enc.chunk(2, dim=1)  # DiagonalGaussianDistribution(...).mode() is the mean
        return mu

    def window(self, start: int, count: int) -> torch.Tensor:
        """Condition channels of video latent frames [start, start + count): (1, 4 + z, count, h, w); the mask
        channels are 1 on latent frame 0 (the image), 0 elsewhere."""
        known = self.latents.shape[2]
        index = torch.clamp(torch.arange(start, start + count, device=self.latents.device), max=known - 1)
        latents = self.latents.index_select(2, index)
        mask = torch.zeros((1, 4, count, latents.shape[3], latents.shape[4]), dtype=latents.dtype, device=latents.device)
        if start == 0 and count > 0:
            mask[:, :, 0] = 1.0
        return torch.cat([mask, latents], dim=1)
