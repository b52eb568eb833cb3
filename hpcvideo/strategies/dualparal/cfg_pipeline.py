"""DualParal with CFG parallelism (``runtime.cfg_parallel``): two pipelines of G = world_size / 2 stages,
group 0 (ranks 0 .. G-1) runs the cond branch of every block, group 1 (ranks G .. 2G-1) the uncond branch;
the layout and messages are described in :mod:`hpcvideo.strategies.cfg_parallel`.

Each group runs :class:`.pipeline.DualParalPipeline`'s tick with one branch. Extra messages per item
(b = bytes per element of the compute dtype): rank 0 -> rank G the window, C (c + n) h w b; rank 2G-1 ->
rank G-1 the uncond head output, C n h w b. The hidden-state stream of each group is that of a G-stage
pipeline running one branch (half the items of a plain pipeline's tick).
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from .pipeline import DualParalPipeline


class CfgParallelPipeline(DualParalPipeline):
    """The block queue on ``env.world_size`` = 2G ranks, one branch per group of G pipeline stages.

    Takes the arguments of :class:`.pipeline.DualParalPipeline` (``layers``: this rank's block range within its
    group's split). Raises ValueError for an odd world_size or without CFG (guidance_scale <= 1 or no negative
    prompt embedding). Queue state lives on rank 0 only, as in a plain pipeline.
    """

    def _make_groups(self) -> None:
        world_size = self.env.world_size
        if world_size % 2 or world_size < 2:
            raise ValueError(f"CFG parallelism needs an even number of ranks, not {world_size}")
        if not self.do_cfg:
            raise ValueError("CFG parallelism needs guidance (guidance_scale > 1 and a negative prompt embedding)")
        size = world_size // 2
        self.group_index, stage = divmod(self.env.rank, size)
        self.rank, self.num_stages = stage, size
        self.stage_ranks = [self.group_index * size + s for s in range(size)]
        self.branches = [("cond", "uncond")[self.group_index]]
        self.holds_queue = self.env.rank == 0
        self._window_seq = self._peer_seq = 0
        # every rank creates every group, in the same order (torch.distributed's rule)
        groups = []
        if size > 1:
            for g in range(2):
                ranks = list(range(g * size, (g + 1) * size))
                groups.append((dist.new_group(ranks), dist.new_group(ranks)))
            self.forward_group, self.feedback_group = groups[self.group_index]
        self.window_group = dist.new_group([0, size])  # rank 0 -> stage 0 of group 1: the windows
        self.peer_group = dist.new_group([size - 1, world_size - 1])  # last of group 1 -> last of group 0: uncond

    def _window_ready(self, window: torch.Tensor) -> None:
        self._send(window, dst=self.num_stages, group=self.window_group, kind="window")

    def _post_recv_hidden(self, work) -> tuple[torch.Tensor, object]:
        if self.rank != 0:  # a later stage: hidden states from the previous stage of this group
            return super()._post_recv_hidden(work)
        channels, height, width = self.latent_shape  # stage 0 of group 1: rank 0's window
        buffer = torch.empty((1, channels, self._window_frames(work), height, width), dtype=self.dtype,
                             device=self.device)
        request = dist.irecv(buffer, src=0, group=self.window_group, tag=self._tag("window"))
        return buffer, request

    def _guide(self, outputs: list[torch.Tensor], step_index: int) -> torch.Tensor | None:
        (output,) = outputs
        peer = self.env.world_size - 1 if self.group_index == 0 else self.num_stages - 1
        if self.group_index == 1:
            self._send(output.contiguous(), dst=peer, group=self.peer_group, kind="peer")
            return None
        noise_uncond = torch.empty(output.shape, dtype=output.dtype, device=self.device)
        request = dist.irecv(noise_uncond, src=peer, group=self.peer_group, tag=self._tag("peer"))
        guided = _Guided(self, output, noise_uncond, request, self.step_guidance[step_index])
        # one stage per group: rank 0 steps after the tick's forwards, so it goes on with the next item's window
        # (rank 1 keeps busy) and combines when the step is applied; more stages: noise_pred goes on at once
        return guided if self.num_stages == 1 else guided.result()

    def _step_block(self, work, noise_pred) -> None:
        super()._step_block(work, noise_pred.result() if isinstance(noise_pred, _Guided) else noise_pred)


class _Guided:
    """A block's noise_pred whose uncond half is still arriving: :meth:`result` waits and applies guidance."""

    def __init__(self, pipeline: CfgParallelPipeline, noise_cond: torch.Tensor, noise_uncond: torch.Tensor, request,
                 guidance_scale: float):
        self.pipeline, self.noise_cond, self.noise_uncond, self.request = pipeline, noise_cond, noise_uncond, request
        self.guidance_scale = guidance_scale  # of the step's expert (Wan2.2 A14B: guidance_scale_2 at low noise)

    def result(self) -> torch.Tensor:
        stats, noise_uncond = self.pipeline.stats, self.noise_uncond
        waited = time.perf_counter()
        self.request.wait()
        stats["wait_s"] += time.perf_counter() - waited
        stats["bytes_received"] += noise_uncond.numel() * noise_uncond.element_size()
        return noise_uncond + self.guidance_scale * (self.noise_cond - noise_uncond)
