"""Measurement: DualParal's feature cache with two experts (Wan2.2 A14B layout); prints one JSON object.

    python bench/bench_experts_cache.py [--blocks 6] [--steps 8]

At the tick where block j+1 is one step before the boundary and block j one step after it, the two blocks
use different experts. hpcvideo then links them by no feature cache (block j+1 records nothing, block j
appends nothing: ``separate``). The alternative, ``mixed``, appends the K/V that the high-noise expert's
layers produced for block j+1 to the attention of the low-noise expert's layers for block j. Both are run
here on the single-process executor (the tiny two-expert folder, float32, tiny-test's settings otherwise),
next to a run without any feature cache (``no_cache``):

* ``affected_forwards``: block forwards whose cache link differs between the two (one per adjacent pair of
  blocks: 1 / steps of all forwards of a long video);
* ``max_abs`` / ``rms`` differences of the final latents (all blocks) between the three runs.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch


def run(folder: Path, num_blocks: int, steps: int, mode: str) -> torch.Tensor:
    from hpcvideo.config import load_config
    from hpcvideo.models.family import FAMILIES
    from hpcvideo.noise import block_noise
    from hpcvideo.strategies.dualparal.attention import apply_feature_cache
    from hpcvideo.strategies.dualparal.queue import tick_plan
    from hpcvideo.strategies.dualparal.reference import DualParalReference

    n = 2
    cfg = load_config("tiny-test", [f"model.path={folder}", f"sampling.num_inference_steps={steps}",
                                    f"strategy.feature_cache={mode != 'no_cache'}"],
                      num_frames=4 * n * num_blocks - 3, output="unused.zarr")
    family = FAMILIES["wan"]
    info = family.info(folder)
    components = family.load(folder, device="cpu", dtype=torch.float32, denoiser=True, text=True)
    prompts, negative = family.encode_prompts(components, cfg, dtype=torch.float32)
    st = cfg.strategy

    class Mixed(DualParalReference):
        def _plan(self):  # the cache links every pair of neighbours, whatever their experts
            return tick_plan(self.tick, num_blocks=self.num_blocks, num_inference_steps=self.num_inference_steps,
                             context_latent_frames=self.context_latent_frames, feature_cache=self.feature_cache)

    executor = (Mixed if mode == "mixed" else DualParalReference)(
        transformer=components.models[0], transformer_2=components.models[1], experts=family.experts(info),
        guidance_scale_2=cfg.sampling.guidance_scale_2,
        scheduler_template=family.make_scheduler(cfg, components.scheduler_config, "cpu"), prompt_embeds=prompts,
        negative_prompt_embeds=negative, prompt_index_for_block=cfg.prompt_index_for_block,
        guidance_scale=cfg.sampling.guidance_scale, num_blocks=cfg.num_blocks, block_latent_frames=n,
        context_latent_frames=st.context_latent_frames, feature_cache=st.feature_cache,
        noise_fn=lambda j: block_noise(seed=0, block_index=j, block_latent_frames=n,
                                       context_latent_frames=st.context_latent_frames, mode=st.noise_init,
                                       latent_channels=4, latent_height=4, latent_width=4),
    )
    if mode == "mixed":  # one slot per (branch, layer) for both experts: K/V cross between them
        for model in executor.transformers:
            apply_feature_cache(model, executor.cache, 0)
    finished = {}
    while not executor.done:
        finished.update(dict(executor.run_tick()))
    executor.close()
    return torch.cat([finished[j] for j in sorted(finished)], dim=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from hpcvideo.models.experts import Experts
    from hpcvideo.models.tiny_wan22 import ensure_tiny_wan22_a14b
    from hpcvideo.models.wan import read_model_info
    from hpcvideo.strategies.dualparal.queue import num_ticks, tick_plan

    cache = Path(os.environ.get("HPCVIDEO_CACHE") or tempfile.mkdtemp(prefix="hpcvideo-bench-"))
    folder = ensure_tiny_wan22_a14b(cache)
    latents = {mode: run(folder, args.blocks, args.steps, mode) for mode in ("separate", "mixed", "no_cache")}

    from hpcvideo.schedulers import make_scheduler

    scheduler = make_scheduler("unipc", scheduler_config=json.loads((folder / "scheduler" / "scheduler_config.json").read_text()),
                               flow_shift=3.0, num_inference_steps=args.steps, device="cpu")
    experts = Experts.of(read_model_info(folder))
    step_experts = [experts.index(t) for t in scheduler.timesteps]
    forwards = affected = 0
    for tick in range(num_ticks(args.blocks, args.steps)):
        kw = dict(num_blocks=args.blocks, num_inference_steps=args.steps, context_latent_frames=1, feature_cache=True)
        for a, b in zip(tick_plan(tick, step_experts=step_experts, **kw), tick_plan(tick, **kw)):
            forwards += 1
            affected += a.append != b.append

    def diff(a: str, b: str) -> dict:
        d = (latents[a] - latents[b]).double()
        return {"max_abs": float(d.abs().max()), "rms": float(d.square().mean().sqrt())}

    print(json.dumps({
        "model": "tiny two-expert Wan2.2 layout (random weights, float32)", "blocks": args.blocks, "steps": args.steps,
        "step_experts": step_experts, "block_forwards": forwards, "affected_forwards": affected,
        "latents_rms": float(latents["separate"].double().square().mean().sqrt()),
        "separate_vs_mixed": diff("separate", "mixed"), "separate_vs_no_cache": diff("separate", "no_cache"),
        "mixed_vs_no_cache": diff("mixed", "no_cache"),
    }, indent=2))


if __name__ == "__main__":
    main()
