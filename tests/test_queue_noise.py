"""The DualParal queue schedule (docs/DESIGN.md, section 6.1) and noise as a pure function of (seed, block)."""

import pytest
import torch

from hpcvideo.noise import block_noise
from hpcvideo.strategies.dualparal.queue import in_flight, num_ticks, tick_plan


def _plans(num_blocks, steps, context=1, cache=True):
    return [
        tick_plan(t, num_blocks=num_blocks, num_inference_steps=steps, context_latent_frames=context, feature_cache=cache)
        for t in range(num_ticks(num_blocks, steps))
    ]


@pytest.mark.parametrize("num_blocks,steps", [(1, 4), (5, 3), (3, 7), (6, 1)])
def test_every_block_gets_every_step_once_in_order(num_blocks, steps):
    seen = {}
    for tick, plan in enumerate(_plans(num_blocks, steps)):
        # newest first within a tick
        assert [w.block_index for w in plan] == sorted((w.block_index for w in plan), reverse=True)
        for work in plan:
            assert work.step_index == tick - work.block_index  # block j gets step s at tick j + s
            seen.setdefault(work.block_index, []).append(work.step_index)
    assert seen == {j: list(range(steps)) for j in range(num_blocks)}


def test_adjacent_blocks_are_one_step_apart_and_enter_one_tick_apart():
    for plan in _plans(6, 4):
        for newer, older in zip(plan, plan[1:]):
            assert older.block_index == newer.block_index - 1
            assert older.step_index == newer.step_index + 1
    enters = [next(w.block_index for w in plan if w.enters) for plan in _plans(6, 4)[:6]]
    assert enters == list(range(6))


def test_context_and_feature_cache_flags():
    plan = tick_plan(3, num_blocks=6, num_inference_steps=3, context_latent_frames=2, feature_cache=True)
    # in flight at tick 3: blocks 3, 2, 1 (block 0 left after tick 2)
    assert [w.block_index for w in plan] == [3, 2, 1]
    by_index = {w.block_index: w for w in plan}
    assert by_index[3].append is False and by_index[3].record is True
    assert by_index[2].append is True and by_index[2].record is True
    assert by_index[1].append is True and by_index[1].record is False  # block 0 is gone: nobody reads it
    assert by_index[1].context_from == 0  # ... but block 0's final latents are its context
    assert by_index[1].finishes and by_index[3].enters
    off = tick_plan(3, num_blocks=6, num_inference_steps=3, context_latent_frames=2, feature_cache=False)
    assert not any(w.append or w.record for w in off)
    no_context = tick_plan(3, num_blocks=6, num_inference_steps=3, context_latent_frames=0, feature_cache=True)
    assert all(w.context_from is None and not w.append for w in no_context)


def test_in_flight_counts_and_bounds():
    counts = [len(in_flight(t, num_blocks=5, num_inference_steps=3)) for t in range(num_ticks(5, 3))]
    assert counts == [1, 2, 3, 3, 3, 2, 1]
    with pytest.raises(ValueError, match="tick=7"):
        tick_plan(7, num_blocks=5, num_inference_steps=3, context_latent_frames=1, feature_cache=True)


SHAPE = dict(latent_channels=3, latent_height=4, latent_width=5)


@pytest.mark.parametrize("mode", ["coordinated", "independent"])
def test_noise_is_a_pure_function_of_seed_and_block(mode):
    kwargs = dict(block_latent_frames=4, context_latent_frames=2, mode=mode, **SHAPE)
    late_first = block_noise(seed=7, block_index=9, **kwargs)
    for j in range(12):
        block_noise(seed=7, block_index=j, **kwargs)
    assert torch.equal(late_first, block_noise(seed=7, block_index=9, **kwargs))
    assert late_first.shape == (1, 3, 4, 4, 5) and late_first.dtype == torch.float32
    assert not torch.equal(late_first, block_noise(seed=8, block_index=9, **kwargs))
    assert not torch.equal(late_first, block_noise(seed=7, block_index=8, **kwargs))


def test_coordinated_noise_reshuffles_one_window_without_repeats():
    n, c = 4, 2
    kwargs = dict(block_latent_frames=n, context_latent_frames=c, mode="coordinated", **SHAPE)
    blocks = [block_noise(seed=3, block_index=j, **kwargs) for j in range(8)]
    # the base window: every frame of every block is one of n + c distinct base frames
    frames = {tuple(f.flatten().tolist()) for b in blocks for f in b[0].unbind(1)}
    assert len(frames) == n + c
    for previous, current in zip(blocks, blocks[1:]):
        window = torch.cat([previous[:, :, -c:], current], dim=2)  # what the block's attention sees
        keys = {tuple(f.flatten().tolist()) for f in window[0].unbind(1)}
        assert len(keys) == n + c  # a permutation of the window: no frame repeated


def test_noise_rejects_bad_mode():
    with pytest.raises(ValueError, match="noise_init='fancy'"):
        block_noise(seed=0, block_index=0, block_latent_frames=2, context_latent_frames=1, mode="fancy", **SHAPE)
