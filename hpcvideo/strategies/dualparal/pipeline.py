"""DualParal across ranks: layer-split pipeline stages over the block queue (arXiv 2505.21070).

Rank layout (world_size N, L transformer blocks, stage r = rank r)::

    rank 0   stage 0: patch embedding + blocks [0, l0)       owns the queue: latents, schedulers,
                                                               noise, checkpoints, decode, store
    rank r   stage r: blocks [l_{r-1}, l_r)                    stateless between ticks
    rank N-1 stage N-1: blocks [.., L) + output head + CFG     sends noise_pred back to rank 0

    e.g. 30 blocks on 4 ranks: 8/8/7/7 (remainder to the first stages), or ``runtime.stage_layers``.

Per tick every rank derives the same work list from :func:`.queue.tick_plan` — (block, CFG branch)
items, newest block first — so no schedule is ever sent. Hidden states (1, S, D) of each item flow
rank r -> r+1 (isend/irecv, the next receive posted before the current item is computed, so transfers
overlap compute); the last stage sends each block's CFG-combined noise_pred (1, C, n, h, w) to rank
0 on a second process group; rank 0 applies the scheduler steps after all forwards of the tick, as
the reference does. The feature cache lives on the stage whose layers use it: block j+1's K/V are
recorded on stage r and read by block j on stage r in the same tick. Every stage runs exactly the
operations the single-process reference runs on the same inputs, so the result is bit-identical
(tested for 1-4 ranks on CPU); which context a block reads is fixed by the plan, never by timing.

Messages per tick (bytes, b = bytes per element, T_w = (c_ctx + n) * tokens_per_frame):
rank r -> r+1: sum over items of T_w * D * b; rank N-1 -> 0: blocks_in_flight * C * n * h * w * b.
"""

from __future__ import annotations

import time
from collections import deque

import torch
import torch.distributed as dist

from . import forward as wan_forward
from .attention import CachePlan
from .reference import DualParalReference


def split_layers(num_layers: int, num_stages: int, stage_layers: list[int] | None = None) -> list[range]:
    """Contiguous layer ranges per stage: the remainder goes to the first stages, or ``stage_layers``
    (counts per stage) when given. Raises ValueError naming the key when they do not fit."""
    if stage_layers:
        if len(stage_layers) != num_stages or sum(stage_layers) != num_layers or min(stage_layers) < 1:
            raise ValueError(
                f"runtime.stage_layers={list(stage_layers)} does not split {num_layers} transformer blocks over "
                f"{num_stages} ranks: give {num_stages} positive counts summing to {num_layers}, or leave it unset"
            )
        counts = list(stage_layers)
    else:
        if num_stages > num_layers:
            raise ValueError(f"{num_stages} ranks cannot split {num_layers} transformer blocks: use at most {num_layers} ranks")
        base, extra = divmod(num_layers, num_stages)
        counts = [base + (1 if r < extra else 0) for r in range(num_stages)]
    starts = [sum(counts[:r]) for r in range(num_stages)]
    return [range(s, s + n) for s, n in zip(starts, counts)]


class DualParalPipeline(DualParalReference):
    """The block queue on ``env.world_size`` ranks, one pipeline stage per rank.

    Takes the arguments of :class:`DualParalReference` (the queue, CFG, noise, scheduler; with two
    experts, ``transformer_2`` holds the same layers of the low-noise expert) plus
    ``env`` (:class:`hpcvideo.runtime.RankEnv`), ``layers`` (this rank's block range, the
    ``transformer`` holds at least these blocks) and ``latent_shape`` (C, h, w). Queue state lives on
    rank 0; ``run_tick`` on other ranks returns [] and their ``state_dict`` is never needed.
    """

    def __init__(self, *, env, layers: range, latent_shape: tuple[int, int, int], **kwargs) -> None:
        super().__init__(device=env.device, **kwargs)
        self.env = env
        self.rank, self.num_stages = env.rank, env.world_size  # this stage's index, the pipeline's stages
        self.stage_ranks = list(range(env.world_size))  # the global rank of each stage
        self.branches = ["cond", "uncond"] if self.do_cfg else ["cond"]  # the CFG branches this pipeline runs
        self.holds_queue = self.rank == 0  # the stage that holds the queue state (latents, schedulers)
        self.layers = layers
        self.latent_shape = latent_shape
        self.hidden_dtype = self.transformer.patch_embedding.weight.dtype
        self.hidden_dim = self.transformer.patch_embedding.out_channels
        # per expert (Wan2.2 A14B: each holds its own embedders): text/time/rope per prompt, step, shape
        self.conditions = [wan_forward.ConditionCache(model) for model in self.transformers]
        self.forward_group = self.feedback_group = None
        self._make_groups()
        # one message counter per stream (r-1 -> r received here, r -> r+1 sent here, N-1 -> 0):
        # both ends of a stream count its messages in the same order, so the tags match
        self._recv_seq = self._send_seq = self._feedback_seq = 0
        # measured per rank: its layers, bytes sent/received, seconds blocked on messages, seconds computing
        self.stats = {"layers": [layers.start, layers.stop], "bytes_sent": 0, "bytes_received": 0, "wait_s": 0.0,
                      "tick_s": 0.0, "ticks": 0}
        # rank 0: block index -> (work, noise_pred buffer, irecv) of a step not applied yet (at most one
        # per block); blocks that left the queue since the last return; sends not known complete
        self._pending: dict[int, tuple] = {}
        self._finished: list[tuple[int, torch.Tensor]] = []
        self._sends: deque = deque()

    def _make_groups(self) -> None:
        if self.num_stages > 1:
            # two groups: hidden states go r -> r+1, noise predictions N-1 -> 0 (separate NCCL
            # communicators, so the two directions never wait on each other)
            self.forward_group = dist.new_group(list(range(self.num_stages)))
            self.feedback_group = dist.new_group(list(range(self.num_stages)))

    # -- messages ---------------------------------------------------------------------------
    def _tag(self, kind: str) -> int:
        attr = f"_{kind}_seq"
        seq = getattr(self, attr)
        setattr(self, attr, seq + 1)
        return seq % (1 << 20)

    def _window_frames(self, work) -> int:
        return (self.context_latent_frames if work.context_from is not None else 0) + self.block_latent_frames

    def _post_recv_hidden(self, work) -> tuple[torch.Tensor, object]:
        channels, height, width = self.latent_shape
        tokens = self._window_frames(work) * (height // 2) * (width // 2)
        buffer = torch.empty((1, tokens, self.hidden_dim), dtype=self.hidden_dtype, device=self.device)
        request = dist.irecv(buffer, src=self.stage_ranks[self.rank - 1], group=self.forward_group, tag=self._tag("recv"))
        return buffer, request

    # -- rank 0: steps applied as their noise predictions arrive --------------------------------
    def _settle(self, block_index: int) -> None:
        """Apply block ``block_index``'s pending scheduler step (waiting for its noise_pred from the
        last stage) if one is pending; a block that took its last step leaves the queue."""
        pending = self._pending.pop(block_index, None)
        if pending is None:
            return
        work, buffer, request = pending
        waited = time.perf_counter()
        request.wait()
        self.stats["wait_s"] += time.perf_counter() - waited
        self.stats["bytes_received"] += buffer.numel() * buffer.element_size()
        self._step_block(work, buffer)

    def _settle_arrived(self) -> None:
        """Apply the pending steps whose noise_pred has arrived, and every step older than the last
        tick (a block nobody reads again, e.g. one that left without a successor reading its context)."""
        for block_index in self._pending_in_order():
            work, _, request = self._pending[block_index]
            if work.block_index + work.step_index <= self.tick - 2 or request.is_completed():
                self._settle(block_index)
            else:
                break  # in message order: keep blocks leaving in order

    def _step_block(self, work, noise_pred: torch.Tensor) -> None:
        block = self.blocks[work.block_index]
        assert block.steps_done == work.step_index, (block.steps_done, work)
        t = self.timesteps[work.step_index]
        block.latents = block.scheduler.step(noise_pred, t, block.latents, return_dict=False)[0]
        block.steps_done += 1
        if work.finishes:  # one block leaves per tick, oldest first, so tail only moves forward
            assert self.tail is None or self.tail[0] < block.index, (self.tail[0], block.index)
            del self.blocks[work.block_index]
            latents = self._output(block.index, block.latents)
            self.tail = (block.index, latents)
            self._finished.append((block.index, latents))

    def drain(self) -> list[tuple[int, torch.Tensor]]:
        """Finish every tick issued so far: wait for this rank's sends and (rank 0) the outstanding
        noise predictions, apply their steps and return the blocks that left the queue (oldest
        first). After it the state is the one at the start of tick ``self.tick``, as
        :meth:`state_dict` needs."""
        self._complete()
        finished, self._finished = self._finished, []
        return finished

    def _complete(self) -> None:
        waited = time.perf_counter()
        for request, _ in self._sends:
            request.wait()
        self._sends.clear()
        self.stats["wait_s"] += time.perf_counter() - waited
        for block_index in self._pending_in_order():
            self._settle(block_index)

    def _pending_in_order(self) -> list[int]:
        """Pending blocks by (tick of the step, block index): the oldest block of a tick leaves first."""
        return sorted(self._pending, key=lambda j: (self._pending[j][0].step_index + j, j))

    @property
    def done(self) -> bool:
        return self.tick >= self.num_ticks and not self._pending

    # -- the executor protocol (hpcvideo.strategies.base.Executor): a unit is a block --------------
    @property
    def num_units(self) -> int:
        return self.num_blocks

    @property
    def extend_tick(self) -> int:
        """Tick ``num_blocks``: block ``num_blocks`` would enter now, so the state is also one of any
        longer run (no end effect has happened yet)."""
        return self.num_blocks

    @property
    def stale_from(self) -> int:
        """Blocks from here on had not left the queue at this tick: they are recomputed after a resume."""
        return max(0, self.tick - self.num_inference_steps + 1)

    def state_dict(self) -> dict:
        if self._pending:
            raise RuntimeError("state_dict() between ticks only: call drain() first")
        return super().state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Rank 0: continue from ``state``, a state of a run of ``state["num_blocks"]`` <= ``num_blocks``
        blocks (an extension; ValueError when that state already has end effects)."""
        num_blocks = self.num_blocks
        super().load_state_dict(state)
        self.num_blocks = int(state["num_blocks"])
        self.set_num_blocks(num_blocks)

    def _send(self, tensor: torch.Tensor, *, dst: int, group, kind: str) -> None:
        """isend, kept (with its tensor) until completed; completed sends are pruned as we go."""
        self._sends.append((dist.isend(tensor, dst=dst, group=group, tag=self._tag(kind)), tensor))
        self.stats["bytes_sent"] += tensor.numel() * tensor.element_size()
        while self._sends and self._sends[0][0].is_completed():
            self._sends.popleft()

    # -- hooks of a second parallel axis (:mod:`hpcvideo.strategies.cfg_parallel`) --------------
    def _window_ready(self, window: torch.Tensor) -> None:
        """Stage 0 with the queue: the window (1, C, frames, h, w) in the compute dtype, about to be patchified."""

    def _guide(self, outputs: list[torch.Tensor], step_index: int) -> torch.Tensor | None:
        """Last stage: one block's head outputs (1, C, n, h, w) at ``step_index``, one per branch of
        ``self.branches``, -> its noise_pred: ``noise_uncond + guidance_scale * (noise_cond - noise_uncond)``
        with CFG (diffusers' WanPipeline arithmetic; the guidance scale of the step's expert), or None when
        another rank applies guidance."""
        noise_pred = outputs[0]
        if self.do_cfg:
            noise_uncond = outputs[1]
            noise_pred = noise_uncond + self.step_guidance[step_index] * (noise_pred - noise_uncond)
        return noise_pred

    # -- one tick ---------------------------------------------------------------------------
    @torch.no_grad()
    def run_tick(self) -> list[tuple[int, torch.Tensor]]:
        """Issue one tick on this stage; returns the blocks that left the queue meanwhile (rank 0).

        Rank 0 does not wait for the tick's noise predictions: block j's step is applied when a later
        forward first reads block j (its own window, or block j+1's context) or at :meth:`drain`, so
        stage 0 starts tick t+1 while the last stage still finishes tick t (no per-tick fill/drain).
        The values are those of the reference: block j's latents are read at tick t only by block j
        and block j+1, both forwarded before block j's step of tick t can be applied.
        """
        if self.tick >= self.num_ticks:
            raise RuntimeError("the queue has finished")
        tick_start = time.perf_counter()
        first, last = self.rank == 0, self.rank == self.num_stages - 1
        owner = first and self.holds_queue
        plan = self._plan()
        branches = self.branches
        items = [(work, branch) for work in plan for branch in branches]
        channels, height, width = self.latent_shape
        tokens_per_frame = (height // 2) * (width // 2)

        if owner:
            self._settle_arrived()
            self._enter(plan)
        feedback = {}
        if owner and self.num_stages > 1:  # all of this tick's noise predictions, posted up front
            for work in plan:
                buffer = torch.empty((1, channels, self.block_latent_frames, height, width),
                                     dtype=self.hidden_dtype, device=self.device)
                request = dist.irecv(buffer, src=self.stage_ranks[-1], group=self.feedback_group, tag=self._tag("feedback"))
                feedback[work.block_index] = (work, buffer, request)
        incoming = deque()
        if not owner and items:
            incoming.append(self._post_recv_hidden(items[0][0]))
        noise_preds = {}
        outputs = []
        self.cache.begin_tick()
        for k, (work, branch) in enumerate(items):
            num_context = self._window_frames(work) - self.block_latent_frames
            window_shape = (1, channels, self._window_frames(work), height, width)
            timestep, step_key = self._timestep(work, tokens_per_frame)
            prompt_embeds = (
                self.prompt_embeds[self.prompt_index_for_block(work.block_index)] if branch == "cond"
                else self.negative_prompt_embeds
            )
            extra = self.context_latent_frames if work.append else 0
            prompt_key = self.prompt_index_for_block(work.block_index) if branch == "cond" else "negative"
            expert = self.step_experts[work.step_index]  # the expert of this block's timestep
            model = self.transformers[expert]
            inputs = self.conditions[expert].block_inputs(
                window_shape, timestep, prompt_embeds, prompt_key=prompt_key, step_key=step_key,
                extra_key_frames=extra, image_embeds=self.image_embeds,
            )
            if owner:
                self._settle(work.block_index)  # its own latents and its context: after last tick's steps
                if work.context_from is not None:
                    self._settle(work.context_from)
                window = self._window(work).to(self.dtype)
                self._window_ready(window)
                hidden_states = wan_forward.patchify(model, window)
            else:
                hidden_states, request = incoming.popleft()
                if k + 1 < len(items):  # the next transfer runs while this item computes
                    incoming.append(self._post_recv_hidden(items[k + 1][0]))
                waited = time.perf_counter()
                request.wait()
                self.stats["wait_s"] += time.perf_counter() - waited
                self.stats["bytes_received"] += hidden_states.numel() * hidden_states.element_size()
                if first:  # a stage 0 without the queue: it received the window
                    hidden_states = wan_forward.patchify(self.transformer, hidden_states)
            record = None
            if work.record:
                start = num_context * tokens_per_frame
                record = (start, start + self.context_latent_frames * tokens_per_frame)
            self.cache.plan = CachePlan(
                branch=branch, record_tokens=record, append=work.append, key_rotary_emb=inputs.key_rotary_emb
            )
            hidden_states = wan_forward.run_blocks(model, hidden_states, inputs, self.layers)
            self.cache.plan = None
            if not last:
                self._send(hidden_states, dst=self.stage_ranks[self.rank + 1], group=self.forward_group, kind="send")
            else:
                outputs.append(wan_forward.head(model, hidden_states, inputs)[:, :, num_context:])
            if branch == branches[-1]:
                self.cache.end_block()
                if last:
                    noise_pred = self._guide(outputs, work.step_index)
                    outputs = []
                    if noise_pred is None:  # a pipeline without the queue: its peer applies guidance
                        pass
                    elif first:
                        noise_preds[work.block_index] = noise_pred
                    else:
                        self._send(noise_pred.contiguous(), dst=self.stage_ranks[0], group=self.feedback_group,
                                   kind="feedback")
        self.tick += 1
        if owner:
            if self.num_stages == 1:  # one rank: the reference's order, nothing to overlap
                for work in plan:
                    self._step_block(work, noise_preds[work.block_index])
            else:
                for work in plan:
                    self._pending[work.block_index] = feedback[work.block_index]
        if self.tick >= self.num_ticks:  # the last tick: nothing left to overlap with
            self._complete()
        finished, self._finished = self._finished, []
        self.stats["tick_s"] += time.perf_counter() - tick_start
        self.stats["ticks"] += 1
        return finished
