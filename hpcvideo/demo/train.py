"""Train the demo model on synthetic motion clips (``hpcvideo train-demo``); CPU, about an hour on one thread.

Five stages, each checkpointed under ``--work-dir`` so an interrupted run continues where it stopped
(rerun the same command):

1. **VAE** (AutoencoderKLWan, :mod:`hpcvideo.demo.model`), made *chunk-local* first
   (:func:`make_chunk_local`: latent frame k depends only on pixel frames 4k-3..4k and decodes to them
   alone, so what short windows train is what a 1,000-frame streaming decode uses): shape-weighted MSE
   reconstruction of the decoded posterior mean (decoded without the output clamp, see
   :func:`_decode_unclamped`; the KL term is logged, its weight is 0, see :func:`train_vae`), on random
   32 x 32 crops of 5-frame windows (the causal first frame + one 4-frame chunk) of the 64 x 64 clips;
   biases start at zero (:func:`_init_vae_for_training`); AdamW at 4e-4 (1e-3 and above sat at the
   mean colour for hundreds of steps). Convolutional, so it then works on whole frames of any size.
1b. **VAE motion** (``vae_motion_steps``, stream key 5, half the learning rate): the same training
   with the pixels that the motion inside a 4-frame chunk changes weighted ``motion_weight`` more
   (:func:`_within_chunk_change`). After stage 1 the decoder drew each chunk's shape still and jumped
   to the next chunk (0.2 px of the 3.3 px a shape moves within a chunk); after this stage the latent
   carries the motion (5.0 px, measured on 24 clips), so a latent frame shows which way its shape moves
   and the transformer can tie that to the caption's direction word.
2. **Latents**: the posterior means of ``num_clips`` whole clips (21 frames, 64 x 64 -> 16 x 6 x 8 x 8),
   normalised per channel; the statistics become the VAE's ``latents_mean`` / ``latents_std`` (as
   in Wan2.1), so ``WanPipeline`` and :mod:`hpcvideo.decode` un-normalise them.
3. **Transformer** (WanTransformer3DModel): rectified-flow matching as Wan2.1 is trained. Timesteps
   are drawn with diffusers' ``compute_density_for_timestep_sampling`` (logit-normal) over the
   shifted sigmas of ``FlowMatchEulerDiscreteScheduler(shift=3)``; ``x_t = (1 - sigma) x_0 + sigma
   noise``; the target is ``noise - x_0`` (what a Wan transformer predicts, ``flow_prediction``).
   Text goes through the model's own tokenizer + UMT5 encoder via ``WanPipeline.encode_prompt``
   (exactly what inference does); 10% of captions are replaced by "" so that classifier-free
   guidance with the empty negative prompt works. The squared error is weighted by ``1 +
   transformer_shape_weight x`` the shape's coverage of each latent pixel (:func:`latent_coverage`).
   An EMA of the weights is what gets saved.
4. **Decoder refinement** (:func:`train_decoder`): more steps on the decoder alone with the encoder
   frozen; the latents of stage 2 do not change, so this stage is independent of stage 3 (it can run
   beside it in a second process on the same work dir: both compute the same checkpoints).

Deterministic from ``--seed``: data indices, crops, noise and timesteps come from generators seeded
by (seed, stage, step); with one torch thread, reruns give the same weights bit for bit.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from . import data, model

log = logging.getLogger("hpcvideo.demo")


def _gen(seed: int, *keys: int) -> torch.Generator:
    """A torch generator that is a pure function of (seed, keys)."""
    mixed = int(np.random.default_rng([seed, *keys]).integers(2**62))
    return torch.Generator().manual_seed(mixed)


def _save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


# --------------------------------------------------------------------------------------------- VAE


@torch.no_grad()
def _init_vae_for_training(vae, *, bottleneck_gain: float = 5.0) -> None:
    """Zero every bias and scale the 1x1 convolutions around the latent by ``bottleneck_gain``.

    At diffusers' default init the Wan VAE's per-pixel RMS norms see features dominated by the
    (input-independent) biases and the latent carries a tiny signal (across-image std 0.02 of 0.16):
    the small VAE then sat at a constant output (L1 0.27) for hundreds of steps. With this init it
    starts using the latent after ~80 steps (measured on one batch)."""
    for name, param in vae.named_parameters():
        if name.endswith("bias"):
            param.zero_()
    vae.quant_conv.weight.mul_(bottleneck_gain)
    vae.post_quant_conv.weight.mul_(bottleneck_gain)


def make_chunk_local(vae) -> int:
    """Zero, and keep at zero during training, every temporal tap of ``vae`` that reaches an earlier
    4-frame chunk, so that latent frame k depends only on pixel frames [4k - 3, 4k] and decodes to them
    alone (a chunk-local AutoencoderKLWan). Returns the number of convolutions changed.

    Why: AutoencoderKLWan's causal 3-D convolutions carry a feature cache from chunk to chunk, so its
    decoder's temporal receptive field is tens of latent frames. Trained on a few chunks (all the CPU
    budget allows), the part of that field it never saw drifts: a first attempt trained on 9-frame
    windows decoded frames 11-21 of a 21-frame clip as garbage, and hpcvideo streams 250+ latent
    frames through that cache. Chunk-local weights have no such field: what 5-frame windows (the
    first chunk + one full chunk) train is exactly what any length uses. Same classes, same folder
    format, same streaming decode (the cache then holds only zero-weighted frames).

    * every stride-1 causal convolution with temporal kernel 3 (two past taps + the current frame):
      only the current frame's tap is kept (the spatial 3 x 3 part is untouched);
    * the decoder's temporal upsamplers (``time_conv``, kernel 3, two past taps): the current tap only;
    * the encoder's temporal downsamplers (``time_conv``, kernel 3, stride 2 over [last frame of the
      previous chunk, frames of this chunk]): the first tap is dropped, so each output reads a pair of
      this chunk's frames ([x0, x1], [x2, x3]).
    """
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    changed = 0
    for module in vae.modules():
        if not isinstance(module, WanCausalConv3d) or module.kernel_size[0] == 1:
            continue
        if module.kernel_size[0] != 3:
            raise ValueError(f"make_chunk_local: temporal kernel {module.kernel_size[0]} (expected 1 or 3)")
        mask = torch.ones_like(module.weight)  # (out, in, kt, kh, kw)
        if module.stride[0] == 1:
            mask[:, :, :2] = 0.0  # taps t-2, t-1
        else:  # stride-2 downsampler: taps [prev, x0, x1] -> [x0, x1]
            mask[:, :, :1] = 0.0
        with torch.no_grad():
            module.weight.mul_(mask)
        if not getattr(module.weight, "_chunk_local", False):
            module.weight.register_hook(lambda grad, mask=mask: grad * mask)
            module.weight._chunk_local = True
        changed += 1
    return changed


def _decode_unclamped(vae, z: torch.Tensor) -> torch.Tensor:
    """``vae.decode(z).sample`` without its final clamp to [-1, 1]: (B, z, T, h, w) -> (B, 3, 1 + 4 (T - 1), 8h, 8w).

    The clamp has zero gradient outside [-1, 1]; early in training whole regions saturate there and
    the small VAE never recovers (constant output). Same frame-by-frame causal decode as diffusers'
    ``AutoencoderKLWan._decode`` (the decoder's own feature cache), so inference equals training."""
    vae.clear_cache()
    x = vae.post_quant_conv(z)
    frames = []
    for i in range(x.shape[2]):
        vae._conv_idx = [0]
        frames.append(vae.decoder(x[:, :, i : i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx,
                                  first_chunk=i == 0))
    vae.clear_cache()
    return torch.cat(frames, dim=2)


def train_vae(vae, *, seed: int, num_steps: int, batch_size: int, lr: float, work_dir: Path,
              kl_weight: float = 0.0, shape_weight: float = 0.0, motion_weight: float = 0.0, crop_px: int = 32,
              window_frames: int = 5, log_every: int = 25, zero_bias_init: bool = True, chunk_local: bool = True,
              stage: str = "vae", stream: int = 1) -> list:
    """Train ``vae`` in place; returns the loss log [(step, l1, kl, seconds)]. Checkpoints every 100 steps
    to ``work_dir / f"{stage}_ckpt.pt"``; batches come from the random stream (seed, ``stream``, step).

    ``kl_weight`` defaults to 0 (the KL is logged, the latents are normalised afterwards): with Adam
    even a 1e-4 KL term drove the latent to zero while the decoder was not yet using it (posterior
    collapse within 150 steps), whereas without it the decoder starts using the latent after ~80 steps.

    The squared error of each pixel is weighted by ``1 + shape_weight * coverage + motion_weight *
    |coverage - mean coverage of its 4-frame chunk|``: the second term weights the pixels that a latent
    without the motion inside its chunk gets wrong (measured: after the plain stage the decoder drew the
    shape still for 4 frames and then jumped, 0-0.4 px of the 2.4-4 px a chunk moves)."""
    ckpt_path = work_dir / f"{stage}_ckpt.pt"
    if zero_bias_init:
        _init_vae_for_training(vae)
    if chunk_local:
        make_chunk_local(vae)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    step, history = 0, []
    if ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, weights_only=False)
        vae.load_state_dict(ckpt["vae"])
        opt.load_state_dict(ckpt["opt"])
        step, history = ckpt["step"], ckpt["history"]
        log.info("%s: resumed at step %d", stage, step)
    vae.train()
    t0 = time.time() - (history[-1][3] if history else 0.0)
    while step < num_steps:
        rng = np.random.default_rng([seed, stream, step])
        indices = rng.integers(0, 2**31, size=batch_size)
        video, _, coverage = data.make_batch(seed, indices, num_frames=data_frames(window_frames), return_coverage=True)
        f0 = rng.integers(0, video.shape[2] - window_frames + 1)
        y0, x0 = rng.integers(0, video.shape[3] - crop_px + 1, size=2)
        x = torch.from_numpy(np.ascontiguousarray(
            video[:, :, f0:f0 + window_frames, y0:y0 + crop_px, x0:x0 + crop_px])).float()  # (B, 3, T, h, w)
        weight = _pixel_weight(torch.from_numpy(np.ascontiguousarray(
            coverage[:, None, f0:f0 + window_frames, y0:y0 + crop_px, x0:x0 + crop_px])),  # (B, 1, T, h, w)
            shape_weight, motion_weight)
        for group in opt.param_groups:  # cosine decay to 10%
            group["lr"] = lr * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / num_steps)))
        posterior = vae.encode(x).latent_dist
        # Decode the posterior mean (what encode_latents gives the transformer). Sampling z with the
        # initial posterior std of ~1 drowned the small initial means and collapsed the posterior in
        # a first try (constant output after 100 steps); the KL term still bounds the latents' scale.
        recon = _decode_unclamped(vae, posterior.mean)
        l1 = (recon - x).abs().mean()  # logged
        kl = 0.5 * (posterior.mean.pow(2) + posterior.var - 1.0 - posterior.logvar).mean()
        # MSE, not L1: at the start the decoder outputs one colour, where L1's gradient (the sign of
        # the error) balances out at the median and the small VAE stayed there for 250+ steps
        # the shapes cover ~5% of the pixels: ``shape_weight`` makes the small VAE learn them early
        ((weight * (recon - x).pow(2)).mean() + kl_weight * kl).backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step % log_every == 0 or step == num_steps:
            history.append((step, l1.item(), kl.item(), round(time.time() - t0, 1)))
            log.info("%s step %d/%d  l1 %.4f  kl %.3f  %.0fs", stage, step, num_steps, *history[-1][1:3],
                     time.time() - t0)
        if step % 100 == 0 or step == num_steps:
            _save_atomic({"vae": vae.state_dict(), "opt": opt.state_dict(), "step": step, "history": history}, ckpt_path)
    return history


def _within_chunk_change(cov: torch.Tensor) -> torch.Tensor:
    """|coverage - its 4-frame chunk's mean| for (B, 1, T, h, w) windows whose frame 0 is the causal
    first frame (a chunk of its own) and frames 1-4, 5-8, ... the following chunks."""
    out = torch.zeros_like(cov)
    for start in range(1, cov.shape[2], 4):
        chunk = cov[:, :, start:start + 4]
        out[:, :, start:start + 4] = (chunk - chunk.mean(dim=2, keepdim=True)).abs()
    return out


def _pixel_weight(cov: torch.Tensor, shape_weight: float, motion_weight: float) -> torch.Tensor:
    """Per-pixel loss weight ``1 + shape_weight * cov + motion_weight * |cov - chunk mean|`` (see
    :func:`train_vae`) of shape coverage ``cov`` (B, 1, T, h, w)."""
    weight = 1.0 + shape_weight * cov
    if motion_weight:
        weight = weight + motion_weight * _within_chunk_change(cov)
    return weight


def train_decoder(vae, *, seed: int, num_steps: int, batch_size: int, lr: float, work_dir: Path,
                  shape_weight: float = 4.0, motion_weight: float = 0.0, crop_px: int = 32, window_frames: int = 5,
                  log_every: int = 50) -> list:
    """Refine ``vae``'s decoder (and ``post_quant_conv``) with the encoder frozen; returns [(step, l1, s)].

    The encoder, hence every latent the transformer is trained on, stays exactly as stage 1b left it,
    so this stage may run before, after or beside the transformer stage and gives the same weights.
    Same loss and data as :func:`train_vae` (fresh batches: stream key 4). Checkpoints every 100 steps
    to ``decoder_ckpt.pt``; a finished checkpoint is loaded as is."""
    ckpt_path = work_dir / "decoder_ckpt.pt"
    make_chunk_local(vae)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    step, history = 0, []
    if ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, weights_only=False)
        vae.load_state_dict(ckpt["vae"])
        opt.load_state_dict(ckpt["opt"])
        step, history = ckpt["step"], ckpt["history"]
        log.info("decoder: resumed at step %d", step)
    vae.train()
    t0 = time.time() - (history[-1][2] if history else 0.0)
    while step < num_steps:
        rng = np.random.default_rng([seed, 4, step])
        video, _, coverage = data.make_batch(seed, rng.integers(0, 2**31, size=batch_size),
                                             num_frames=data_frames(window_frames), return_coverage=True)
        f0 = rng.integers(0, video.shape[2] - window_frames + 1)
        y0, x0 = rng.integers(0, video.shape[3] - crop_px + 1, size=2)
        window = (slice(None), slice(None), slice(f0, f0 + window_frames), slice(y0, y0 + crop_px),
                  slice(x0, x0 + crop_px))
        x = torch.from_numpy(np.ascontiguousarray(video[window])).float()
        weight = _pixel_weight(torch.from_numpy(np.ascontiguousarray(coverage[:, None][window])), shape_weight,
                               motion_weight)
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / num_steps)))
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mean
        recon = _decode_unclamped(vae, z)
        (weight * (recon - x).pow(2)).mean().backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step % log_every == 0 or step == num_steps:
            history.append((step, (recon - x).abs().mean().item(), round(time.time() - t0, 1)))
            log.info("decoder step %d/%d  l1 %.4f  %.0fs", step, num_steps, history[-1][1], time.time() - t0)
        if step % 100 == 0 or step == num_steps:
            _save_atomic({"vae": vae.state_dict(), "opt": opt.state_dict(), "step": step, "history": history}, ckpt_path)
    return history


def data_frames(window_frames: int) -> int:
    """Frames rendered per VAE training clip: the window plus room for a random start."""
    return window_frames + 4


@torch.no_grad()
def encode_latents(vae, *, seed: int, num_clips: int, batch_size: int = 8):
    """Posterior means of clips 0..num_clips-1 (native window): ((N, z, 6, 8, 8) float32, N captions)."""
    vae.eval()
    latents, captions = [], []
    for start in range(0, num_clips, batch_size):
        video, caps = data.make_batch(seed, range(start, min(start + batch_size, num_clips)),
                                      num_frames=model.NUM_FRAMES, height=model.HEIGHT, width=model.WIDTH)
        latents.append(vae.encode(torch.from_numpy(video).float()).latent_dist.mean)
        captions += caps
    return torch.cat(latents), captions


def latent_coverage(seed: int, num_clips: int, *, batch_size: int = 64) -> torch.Tensor:
    """Shape coverage of clips 0..num_clips-1 (:func:`hpcvideo.demo.data.make_batch`) on the latent grid:
    float32 (N, 1, 6, 8, 8) in [0, 1].

    Latent frame 0 covers pixel frame 0 and latent frame k > 0 frames 4k-3..4k (the chunk-local VAE);
    each latent pixel is the mean coverage of its 8 x 8 pixels over those frames."""
    out = []
    for start in range(0, num_clips, batch_size):
        _, _, cov = data.make_batch(seed, range(start, min(start + batch_size, num_clips)), num_frames=model.NUM_FRAMES,
                                    height=model.HEIGHT, width=model.WIDTH, return_coverage=True)  # (B, F, H, W)
        chunks = [cov[:, :1]] + [cov[:, f:f + 4] for f in range(1, model.NUM_FRAMES, 4)]
        b, h, w = cov.shape[0], model.HEIGHT // 8, model.WIDTH // 8
        pooled = [chunk.mean(axis=1).reshape(b, h, 8, w, 8).mean(axis=(2, 4)) for chunk in chunks]  # (B, h, w) each
        out.append(torch.from_numpy(np.stack(pooled, axis=1))[:, None])  # (B, 1, 6, h, w)
    return torch.cat(out)


# ------------------------------------------------------------------------------------- transformer


@torch.no_grad()
def encode_captions(tokenizer, text_encoder, captions) -> dict:
    """{caption: (max_sequence_length, text_dim) tensor} through ``WanPipeline.encode_prompt`` (as inference)."""
    from diffusers import WanPipeline

    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=None, scheduler=model.build_scheduler(),
                       transformer=None)
    out = {}
    for caption in sorted(set(captions)):
        embeds, _ = pipe.encode_prompt(prompt=caption, do_classifier_free_guidance=False,
                                       max_sequence_length=model.MAX_SEQUENCE_LENGTH, device="cpu",
                                       dtype=torch.float32)
        out[caption] = embeds[0]
    return out


def train_transformer(transformer, latents, captions, embeds, *, seed: int, num_steps: int, batch_size: int,
                      lr: float, work_dir: Path, drop_caption: float = 0.1, log_every: int = 100,
                      ema_decay: float = 0.999, coverage: torch.Tensor | None = None, shape_weight: float = 0.0):
    """Flow-matching training of ``transformer`` on normalised ``latents`` (N, z, T, h, w).

    With ``coverage`` (N, 1, T, h, w) (:func:`latent_coverage`) the squared error of each latent pixel
    is weighted by ``1 + shape_weight * coverage``: the shape, whose place and motion the caption
    describes, covers ~5% of the latent grid. Measured on the latents of a VAE without the motion stage
    (8,000 steps; loss with the opposite direction word / with the right one - 1, at sigma 0.85):
    plain MSE 0.6%, shape weight 4 0.9%, shape weight 12 0.25%. With the motion stage's latents and
    shape weight 4 (the shipped model): 56%. The weight helps a little; the latents decide.

    Returns (EMA model with the averaged weights copied into a transformer, loss log [(step, loss, s)]).
    Checkpoints every 250 steps.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import EMAModel, compute_density_for_timestep_sampling

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    timesteps, sigmas = sched.timesteps.clone(), sched.sigmas[:-1].clone()  # (1000,) each, sigma 1 -> ~0
    ckpt_path = work_dir / "transformer_ckpt.pt"
    opt = torch.optim.AdamW(transformer.parameters(), lr=lr, weight_decay=0.01)
    ema = EMAModel(transformer.parameters(), decay=ema_decay)
    step, history = 0, []
    if ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, weights_only=False)
        transformer.load_state_dict(ckpt["transformer"])
        opt.load_state_dict(ckpt["opt"])
        ema.load_state_dict(ckpt["ema"])
        step, history = ckpt["step"], ckpt["history"]
        log.info("transformer: resumed at step %d", step)
    empty = embeds[""]
    transformer.train()
    t0 = time.time() - (history[-1][2] if history else 0.0)
    running = []
    while step < num_steps:
        g = _gen(seed, 3, step)
        idx = torch.randint(0, latents.shape[0], (batch_size,), generator=g)
        x0 = latents[idx]  # (B, z, T, h, w)
        drop = torch.rand(batch_size, generator=g) < drop_caption
        text = torch.stack([empty if d else embeds[captions[i]] for i, d in zip(idx.tolist(), drop.tolist())])
        u = compute_density_for_timestep_sampling("logit_normal", batch_size, logit_mean=0.0, logit_std=1.0,
                                                  generator=g)
        k = (u * len(timesteps)).long().clamp(max=len(timesteps) - 1)
        sigma = sigmas[k].view(-1, 1, 1, 1, 1)
        noise = torch.randn(x0.shape, generator=g)
        noisy = (1.0 - sigma) * x0 + sigma * noise
        warm = min(1.0, (step + 1) / 200)
        for group in opt.param_groups:
            group["lr"] = lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / num_steps)))
        pred = transformer(noisy, timestep=timesteps[k], encoder_hidden_states=text, return_dict=False)[0]
        if coverage is not None and shape_weight:
            weight = 1.0 + shape_weight * coverage[idx]  # (B, 1, T, h, w)
            loss = (weight * (pred - (noise - x0)).pow(2)).mean() / weight.mean()
        else:
            loss = torch.nn.functional.mse_loss(pred, noise - x0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.step(transformer.parameters())
        step += 1
        running.append(loss.item())
        if step % log_every == 0 or step == num_steps:
            history.append((step, float(np.mean(running)), round(time.time() - t0, 1)))
            running = []
            log.info("transformer step %d/%d  loss %.4f  %.0fs", step, num_steps, history[-1][1], time.time() - t0)
        if step % 250 == 0 or step == num_steps:
            _save_atomic({"transformer": transformer.state_dict(), "opt": opt.state_dict(), "ema": ema.state_dict(),
                          "step": step, "history": history}, ckpt_path)
    ema.copy_to(transformer.parameters())
    return transformer.eval(), history


# ----------------------------------------------------------------------------------------- driver


def train_demo(output, *, work_dir=None, seed: int = 0, vae_steps: int = 1200, num_clips: int = 1536,
               transformer_steps: int = 8000, vae_batch_size: int = 8, batch_size: int = 16, vae_lr: float = 4e-4,
               vae_window_frames: int = 5, shape_weight: float = 4.0, lr: float = 1e-3, decoder_steps: int = 1200,
               transformer_shape_weight: float = 4.0, vae_motion_steps: int = 600, motion_weight: float = 16.0,
               num_threads: int = 1) -> Path:
    """Run the four stages and save the diffusers folder at ``output``; returns its path.

    Writes ``training_log.json`` (losses, seconds, settings) next to the weights. The defaults are
    about 58 minutes of one CPU thread (VAE ~19, latents ~1-3, transformer ~22, decoder ~15).
    """
    torch.set_num_threads(num_threads)
    torch.manual_seed(seed)
    output = Path(output)
    work_dir = Path(work_dir) if work_dir is not None else output.with_name(output.name + ".work")
    work_dir.mkdir(parents=True, exist_ok=True)
    settings = dict(seed=seed, vae_steps=vae_steps, num_clips=num_clips, transformer_steps=transformer_steps,
                    vae_batch_size=vae_batch_size, batch_size=batch_size, vae_lr=vae_lr,
                    vae_window_frames=vae_window_frames, shape_weight=shape_weight, lr=lr, decoder_steps=decoder_steps,
                    transformer_shape_weight=transformer_shape_weight, vae_motion_steps=vae_motion_steps,
                    motion_weight=motion_weight)
    t_start = time.time()

    vae = model.build_vae(seed=seed)
    vae_history = train_vae(vae, seed=seed, num_steps=vae_steps, batch_size=vae_batch_size, lr=vae_lr,
                            work_dir=work_dir, window_frames=vae_window_frames, shape_weight=shape_weight)
    motion_history = []
    if vae_motion_steps:
        motion_history = train_vae(vae, seed=seed, num_steps=vae_motion_steps, batch_size=vae_batch_size,
                                   lr=vae_lr / 2, work_dir=work_dir, window_frames=vae_window_frames,
                                   shape_weight=shape_weight, motion_weight=motion_weight, zero_bias_init=False,
                                   stage="vae_motion", stream=5)
    t_vae = time.time() - t_start

    latents_path = work_dir / "latents.pt"
    if latents_path.is_file():
        cached = torch.load(latents_path, weights_only=False)
        latents, captions = cached["latents"], cached["captions"]
    else:
        latents, captions = encode_latents(vae, seed=seed + 1, num_clips=num_clips)  # clips unseen by the VAE
        _save_atomic({"latents": latents, "captions": captions}, latents_path)
    coverage = None
    if transformer_shape_weight:
        coverage_path = work_dir / "coverage.pt"
        if coverage_path.is_file():
            coverage = torch.load(coverage_path, weights_only=True)
        else:
            coverage = latent_coverage(seed + 1, num_clips)
            _save_atomic(coverage, coverage_path)
    mean = latents.mean(dim=(0, 2, 3, 4))  # (z,)
    std = latents.std(dim=(0, 2, 3, 4))
    vae.register_to_config(latents_mean=[round(float(m), 5) for m in mean],
                           latents_std=[round(float(s), 5) for s in std])
    latents = (latents - mean.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1)
    t_latents = time.time() - t_start - t_vae

    tokenizer = model.build_tokenizer()
    text_encoder = model.build_text_encoder(len(tokenizer), seed=seed)
    embeds = encode_captions(tokenizer, text_encoder, list(captions) + [""])
    transformer = model.build_transformer(seed=seed)
    transformer, dit_history = train_transformer(transformer, latents, captions, embeds, seed=seed,
                                                 num_steps=transformer_steps, batch_size=batch_size, lr=lr,
                                                 work_dir=work_dir, coverage=coverage,
                                                 shape_weight=transformer_shape_weight)
    t_dit = time.time() - t_start - t_vae - t_latents

    decoder_history = []
    if decoder_steps:
        decoder_history = train_decoder(vae, seed=seed, num_steps=decoder_steps, batch_size=vae_batch_size,
                                        lr=vae_lr, work_dir=work_dir, window_frames=vae_window_frames,
                                        shape_weight=shape_weight, motion_weight=motion_weight)
    t_decoder = time.time() - t_start - t_vae - t_latents - t_dit

    tmp = output.with_name(output.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_folder(tmp, tokenizer=tokenizer, text_encoder=text_encoder, vae=vae.eval(), transformer=transformer)
    (tmp / "training_log.json").write_text(json.dumps({
        "settings": settings, "torch_threads": num_threads,
        # training seconds of each stage as its checkpoints recorded them (a resumed stage keeps its
        # earlier time); the latents' seconds are those of this process
        "seconds": {"vae": vae_history[-1][3] if vae_history else 0.0,
                    "vae_motion": motion_history[-1][3] if motion_history else 0.0,
                    "latents": round(t_latents, 1),
                    "transformer": dit_history[-1][2] if dit_history else 0.0,
                    "decoder": decoder_history[-1][2] if decoder_history else 0.0},
        "seconds_this_process": {"vae": round(t_vae, 1), "latents": round(t_latents, 1),
                                 "transformer": round(t_dit, 1), "decoder": round(t_decoder, 1)},
        "vae_loss": [{"step": s, "l1": round(a, 5), "kl": round(b, 4), "s": t} for s, a, b, t in vae_history],
        "vae_motion_loss": [{"step": s, "l1": round(a, 5), "s": t} for s, a, _, t in motion_history],
        "transformer_loss": [{"step": s, "mse": round(a, 5), "s": t} for s, a, t in dit_history],
        "decoder_loss": [{"step": s, "l1": round(a, 5), "s": t} for s, a, t in decoder_history],
    }, indent=1))
    shutil.rmtree(output, ignore_errors=True)
    tmp.replace(output)
    log.info("saved %s (%.0f s)", output, time.time() - t_start)
    return output


def run_from_args(args) -> Path:
    """``hpcvideo train-demo``: options of :func:`hpcvideo.demo.add_arguments`.

    Raises :class:`hpcvideo.config.ConfigError` for an ``--output`` inside the installed package."""
    from . import default_output, output_problem
    from ..config import ConfigError

    output = Path(args.output).expanduser() if args.output else default_output()
    problem = output_problem(output)
    if problem is not None:
        raise ConfigError([problem])
    return train_demo(output, work_dir=args.work_dir, seed=args.seed, vae_steps=args.vae_steps,
                      num_clips=args.num_clips, transformer_steps=args.transformer_steps,
                      decoder_steps=args.decoder_steps, transformer_shape_weight=args.transformer_shape_weight,
                      vae_motion_steps=args.vae_motion_steps, motion_weight=args.motion_weight,
                      num_threads=args.threads)
