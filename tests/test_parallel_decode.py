"""hpcvideo.parallel_decode: blocks, and parts of blocks, of a chunk-local VAE decoded on their own equal the
streamed decode, bit for bit; a resumed spread sink decodes again the blocks whose frames another rank had not sent back.
(The 2-rank run of the demo model is pinned by tests/test_golden_hashes.py.)"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hpcvideo.decode import StreamingDecoder, to_uint8
from hpcvideo.demo import WEIGHTS_DIR
from hpcvideo.models import build_tiny_wan, load_wan
from hpcvideo.parallel_decode import IndependentDecoder, SpreadBlockSink, is_chunk_local, part_frames, split_block
from hpcvideo.store import RunStore

pytestmark = pytest.mark.unit
N, BLOCKS, C, h, w = 2, 4, 16, 4, 4  # demo VAE: 16 latent channels; 4 x 4 latents -> 32 x 32 frames (any size)


@pytest.fixture(scope="module")
def demo_vae():
    return load_wan(WEIGHTS_DIR, parts=("vae",)).vae


@pytest.fixture(scope="module")
def latents():
    return torch.randn(1, C, N * BLOCKS, h, w, generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def streamed(demo_vae, latents):
    decoder = StreamingDecoder(demo_vae)
    return [to_uint8(decoder.decode_block(latents[:, :, j * N:(j + 1) * N])) for j in range(BLOCKS)]


def test_chunk_local_is_recognised(demo_vae, tmp_path):
    assert is_chunk_local(demo_vae)
    tiny = load_wan(build_tiny_wan(tmp_path / "tiny-wan", seed=0), parts=("vae",)).vae
    assert not is_chunk_local(tiny)  # a Wan VAE reads earlier latent frames through its carry
    with pytest.raises(ValueError, match="chunk-local"):
        IndependentDecoder(tiny)


@pytest.mark.parametrize("order", [(0, 1, 2, 3), (2, 0, 3, 1)])
def test_blocks_decoded_on_their_own_equal_the_stream(demo_vae, latents, streamed, order):
    decoder = IndependentDecoder(demo_vae)  # one rank's decoder, given its blocks in any order
    for j in order:
        frames = decoder.decode(j, latents[:, :, j * N:(j + 1) * N])
        assert frames.shape == streamed[j].shape and np.array_equal(frames, streamed[j])


def test_latent_frames_decoded_on_their_own_equal_the_stream(demo_vae, latents, streamed):
    """The split of every block between the ranks by their backlog (split_block): each rank's runs, decoded in
    any order by one decoder, give the block's streamed frames at the places part_frames says."""
    assert split_block(0, 2, [0, 0], 4) == [None, (0, 2)]  # rank 1 keeps up: it takes the whole block
    assert split_block(0, 2, [0, 3], 4) == [(1, 2), (0, 1)] and split_block(0, 2, [0, 4], 4) == [(0, 2), None]
    assert split_block(5, 1, [0, 0], 2) == [None, (0, 1)] and split_block(1, 4, [0], 8) == [(0, 4)]  # 1 rank
    assert split_block(0, 2, [0, 0, 0, 0], 4) == [None, (0, 1), (1, 2), None]  # ties rotate with the block
    assert split_block(1, 2, [0, 0, 0, 0], 4) == [None, None, (0, 1), (1, 2)]
    assert split_block(1, 3, [0, 1, 0, 4], 4) == [None, (0, 1), (1, 3), None]  # the least indebted first
    assert [part_frames(0, p, 4) for p in [(0, 1), (1, 2), (0, 2)]] == [(0, 1), (1, 5), (0, 5)]
    assert [part_frames(3, p, 4) for p in [(0, 1), (1, 2)]] == [(0, 4), (4, 8)]
    for world_size, outstanding in [(2, [0, 3]), (3, [0, 0, 0]), (3, [0, 1, 0])]:
        decoded = {j: np.zeros_like(streamed[j]) for j in range(BLOCKS)}
        for rank in reversed(range(world_size)):
            decoder = IndependentDecoder(demo_vae)  # this rank's decoder
            for j in (2, 0, 3, 1):
                for k0, k1 in [run for run in [split_block(j, N, outstanding, 4)[rank]] if run is not None]:
                    a, b = part_frames(j, (k0, k1), 4)
                    decoded[j][a:b] = decoder.decode(j, latents[:, :, j * N + k0:j * N + k1], first_latent_frame=k0)
        for j in range(BLOCKS):
            assert np.array_equal(decoded[j], streamed[j]), (world_size, j)


def test_resume_decodes_the_frames_another_rank_had_not_written(demo_vae, latents, streamed, tmp_path):
    store = RunStore.create(tmp_path / "run.zarr", config={}, num_latent_frames=N * BLOCKS, block_latent_frames=N,
                            latent_channels=C, latent_height=h, latent_width=w, height=8 * h, width=8 * w, fps=16.0,
                            model_id="demo", num_frames=1 + 4 * (N * BLOCKS - 1) - 2)  # the last block is cut
    for j in range(BLOCKS):
        store.write_block_latents(j, latents[0, :, j * N:(j + 1) * N].permute(1, 0, 2, 3).numpy())
        store.mark_done("latents", j)
    store.write_block_frames(0, streamed[0])
    store.mark_done("frames", 0)  # blocks 1-3: decoded elsewhere, not sent back before the checkpoint
    env = SimpleNamespace(rank=0, world_size=1)
    sink = SpreadBlockSink(store, IndependentDecoder(demo_vae), env, latent_shape=(C, h, w),
                           frame_shape=(8 * h, 8 * w), block_latent_frames=N)
    try:
        sink.load_state_dict({"kind": "spread", "blocks_submitted": 3})  # block 3 left the queue after it
    finally:
        sink.close()
    assert store.done("frames").tolist() == [True, True, True, False]
    assert sink.state_dict() == {"kind": "spread", "blocks_submitted": 3}
    expected = np.concatenate(streamed[:3])
    assert np.array_equal(store.read_frames(0, len(expected)), expected)
    sink = SpreadBlockSink(store, IndependentDecoder(demo_vae), env, latent_shape=(C, h, w),
                           frame_shape=(8 * h, 8 * w), block_latent_frames=N)
    try:
        sink.load_state_dict({"format": 1, "feat_cache": []})  # a streaming sink's state: nothing to decode
        sink.submit(3, latents[:, :, 3 * N:])  # the cut last block: written up to num_frames
        sink.finish()
    finally:
        sink.close()
    assert store.done("frames").all()
    assert np.array_equal(store.read_frames(0, store.num_frames), np.concatenate(streamed)[: store.num_frames])


def test_a_checkpoint_is_not_passed_over_for_frames_a_resume_decodes_again(latents, streamed, tmp_path):
    """The spread sink's checkpoints record frames_from_latents (blocks submitted): a block below it whose only
    fault is frames not done yet (its part was still on rank 1) does not make the resume pass over it."""
    from hpcvideo.store.recovery import plan_resume

    store = RunStore.create(tmp_path / "run.zarr", config={}, num_latent_frames=N * BLOCKS, block_latent_frames=N,
                            latent_channels=C, latent_height=h, latent_width=w, height=8 * h, width=8 * w, fps=16.0,
                            model_id="demo")
    for j in range(3):
        store.write_block_latents(j, latents[0, :, j * N:(j + 1) * N].permute(1, 0, 2, 3).numpy())
        store.mark_done("latents", j)
    store.write_block_frames(0, streamed[0])
    store.mark_done("frames", 0)  # blocks 1 and 2: latents on disk, frames not written at the checkpoint
    store.save_state(b"older", tick=10, num_blocks=BLOCKS, stale_from=1)
    store.save_state(b"newer", tick=12, num_blocks=BLOCKS, stale_from=3, frames_from_latents=3)
    plan = plan_resume(store, BLOCKS)
    assert (plan.blob, plan.recompute_from, plan.skipped) == (b"newer", 3, [])
    store.save_state(b"without", tick=12, num_blocks=BLOCKS, stale_from=3)  # no record: passed over
    plan = plan_resume(store, BLOCKS)
    assert (plan.blob, plan.recompute_from) == (b"newer", 3) and len(plan.skipped) == 1
    store.clear_done("latents", [1])  # latents not done: never excused
    store.save_state(b"again", tick=13, num_blocks=BLOCKS, stale_from=3, frames_from_latents=3)
    plan = plan_resume(store, BLOCKS)
    assert plan.blob is None and len(plan.skipped) == 2


@pytest.mark.mpi
@pytest.mark.e2e
def test_a_spread_decode_killed_and_resumed_on_2_ranks_equals_the_recorded_run(mpi_runs):
    """demo-cpu (61 frames, the golden settings) killed at the start of tick 14 on 2 ranks, after a checkpoint
    at every tick (blocks 0-2 had left the queue; rank 1 decodes a part of each), resumed on 2 ranks: the same bits as
    the uninterrupted run (tests/test_golden_hashes.py)."""
    from tests.helpers import MPI_KILLED
    from tests.test_golden_hashes import DEMO_PINNED, GOLDEN, _sha256

    assert MPI_KILLED["demo-spread-killed-on-2"][1:] == (2, "tick:14", 2)
    run = mpi_runs(2)["demo-spread-killed-on-2"]
    assert run["killed"]["resume_tick"] == 14 and run["returncode"] == 0, run["stderr"]
    store = RunStore.open(run["path"])
    assert store.status_dict()["complete"] and store.done("frames").all()
    latents, frames = store.read_latents(0, store.num_latent_frames), store.read_frames(0, store.num_frames)
    assert (_sha256(latents), _sha256(frames)) == GOLDEN[("demo-cpu", 2, DEMO_PINNED)][:2]
