"""Single-process executor of the DualParal block queue: the reference every other executor matches.

Per tick (see :mod:`.queue` for the schedule): for each block in flight, newest first, build its
window (context frames of the previous block ++ its own latents, as at the start of the tick), run
the transformer once per CFG branch (cond, then uncond, like diffusers' WanPipeline) with the feature
cache recording/appending as planned, combine ``noise_uncond + g * (noise_cond - noise_uncond)`` on
the block's own frames; after all forwards, apply each block's own scheduler step. Blocks whose last
step was this tick leave the queue and are returned.

With one block and no context this is exactly WanPipeline's denoising loop (tested bit for bit), also
with two experts (Wan2.2 A14B): each block's forward uses the expert of its own timestep and that
expert's guidance scale (:class:`hpcvideo.models.experts.Experts`), so blocks of one tick may use
different experts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from ...models.experts import Experts
from ...conditioning import NO_CONDITION, FrameCondition, frame_levels, token_timesteps
from ...schedulers import fresh_copy, load_scheduler_state, scheduler_state
from . import forward as wan_forward
from .attention import CachePlan, FeatureCache, apply_feature_cache, remove_feature_cache
from .queue import BlockWork, num_ticks, tick_plan


@dataclass(kw_only=True)
class BlockState:
    """A block in flight: latents (1, C, n, h, w) float32, its scheduler, steps applied so far."""

    index: int
    latents: torch.Tensor
    scheduler: Any
    steps_done: int


class DualParalReference:
    """The block queue on one process.

    Args:
        transformer: diffusers ``WanTransformer3DModel`` (dtype = compute dtype).
        scheduler_template: a scheduler at step 0 (:func:`hpcvideo.schedulers.make_scheduler`).
        prompt_embeds: one (1, text_len, text_dim) tensor per prompt of the schedule.
        negative_prompt_embeds: (1, text_len, text_dim) or None (no CFG).
        prompt_index_for_block: block index -> index into ``prompt_embeds``.
        guidance_scale: CFG scale; CFG runs when > 1 and a negative embedding is given (diffusers' rule).
        num_blocks, block_latent_frames, context_latent_frames, feature_cache: the queue (docs/DESIGN.md, section 6.1).
        noise_fn: block index -> initial latents (1, C, n, h, w) float32 (:func:`hpcvideo.noise.block_noise`).
        device: where latents live and the transformer runs.
        transformer_2, experts, guidance_scale_2: a two-expert model (Wan2.2 A14B): the low-noise expert,
            the switch (:class:`hpcvideo.models.experts.Experts`) and its guidance scale (None: ``guidance_scale``).
        expand_timesteps: the model takes one timestep per token (Wan2.2 TI2V): each window frame gets
            its own level (:mod:`hpcvideo.conditioning`); else one timestep per forward.
        condition: video latent frames fixed to clean latents (an image at frame 0), or none.
        condition_channels: an image-to-video model's extra input channels
            (:class:`hpcvideo.models.wan_i2v.ConditionChannels`, on the rank that assembles inputs), or None.
        image_embeds: an image-to-video model's CLIP features (1, tokens, image_dim) on every rank, or None.
        initial_context: block 0 continues an earlier video (every rank); ``init_context``: its context
            (:class:`hpcvideo.continuation.InitContext`) on the rank that holds the queue.
    """

    def __init__(
        self,
        *,
        transformer,
        scheduler_template,
        prompt_embeds: list[torch.Tensor],
        negative_prompt_embeds: torch.Tensor | None,
        prompt_index_for_block: Callable[[int], int],
        guidance_scale: float,
        num_blocks: int,
        block_latent_frames: int,
        context_latent_frames: int,
        feature_cache: bool,
        noise_fn: Callable[[int], torch.Tensor],
        device: torch.device | str = "cpu",
        transformer_2=None,
        experts: Experts | None = None,
        guidance_scale_2: float | None = None,
        expand_timesteps: bool = False,
        condition: FrameCondition = NO_CONDITION,
        condition_channels=None,
        image_embeds: torch.Tensor | None = None,
        initial_context: bool = False,
        init_context=None,
    ) -> None:
        self.transformer = transformer
        self.transformers = [transformer] + ([transformer_2] if transformer_2 is not None else [])
        self.experts = experts or Experts()
        if len(self.experts.names) != len(self.transformers):
            raise ValueError(f"experts {self.experts.names} but {len(self.transformers)} transformer(s) given")
        self.scheduler_template = scheduler_template
        self.timesteps = scheduler_template.timesteps
        self.num_inference_steps = len(self.timesteps)
        # per step index: the expert of its timestep and that expert's guidance scale
        self.step_experts = tuple(self.experts.index(t) for t in self.timesteps)
        self.step_guidance = tuple(self.experts.guidance_scale(t, guidance_scale, guidance_scale_2) for t in self.timesteps)
        self.prompt_embeds = prompt_embeds
        self.negative_prompt_embeds = negative_prompt_embeds
        self.prompt_index_for_block = prompt_index_for_block
        self.guidance_scale = guidance_scale
        self.do_cfg = guidance_scale > 1.0 and negative_prompt_embeds is not None
        self.num_blocks = num_blocks
        self.block_latent_frames = block_latent_frames
        self.context_latent_frames = context_latent_frames
        self.feature_cache = feature_cache and context_latent_frames > 0
        self.noise_fn = noise_fn
        self.device = torch.device(device)
        self.dtype = transformer.dtype
        self.expand_timesteps = expand_timesteps
        self.condition = condition
        self.condition_channels = condition_channels
        self.image_embeds = image_embeds
        self.initial_context = initial_context and context_latent_frames > 0
        self.init_context = init_context
        self.tick = 0
        self.blocks: dict[int, BlockState] = {}
        self.tail: tuple[int, torch.Tensor] | None = None  # last block that left: its context for the next
        self.cache = FeatureCache()
        if self.feature_cache:
            for expert, model in enumerate(self.transformers):
                apply_feature_cache(model, self.cache, expert)

    # -- queue -------------------------------------------------------------------------------
    @property
    def num_ticks(self) -> int:
        return num_ticks(self.num_blocks, self.num_inference_steps)

    @property
    def done(self) -> bool:
        return self.tick >= self.num_ticks

    def close(self) -> None:
        """Undo the model patch."""
        for model in self.transformers:
            remove_feature_cache(model)

    def set_num_blocks(self, num_blocks: int) -> None:
        """Lengthen the video. Valid only while the state is still one of the longer run's states,
        i.e. ``tick <= old num_blocks`` (no end effect has happened yet); raises ValueError otherwise."""
        if num_blocks < self.num_blocks:
            raise ValueError(f"num_blocks={num_blocks} < current {self.num_blocks}: a run cannot be shortened")
        if num_blocks > self.num_blocks and self.tick > self.num_blocks:
            raise ValueError(f"state at tick {self.tick} already has end effects of {self.num_blocks} blocks")
        self.num_blocks = num_blocks

    def _context(self, work: BlockWork) -> torch.Tensor | None:
        if work.context_from is None:
            return None
        if work.context_from == -1:  # the video this one continues
            return self.init_context.at(work.step_index)
        c = self.context_latent_frames
        source = self.blocks.get(work.context_from)
        if source is not None:
            return source.latents[:, :, -c:]
        if self.tail is not None and self.tail[0] == work.context_from:
            return self.tail[1][:, :, -c:]
        raise RuntimeError(f"context block {work.context_from} of block {work.block_index} is gone (tick {self.tick})")

    def _window(self, work: BlockWork) -> torch.Tensor:
        """The block's forward input (1, C_in, ctx + n, h, w) float32: context ++ own latents, fixed frames
        replaced by their clean latents (image-to-video: the condition channels appended)."""
        block = self.blocks[work.block_index]
        context = self._context(work)
        window = block.latents if context is None else torch.cat([context, block.latents], dim=2)
        if self.condition:
            window = self.condition.apply(window, self._window_start(work))
        if self.condition_channels is not None:  # image-to-video: latents ++ mask ++ image latents (channels)
            window = torch.cat([window, self.condition_channels.window(self._window_start(work), window.shape[2])], dim=1)
        return window

    def _window_start(self, work: BlockWork) -> int:
        """Video latent frame of the window's first frame."""
        context = self.context_latent_frames if work.context_from is not None else 0
        return work.block_index * self.block_latent_frames - context

    def _timestep(self, work: BlockWork, tokens_per_frame: int):
        """(timestep, key): the forward's timestep, (1,) or per token (1, S) for an ``expand_timesteps``
        model, and a key identifying it for :class:`.forward.ConditionCache`."""
        t = self.timesteps[work.step_index]
        if not self.expand_timesteps:
            return t.expand(1), work.step_index
        num_context = self.context_latent_frames if work.context_from is not None else 0
        after = work.step_index + 1  # the previous block's steps at the start of this tick
        context_t = self.timesteps[after] if after < self.num_inference_steps else torch.zeros_like(t)
        if work.context_from == -1:  # a continued video's frames: clean
            context_t = torch.zeros_like(t)
        steps = [context_t] * num_context + [t] * self.block_latent_frames
        levels = frame_levels(steps, self.condition.mask(self._window_start(work), len(steps)))
        return token_timesteps(levels, tokens_per_frame), ("tokens", tuple(levels.tolist()))

    def _output(self, block_index: int, latents: torch.Tensor) -> torch.Tensor:
        """A finished block's latents, fixed frames replaced (as the TI2V pipeline's final latents)."""
        if not self.condition:
            return latents
        return self.condition.apply(latents, block_index * self.block_latent_frames)

    def _predict(self, work: BlockWork) -> torch.Tensor:
        """noise_pred (1, C, n, h, w) of one block at this tick (CFG combined)."""
        window = self._window(work)
        num_context = window.shape[2] - self.block_latent_frames
        latent_model_input = window.to(self.dtype)  # (1, C, ctx + n, h, w)
        tokens_per_frame = (window.shape[3] // 2) * (window.shape[4] // 2)
        timestep, _ = self._timestep(work, tokens_per_frame)
        record = None
        if work.record:
            start = num_context * tokens_per_frame
            record = (start, start + self.context_latent_frames * tokens_per_frame)
        extra = self.context_latent_frames if work.append else 0

        embeds = self.prompt_embeds[self.prompt_index_for_block(work.block_index)]
        model = self.transformers[self.step_experts[work.step_index]]  # the expert of this block's timestep
        branches = [("cond", embeds)]
        if self.do_cfg:
            branches.append(("uncond", self.negative_prompt_embeds))
        outputs = []
        for branch, prompt_embeds in branches:
            hidden_states, inputs = wan_forward.embed(
                model, latent_model_input, timestep, prompt_embeds, extra_key_frames=extra,
                image_embeds=self.image_embeds,
            )
            self.cache.plan = CachePlan(
                branch=branch, record_tokens=record, append=work.append, key_rotary_emb=inputs.key_rotary_emb
            )
            hidden_states = wan_forward.run_blocks(model, hidden_states, inputs)
            self.cache.plan = None
            outputs.append(wan_forward.head(model, hidden_states, inputs)[:, :, num_context:])
        self.cache.end_block()
        noise_pred = outputs[0]
        if self.do_cfg:
            noise_uncond = outputs[1]
            noise_pred = noise_uncond + self.step_guidance[work.step_index] * (noise_pred - noise_uncond)
        return noise_pred

    @torch.no_grad()
    def run_tick(self) -> list[tuple[int, torch.Tensor]]:
        """Run one tick; returns the blocks that left the queue: [(block_index, latents (1,C,n,h,w) float32)]."""
        if self.done:
            raise RuntimeError("the queue has finished")
        plan = self._plan()
        self._enter(plan)
        self.cache.begin_tick()
        noise_preds = {work.block_index: self._predict(work) for work in plan}
        return self._apply_steps(plan, noise_preds)

    def _plan(self) -> list[BlockWork]:
        return tick_plan(
            self.tick, num_blocks=self.num_blocks, num_inference_steps=self.num_inference_steps,
            context_latent_frames=self.context_latent_frames, feature_cache=self.feature_cache,
            step_experts=self.step_experts,
            initial_context=self.initial_context,
        )

    def _enter(self, plan: list[BlockWork]) -> None:
        """Blocks entering at this tick start from their initial noise with a fresh scheduler."""
        for work in plan:
            if work.enters:
                latents = self.noise_fn(work.block_index).to(self.device, torch.float32)
                self.blocks[work.block_index] = BlockState(
                    index=work.block_index, latents=latents, scheduler=fresh_copy(self.scheduler_template), steps_done=0
                )

    def _apply_steps(self, plan: list[BlockWork], noise_preds: dict[int, torch.Tensor]) -> list[tuple[int, torch.Tensor]]:
        """After all forwards of the tick: one scheduler step per block, then dequeue finished blocks."""
        finished = []
        for work in plan:
            block = self.blocks[work.block_index]
            assert block.steps_done == work.step_index, (block.steps_done, work)
            t = self.timesteps[work.step_index]
            block.latents = block.scheduler.step(noise_preds[work.block_index], t, block.latents, return_dict=False)[0]
            block.steps_done += 1
        for work in reversed(plan):  # oldest first
            if work.finishes:
                block = self.blocks.pop(work.block_index)
                latents = self._output(block.index, block.latents)
                self.tail = (block.index, latents)
                finished.append((block.index, latents))
        self.tick += 1
        return finished

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to continue exactly (CPU tensors, torch.load(weights_only=True)-safe)."""
        return {
            "tick": self.tick,
            "num_blocks": self.num_blocks,
            "blocks": [
                {
                    "index": b.index,
                    "latents": b.latents.detach().cpu().clone(),
                    "steps_done": b.steps_done,
                    "scheduler": scheduler_state(b.scheduler, self.scheduler_template),
                }
                for b in sorted(self.blocks.values(), key=lambda b: b.index)
            ],
            "tail": None if self.tail is None else {"index": self.tail[0], "latents": self.tail[1].detach().cpu().clone()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.tick = int(state["tick"])
        self.blocks = {}
        for entry in state["blocks"]:
            self.blocks[int(entry["index"])] = BlockState(
                index=int(entry["index"]),
                latents=entry["latents"].to(self.device),
                scheduler=load_scheduler_state(self.scheduler_template, entry["scheduler"], self.device),
                steps_done=int(entry["steps_done"]),
            )
        tail = state["tail"]
        self.tail = None if tail is None else (int(tail["index"]), tail["latents"].to(self.device))
