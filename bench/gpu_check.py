"""One-GPU check of Wan2.1-T2V-1.3B's architecture at 480x832 with random bf16 weights; prints one JSON object.

    python bench/gpu_check.py              # one GPU, at most about 8 minutes (most of it building the model)
    python bench/gpu_check.py --quick      # fewer repeats and steps

On a machine without a CUDA GPU it prints ``{"gpu": null, "status": "no GPU"}`` and exits 0.

Parts (random weights from :data:`hpcvideo.models.arch.ARCHS`, built on the GPU; no files are read):

  stage_forward   one forward of a pipeline stage (blocks 0-7 of 30, the 4-GPU split's rank 0) through
                  hpcvideo's split forward (:mod:`hpcvideo.strategies.dualparal.forward`: embed, the stage's
                  blocks, head) vs the same 8 layers as a plain diffusers ``WanTransformer3DModel`` forward
                  (a model of 8 layers with the same weights), a block of 8 + 2 context latent frames
                  (15600 tokens), CUDA-synchronised, best of N. Goal: ratio <= 1.05; outputs equal.
  parity          a one-block DualParal run (the single-process queue, UniPC, CFG 5) vs diffusers'
                  ``WanPipeline`` on the same block (prompt embeddings and initial latents given), bf16.
                  Tolerance stated in the output: max |diff| / max |latents| <= 2e-2 (bf16 has 8 bits
                  of mantissa; the two run the same kernels in the same order, so they are usually equal).
  memory          peak GPU memory (torch.cuda.max_memory_allocated) of DualParal runs of 2, 4 and 8 blocks
                  (4 steps). Goal: flat once the blocks in flight are min(blocks, steps) (8 vs 4 blocks).
  decode          seconds per pixel frame of the streaming VAE decoder (float32 VAE, a block of 8 latent frames).
  store           MB/s of writing 480x832 uint8 frames into a run store (hpcvideo.store.RunStore).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEIGHT, WIDTH = 480, 832
TOLERANCE = 2e-2
DEVICE = "cuda"
SMOKE = {"num_layers": 8, "num_attention_heads": 2, "attention_head_dim": 12, "ffn_dim": 64, "text_dim": 4096}


def sync() -> None:
    import torch

    if DEVICE == "cuda":
        torch.cuda.synchronize()


def reset_peak() -> None:
    import torch

    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_bytes() -> int:
    import resource

    import torch

    if DEVICE == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # --smoke: the process's peak RSS


def timed(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        out = fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best, out


def build(dtype, smoke: bool = False):
    import torch
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel

    from hpcvideo.models.arch import ARCHS

    spec = ARCHS["wan2.1-t2v-1.3b"]
    with torch.device(DEVICE):
        torch.manual_seed(0)
        transformer = WanTransformer3DModel.from_config({**spec["transformer"], **(SMOKE if smoke else {})}).to(dtype).eval()
        torch.manual_seed(0)
        vae = AutoencoderKLWan.from_config({**spec["vae"], **({"base_dim": 8, "num_res_blocks": 0} if smoke else {})}).eval()
    return transformer, vae, UniPCMultistepScheduler.from_config(spec["scheduler"]).config


def stage_forward(transformer, dtype, repeats: int) -> dict:
    import torch
    from diffusers import WanTransformer3DModel

    from hpcvideo.strategies.dualparal import forward as split

    layers = range(0, 8)
    with torch.device(DEVICE):
        plain = WanTransformer3DModel.from_config({**transformer.config, "num_layers": len(layers)}).to(dtype).eval()
    state = {k: v for k, v in transformer.state_dict().items() if not k.startswith("blocks.") or int(k.split(".")[1]) in layers}
    plain.load_state_dict(state)
    g = torch.Generator(DEVICE).manual_seed(0)
    latents = torch.randn(1, 16, 10, HEIGHT // 8, WIDTH // 8, generator=g, device=DEVICE).to(dtype)
    t = torch.tensor([500.0], device=DEVICE)
    text = torch.randn(1, 512, 4096, generator=g, device=DEVICE).to(dtype)

    @torch.no_grad()
    def ours():
        hidden, inputs = split.embed(transformer, latents, t, text)
        return split.head(transformer, split.run_blocks(transformer, hidden, inputs, layers), inputs)

    @torch.no_grad()
    def theirs():
        return plain(latents, t, text, return_dict=False)[0]

    ours(), theirs()  # warm-up
    a, b = [], []
    for _ in range(repeats):  # alternating
        a.append(timed(ours, 1)[0])
        b.append(timed(theirs, 1)[0])
    same = bool(torch.equal(ours(), theirs()))
    return {"layers": [0, 8], "tokens": 10 * (HEIGHT // 16) * (WIDTH // 16), "hpcvideo_s": round(min(a), 4),
            "diffusers_s": round(min(b), 4), "ratio": round(min(a) / min(b), 4), "goal": "ratio <= 1.05",
            "outputs_equal": same}


def dualparal(transformer, scheduler_config, dtype, *, num_blocks: int, steps: int, n: int = 8, c: int = 2):
    """The single-process DualParal queue on the GPU: (last block's latents, peak bytes, seconds)."""
    import torch

    from hpcvideo.noise import block_noise
    from hpcvideo.schedulers import make_scheduler
    from hpcvideo.strategies.dualparal.reference import DualParalReference

    g = torch.Generator("cpu").manual_seed(1)
    embeds = [torch.randn(1, 512, 4096, generator=g).to(DEVICE, dtype)]
    negative = torch.randn(1, 512, 4096, generator=g).to(DEVICE, dtype)
    template = make_scheduler("unipc", scheduler_config=scheduler_config, flow_shift=3.0, num_inference_steps=steps,
                              device=DEVICE)
    shape = dict(latent_channels=16, latent_height=HEIGHT // 8, latent_width=WIDTH // 8)
    sync()
    reset_peak()
    start = time.perf_counter()
    executor = DualParalReference(
        transformer=transformer, scheduler_template=template, prompt_embeds=embeds, negative_prompt_embeds=negative,
        prompt_index_for_block=lambda j: 0, guidance_scale=5.0, num_blocks=num_blocks, block_latent_frames=n,
        context_latent_frames=c, feature_cache=True,
        noise_fn=lambda j: block_noise(seed=0, block_index=j, block_latent_frames=n, context_latent_frames=c, **shape).to(DEVICE),
    )
    result = []
    while not executor.done:
        result += executor.run_tick()
    executor.close()
    sync()
    return result[-1][1], peak_bytes(), time.perf_counter() - start, (embeds, negative)


def parity(transformer, scheduler_config, dtype, steps: int) -> dict:
    import torch
    from diffusers import UniPCMultistepScheduler, WanPipeline

    from hpcvideo.noise import block_noise

    n = 8
    ours, _, seconds, (embeds, negative) = dualparal(transformer, scheduler_config, dtype, num_blocks=1, steps=steps, n=n)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                       scheduler=UniPCMultistepScheduler.from_config(scheduler_config))
    pipe.set_progress_bar_config(disable=True)
    noise = block_noise(seed=0, block_index=0, block_latent_frames=n, context_latent_frames=2, latent_channels=16,
                        latent_height=HEIGHT // 8, latent_width=WIDTH // 8).to(DEVICE)
    start = time.perf_counter()
    theirs = pipe(prompt_embeds=embeds[0], negative_prompt_embeds=negative, height=HEIGHT, width=WIDTH,
                  num_frames=4 * (n - 1) + 1, num_inference_steps=steps, guidance_scale=5.0, latents=noise,
                  output_type="latent").frames
    sync()
    their_s = time.perf_counter() - start
    ours, theirs = ours.float().reshape(-1), theirs.float().to(ours.device).reshape(-1)
    err = float((ours - theirs).abs().max() / theirs.abs().max())
    return {"steps": steps, "num_frames": 4 * (n - 1) + 1, "bit_identical": bool(torch.equal(ours, theirs)),
            "max_abs_diff_over_max_abs": err, "tolerance": TOLERANCE, "ok": err <= TOLERANCE,
            "hpcvideo_s": round(seconds, 3), "diffusers_s": round(their_s, 3)}


def memory(transformer, scheduler_config, dtype, steps: int) -> dict:
    out = {}
    for blocks in (2, 4, 8):
        _, peak, seconds, _ = dualparal(transformer, scheduler_config, dtype, num_blocks=blocks, steps=steps)
        out[f"{blocks}_blocks"] = {"peak_gib": round(peak / 2**30, 3), "seconds": round(seconds, 2)}
    out["growth_8_over_4"] = round(out["8_blocks"]["peak_gib"] / out["4_blocks"]["peak_gib"] - 1, 4)
    out["steps"], out["goal"] = steps, "flat once min(blocks, steps) blocks are in flight (8 vs 4 blocks)"
    return out


def decode(vae) -> dict:
    import torch

    from hpcvideo.decode import StreamingDecoder

    decoder = StreamingDecoder(vae, device=DEVICE)
    latents = torch.randn(1, 16, 8, HEIGHT // 8, WIDTH // 8, device=DEVICE)
    decoder.decode_block(latents[:, :, :1])  # warm-up (the first frame)
    sync()
    start = time.perf_counter()
    frames = decoder.decode_block(latents)
    sync()
    seconds = time.perf_counter() - start
    return {"latent_frames": 8, "pixel_frames": frames.shape[2], "seconds_per_frame": round(seconds / frames.shape[2], 4)}


def store_write(num_blocks: int = 4) -> dict:
    import numpy as np

    from hpcvideo.store import RunStore

    with tempfile.TemporaryDirectory() as tmp:
        n = 8
        store = RunStore.create(Path(tmp) / "run.zarr", config={}, num_latent_frames=n * num_blocks, block_latent_frames=n,
                                latent_channels=16, latent_height=HEIGHT // 8, latent_width=WIDTH // 8, height=HEIGHT,
                                width=WIDTH, fps=16.0, model_id="random")
        rng = np.random.default_rng(0)
        frames = [rng.integers(0, 256, (4 * n - (3 if j == 0 else 0), HEIGHT, WIDTH, 3), dtype=np.uint8) for j in range(num_blocks)]
        start = time.perf_counter()
        for j, block in enumerate(frames):
            store.write_block_frames(j, block)
            store.mark_done("frames", j)
        seconds = time.perf_counter() - start
        total = sum(f.nbytes for f in frames)
    return {"frames": sum(len(f) for f in frames), "mb": round(total / 1e6, 1), "mb_per_s": round(total / 1e6 / seconds, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--smoke", action="store_true",
                        help="every part on the CPU with a narrow 8-layer model at 64x64 (checks the script, not the GPU)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    import torch

    global DEVICE, HEIGHT, WIDTH
    if args.smoke:
        DEVICE, HEIGHT, WIDTH = "cpu", 64, 64
    elif not torch.cuda.is_available():
        print(json.dumps({"gpu": None, "status": "no GPU"}))
        print("gpu_check: no GPU (torch.cuda.is_available() is False); nothing measured", file=sys.stderr)
        return 0
    started = time.perf_counter()
    dtype = torch.bfloat16
    report = {"gpu": torch.cuda.get_device_name(0) if DEVICE == "cuda" else None, "torch": torch.__version__,
              "status": "smoke (CPU, narrow model)" if args.smoke else "ran",
              "height": HEIGHT, "width": WIDTH, "dtype": "bfloat16", "load_before": os.getloadavg()}
    transformer, vae, scheduler_config = build(dtype, smoke=args.smoke)
    report["build_s"] = round(time.perf_counter() - started, 1)
    repeats, steps = (3, 2) if args.quick else (5, 4)
    for name, fn in (("stage_forward", lambda: stage_forward(transformer, dtype, repeats)),
                     ("parity", lambda: parity(transformer, scheduler_config, dtype, steps)),
                     ("memory", lambda: memory(transformer, scheduler_config, dtype, steps)),
                     ("decode", lambda: decode(vae)),
                     ("store", store_write)):
        try:
            report[name] = fn()
        except Exception as error:  # noqa: BLE001 - one failing part does not hide the others' figures
            report[name] = {"error": f"{type(error).__name__}: {error}"}
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    report["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
