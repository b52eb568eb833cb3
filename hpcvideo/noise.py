"""Initial noise as a pure function of (seed, block index).

Every rank, every resume and every extension asks for block ``j``'s noise and gets the same bits,
without replaying any random stream: the generator of block ``j`` is seeded from ``(seed, j)``
through :class:`numpy.random.SeedSequence`. Noise is drawn on the CPU in float32, so it does not
depend on the device either.

Two modes (``strategy.noise_init``):

* ``"independent"``: block ``j`` gets fresh N(0, I) noise of shape (C, n, h, w).
* ``"coordinated"`` (DualParal, arXiv 2505.21070, "coordinated noise initialisation"; FreeNoise-style
  rescheduling): one base window of ``n + c`` noise frames is drawn once from ``seed``; every block's
  noise is a reshuffle of frames of that window. Block 0 takes ``n`` frames of a random permutation
  of the window; block ``j > 0`` takes a random permutation of the ``n`` window frames that are NOT
  among the last ``c`` frames of block ``j - 1``. So the attention input of every block (last ``c``
  frames of the previous block ++ its own ``n``) is a permutation of the whole base window, with no
  frame repeated. (The official code reaches the same invariant by a recursion over templates; here
  the index chain is replayed from ``(seed, k)`` for k <= j, which costs microseconds per block.)
"""

from __future__ import annotations

import numpy as np
import torch

from .config.schema import NOISE_MODES  # the allowed strategy.noise_init names, defined once


def _generator(seed: int, *key: int) -> torch.Generator:
    """A CPU generator seeded from (seed, *key); distinct keys give independent streams."""
    state = np.random.SeedSequence([int(seed), *map(int, key)]).generate_state(2, dtype=np.uint32)
    return torch.Generator(device="cpu").manual_seed(int(state[0]) << 32 | int(state[1]))


_INDEX_CHAINS: dict[tuple[int, int, int], list[tuple[int, ...]]] = {}


def _coordinated_indices(seed: int, block_index: int, block_latent_frames: int, context_latent_frames: int) -> tuple[int, ...]:
    """Indices into the base window (length n + c) of block ``block_index``'s n noise frames.

    The chain k = 0..block_index is computed once per (seed, n, c) and kept (n ints per block).
    """
    n, c = block_latent_frames, context_latent_frames
    chain = _INDEX_CHAINS.setdefault((seed, n, c), [])
    while len(chain) <= block_index:
        k = len(chain)
        if k == 0:
            perm = torch.randperm(n + c, generator=_generator(seed, 1, 0))
            chain.append(tuple(int(i) for i in perm[:n]))
            continue
        excluded = set(chain[k - 1][n - c:]) if c > 0 else set()
        free = [i for i in range(n + c) if i not in excluded]  # n indices (c <= n)
        perm = torch.randperm(len(free), generator=_generator(seed, 1, k))
        chain.append(tuple(free[int(i)] for i in perm))
    return chain[block_index]


def block_noise(
    *,
    seed: int,
    block_index: int,
    block_latent_frames: int,
    context_latent_frames: int,
    latent_channels: int,
    latent_height: int,
    latent_width: int,
    mode: str = "coordinated",
) -> torch.Tensor:
    """Initial noise of one block.

    Returns a float32 CPU tensor of shape (1, latent_channels, block_latent_frames, latent_height,
    latent_width). Pure in its arguments. Raises ValueError for an unknown ``mode`` or a negative
    block index.
    """
    if mode not in NOISE_MODES:
        raise ValueError(f"strategy.noise_init={mode!r} is not one of {NOISE_MODES}")
    if block_index < 0:
        raise ValueError(f"block_index={block_index} must be >= 0")
    n, c = block_latent_frames, context_latent_frames
    if mode == "independent":
        shape = (1, latent_channels, n, latent_height, latent_width)
        return torch.randn(shape, generator=_generator(seed, 0, block_index), dtype=torch.float32)
    shape = (1, latent_channels, n + c, latent_height, latent_width)
    base = torch.randn(shape, generator=_generator(seed, 2), dtype=torch.float32)
    index = torch.tensor(_coordinated_indices(int(seed), int(block_index), n, c))
    return base[:, :, index].contiguous()


def frame_noise(
    *, seed: int, start: int, stop: int, latent_channels: int, latent_height: int, latent_width: int
) -> torch.Tensor:
    """Initial noise of latent frames [start, stop) of the video (Video-Infinity clips).

    Every frame has its own generator, seeded from (seed, frame index), so a clip's noise does not
    depend on how the video is split into clips (or on the number of ranks). Returns a float32 CPU
    tensor of shape (1, latent_channels, stop - start, latent_height, latent_width). Raises
    ValueError for a negative or empty range.
    """
    if not 0 <= start < stop:
        raise ValueError(f"frame range [{start}, {stop}) must satisfy 0 <= start < stop")
    shape = (latent_channels, latent_height, latent_width)
    frames = [torch.randn(shape, generator=_generator(seed, 3, f), dtype=torch.float32) for f in range(start, stop)]
    return torch.stack(frames, dim=1).unsqueeze(0)
