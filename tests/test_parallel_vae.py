"""Patch-parallel Wan VAE decode (hpcvideo.parallel_vae) against the single-rank streaming decode.

In-process: the ranks are threads, each with its own copy of a small random Wan2.1-style VAE (mid-block
attention, temporal upsamplers, feature cache), exchanging rows through queues with the methods of
``TorchComm`` (the torch.distributed path itself is run by bench/bench_vae_decode.py over gloo).
"""

import copy
import queue
import threading

import numpy as np
import pytest
import torch

from hpcvideo.decode import StreamingDecoder, to_uint8
from hpcvideo.parallel_vae import PatchParallelDecoder, band_rows

pytestmark = pytest.mark.unit


class ThreadWorld:
    def __init__(self, n):
        self.n = n
        self.queues = {(a, b): queue.Queue() for a in range(n) for b in range(n)}
        self.barrier = threading.Barrier(n, timeout=60)
        self.slots = [None] * n


class ThreadComm:
    """TorchComm's methods for ranks that are threads of one process."""

    def __init__(self, world, rank):
        self.world, self.rank, self.world_size = world, rank, world.n

    def halo(self, x, p):
        w, r = self.world, self.rank
        shape = (*x.shape[:-2], p, x.shape[-1])
        if r > 0:
            w.queues[(r, r - 1)].put(x[..., :p, :].clone())
        if r < w.n - 1:
            w.queues[(r, r + 1)].put(x[..., -p:, :].clone())
        above = w.queues[(r - 1, r)].get(timeout=60) if r > 0 else torch.zeros(shape, dtype=x.dtype)
        below = w.queues[(r + 1, r)].get(timeout=60) if r < w.n - 1 else torch.zeros(shape, dtype=x.dtype)
        return torch.cat([above, x, below], dim=-2)

    def _gather(self, x, dim):
        w = self.world
        w.barrier.wait()
        w.slots[self.rank] = x.clone()
        w.barrier.wait()
        whole = torch.cat(list(w.slots), dim=dim)
        w.barrier.wait()
        return whole

    def allgather_rows(self, x, sizes):
        assert x.shape[-2] == sizes[self.rank]
        return self._gather(x, -2)

    def gather_rows(self, x, sizes, *, dim):
        whole = self._gather(x, dim)
        return whole if self.rank == 0 else None


def small_vae(kind="wan2.1"):
    """A small random VAE with Wan2.1's layout, or Wan2.2's (residual up blocks, patch size 2: 16x spatial)."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    extra = {}
    if kind == "wan2.2":
        extra = dict(decoder_base_dim=8, is_residual=True, in_channels=12, out_channels=12, patch_size=2,
                     scale_factor_spatial=16, scale_factor_temporal=4)
    return AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 4, 4], num_res_blocks=1, attn_scales=[],
                            temperal_downsample=[False, True, True], latents_mean=[0.1, -0.2, 0.0, 0.3],
                            latents_std=[1.0, 1.5, 2.0, 0.5], **extra).eval()


def run_ranks(vae, n, blocks, latent_height):
    """Each rank's uint8 frames of each block (rank 0: whole frames) and its float band per block."""
    world = ThreadWorld(n)
    results, errors = [None] * n, []

    def rank_main(rank):
        try:
            decoder = PatchParallelDecoder(copy.deepcopy(vae), ThreadComm(world, rank), latent_height=latent_height)
            bands, frames = [], []
            for block in blocks:
                bands.append(decoder.decode_block(block))
            decoder.reset()
            for block in blocks:
                frames.append(decoder.decode_block_uint8(block))
            results[rank] = (bands, frames)
        except BaseException as error:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(error)
            world.barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(rank,)) for rank in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("kind,n", [("wan2.1", 2), ("wan2.1", 3), ("wan2.2", 2)])
def test_patch_parallel_equals_single_rank(kind, n):
    """Two blocks (the second continues the first's feature cache) on n ranks, 7 latent rows (uneven bands):
    the float frames within 2e-6 of the single-rank stream, uint8 frames within 1 on at most 0.1% of values."""
    vae = small_vae(kind)
    factor = 16 if kind == "wan2.2" else 8
    h, w = 7, 5
    latents = torch.randn(1, 4, 5, h, w, generator=torch.Generator().manual_seed(1))
    blocks = [latents[:, :, :2], latents[:, :, 2:]]
    reference = StreamingDecoder(copy.deepcopy(vae))
    expected = [reference.decode_block(block) for block in blocks]
    results = run_ranks(vae, n, blocks, h)
    for j, want in enumerate(expected):
        whole = torch.cat([results[rank][0][j] for rank in range(n)], dim=-2)
        assert whole.shape == want.shape == (1, 3, 5 if j == 0 else 12, h * factor, w * factor)
        assert (whole - want).abs().max().item() < 2e-6
        got, want8 = results[0][1][j].astype(int), to_uint8(want).astype(int)
        assert got.shape == want8.shape
        assert np.abs(got - want8).max() <= 1 and (got != want8).mean() <= 1e-3
        assert all(results[rank][1][j] is None for rank in range(1, n))
    for rank in range(n):  # each rank holds its band only
        r0, r1 = band_rows(h, n)[rank]
        assert results[rank][0][1].shape[-2] == (r1 - r0) * factor


def test_refusals():
    """More ranks than latent rows is refused by name before any decode; with the model's facts, at its own stride
    (Wan2.2 TI2V's VAE: 16x)."""
    from hpcvideo.config import load_config
    from hpcvideo.parallel_vae import ranks_problem

    with pytest.raises(ValueError, match="world_size=4"):
        band_rows(3, 4)
    assert band_rows(7, 3) == [(0, 3), (3, 5), (5, 7)]
    cfg = load_config("tiny-test", overrides=["runtime.vae_decode=rows", "store.path=unused.zarr"])  # height 32
    assert ranks_problem(cfg, 4) is None and ranks_problem(cfg, 2, 16) is None
    assert "the 2 latent rows of video.height=32, but the job has 3 ranks" in ranks_problem(cfg, 3, 16)


@pytest.mark.mpi
@pytest.mark.e2e
def test_rows_decode_killed_on_2_ranks_and_resumed_on_3_equals_the_1_rank_run(mpi_runs, tiny_test_arrays):
    """tiny-test with ``runtime.vae_decode=rows``: killed at the start of tick 6 on 2 ranks (blocks 0-1 decoded
    by both ranks together and written), resumed on 3 ranks (bands of 2, 1, 1 latent rows; blocks 0-1 decoded
    again for the carry, not written): the latents bit-identical to the 1-rank run, the frames within 1."""
    from tests.helpers import MPI_KILLED

    assert MPI_KILLED["tiny-test-rows-killed-on-2"][1:] == (2, "tick:6", 3)
    run = mpi_runs(3)["tiny-test-rows-killed-on-2"]
    assert run["returncode"] == 0, run["stderr"]
    assert run["killed"]["resume_tick"] == 6
    from hpcvideo.store import RunStore

    store = RunStore.open(run["path"])
    latents, frames = store.read_latents(0, store.num_latent_frames), store.read_frames(0, store.num_frames)
    ref_latents, ref_frames = tiny_test_arrays
    assert np.array_equal(latents, ref_latents)
    difference = np.abs(frames.astype(int) - ref_frames.astype(int))
    assert difference.max() <= 1 and (difference > 0).mean() <= 1e-3
    stats = store.attrs["rank_stats"]
    assert [(s["decode_blocks"], s["decode_replayed_blocks"]) for s in stats] == [(2, 2)] * 3


def test_rows_decode_refused_outside_dualparal_wan(tmp_path):
    """A value not allowed, ``rows`` with Video-Infinity, and more ranks than latent rows are refused by key before
    any work (exit 2)."""
    from tests.helpers import cli

    out = tmp_path / "run.zarr"
    result = cli("generate", "tiny-test", "--output", out, "--set", "runtime.vae_decode=columns", "--no-progress",
                 check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "runtime.vae_decode='columns' is not allowed; allowed: 'auto', 'rows'" in result.stderr
    result = cli("generate", "tiny-vi-wan", "--output", out, "--set", "runtime.vae_decode=rows", "--no-progress",
                 check=False)
    assert result.returncode == 2 and "runtime.vae_decode='rows' with strategy.name='videoinfinity'" in result.stderr
    result = cli("generate", "tiny-test", "--output", out, "--ranks", 3, "--set", "video.height=16", "--set",
                 "runtime.vae_decode=rows", "--no-progress", check=False)  # 2 latent rows for 3 ranks
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "runtime.vae_decode='rows' gives each rank a band of the 2 latent rows" in result.stderr
    assert not out.exists()


def test_a_run_checkpointed_with_rows_resumes_with_the_rank_0_stream(tmp_path, tiny_test_run, tiny_test_arrays,
                                                                      tiny_model_dir):
    """A store checkpointed under ``runtime.vae_decode: rows`` (no decoder carry on rank 0) resumed with the default
    decode: rank 0's streaming sink decodes the covered blocks again from their stored latents (the carry), writes
    the frames not done, and then continues exactly as the uninterrupted single-rank stream."""
    from hpcvideo.decode import StreamingDecoder
    from diffusers import AutoencoderKLWan
    from hpcvideo.store import RunStore
    from hpcvideo.writer import BlockSink
    from tests.helpers import copy_store

    store = RunStore.open(copy_store(tiny_test_run, tmp_path / "run.zarr"), mode="r+")
    store.clear_done("frames", [1])  # block 1 was denoised (latents on disk) but not decoded at the checkpoint
    vae = AutoencoderKLWan.from_pretrained(tiny_model_dir, subfolder="vae", local_files_only=True)
    sink = BlockSink(store, StreamingDecoder(vae, device="cpu"))
    sink.load_state_dict({"kind": "rows", "blocks_decoded": 1, "blocks_submitted": 2})
    n = store.block_latent_frames
    reference = StreamingDecoder(vae, device="cpu")
    for j in range(2):
        reference.decode_block(torch.from_numpy(np.asarray(store.read_latents(j * n, (j + 1) * n))).permute(1, 0, 2, 3)[None])
    carried, expected = sink.decoder.state_dict(), reference.state_dict()
    assert carried["num_latent_frames_decoded"] == expected["num_latent_frames_decoded"] == 2 * n
    assert all(torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
               for a, b in zip(carried["feat_cache"], expected["feat_cache"], strict=True))
    sink.close()
    assert store.done("frames")[1]
    assert np.array_equal(store.read_frames(0, store.num_frames), tiny_test_arrays[1])
