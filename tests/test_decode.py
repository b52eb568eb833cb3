"""hpcvideo.decode: block-by-block VAE decode equals decoding the whole latent video."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from hpcvideo.decode import StreamingDecoder, decode_latents, to_uint8
from hpcvideo.models import build_tiny_wan, load_wan

Z_DIM, LATENT_FRAMES, LATENT_H, LATENT_W = 4, 7, 4, 6


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    path = build_tiny_wan(tmp_path_factory.mktemp("tiny") / "tiny-wan", seed=0)
    return load_wan(path, parts=("vae",)).vae


@pytest.fixture(scope="module")
def latents():
    g = torch.Generator().manual_seed(123)
    return torch.randn(1, Z_DIM, LATENT_FRAMES, LATENT_H, LATENT_W, generator=g)


@pytest.fixture(scope="module")
def reference(vae, latents):
    return decode_latents(vae, latents)


def _roundtrip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("blocks", [(2, 3, 2), (3, 3, 1), (2, 2, 2, 1), (1,) * 7])
@pytest.mark.parametrize("resume", [False, True], ids=["carry", "state_dict"])
def test_streaming_equals_whole(vae, latents, reference, blocks, resume):
    assert sum(blocks) == LATENT_FRAMES
    decoder = StreamingDecoder(vae)
    outs, start = [], 0
    for j, n in enumerate(blocks):
        if resume and j > 0:
            state = _roundtrip(decoder.state_dict())
            decoder = StreamingDecoder(vae)  # a new decoder, as after a restart
            decoder.load_state_dict(state)
            assert decoder.num_latent_frames_decoded == start
        expected_frames = decoder.num_frames_for(n)
        out = decoder.decode_block(latents[:, :, start : start + n])
        assert out.dtype == torch.float32
        assert out.shape == (1, 3, expected_frames, 8 * LATENT_H, 8 * LATENT_W)
        assert expected_frames == (1 + 4 * (n - 1) if j == 0 else 4 * n)
        outs.append(out)
        start += n
    video = torch.cat(outs, dim=2)
    assert decoder.num_latent_frames_decoded == LATENT_FRAMES
    assert video.shape == reference.shape == (1, 3, 1 + 4 * (LATENT_FRAMES - 1), 8 * LATENT_H, 8 * LATENT_W)
    max_diff = (video - reference).abs().max().item()
    print(f"blocks={blocks} resume={resume} max_abs_diff={max_diff:.3g}")
    assert max_diff <= 1e-5


def test_reference_matches_wan_pipeline_denormalisation(vae, latents, reference):
    # WanPipeline: latents / (1 / std) + mean, then vae.decode
    mean = torch.tensor(vae.config.latents_mean).view(1, Z_DIM, 1, 1, 1)
    std = 1.0 / torch.tensor(vae.config.latents_std).view(1, Z_DIM, 1, 1, 1)
    with torch.no_grad():
        want = vae.decode(latents / std + mean, return_dict=False)[0]
    assert torch.equal(reference, want)
    assert reference.min() >= -1 and reference.max() <= 1


def test_state_size_is_constant(vae, latents):
    """The carried cache does not grow with the number of frames decoded."""
    decoder = StreamingDecoder(vae)
    sizes = []
    for start in range(0, LATENT_FRAMES, 2):
        decoder.decode_block(latents[:, :, start : start + 2])
        state = decoder.state_dict()
        sizes.append(sum(t.numel() for t in state["feat_cache"] if isinstance(t, torch.Tensor)))
    assert len(set(sizes[1:])) == 1


def test_state_dict_contents(vae, latents):
    decoder = StreamingDecoder(vae)
    state = decoder.state_dict()
    assert state["num_latent_frames_decoded"] == 0 and all(e is None for e in state["feat_cache"])
    decoder.decode_block(latents[:, :, :1])
    state = _roundtrip(decoder.state_dict())
    assert state["num_latent_frames_decoded"] == 1
    assert "Rep" in state["feat_cache"]  # the temporal upsamplers after the first frame
    assert all(e is None or e == "Rep" or e.device.type == "cpu" for e in state["feat_cache"])
    bad = dict(state, feat_cache=state["feat_cache"][:-1])
    with pytest.raises(ValueError, match="cache entries"):
        StreamingDecoder(vae).load_state_dict(bad)


def test_rejects_tiling_and_bad_shapes(vae, latents):
    vae.enable_tiling()
    try:
        with pytest.raises(ValueError, match="tiling"):
            StreamingDecoder(vae)
    finally:
        vae.disable_tiling()
    decoder = StreamingDecoder(vae)
    with pytest.raises(ValueError, match="shape"):
        decoder.decode_block(latents[:, :2])
    with pytest.raises(ValueError, match="empty"):
        decoder.decode_block(latents[:, :, :0])


def test_to_uint8(reference):
    frames = to_uint8(reference)
    assert isinstance(frames, np.ndarray) and frames.dtype == np.uint8
    assert frames.shape == (reference.shape[2], reference.shape[3], reference.shape[4], 3)
    want = ((reference[0] / 2 + 0.5).clamp(0, 1) * 255).round().permute(1, 2, 3, 0).to(torch.uint8).numpy()
    np.testing.assert_array_equal(frames, want)
    edge = torch.tensor([-1.0, -2.0, 0.0, 1.0, 3.0]).view(1, 1, 5, 1, 1).expand(1, 3, 5, 1, 1)
    assert to_uint8(edge)[:, 0, 0, 0].tolist() == [0, 0, 128, 255, 255]


def test_frames_do_not_depend_on_the_thread_count():
    """1 rank on a 2-core node decodes with 2 threads, 2 ranks with 1 each: the same latents give the same bits
    (the demo model's VAE: its small convolutions hit PyTorch's im2col kernel, whose sums depend on the threads)."""
    from diffusers import AutoencoderKLWan

    from hpcvideo.demo import WEIGHTS_DIR

    vae = AutoencoderKLWan.from_pretrained(WEIGHTS_DIR / "vae").eval()
    latents = torch.randn(1, vae.config.z_dim, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    threads = torch.get_num_threads()
    videos = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            videos.append(StreamingDecoder(vae).decode_block(latents))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(videos[0], videos[1])
    reference = decode_latents(vae, latents)  # diffusers' own decode: the same up to float rounding
    assert (videos[0] - reference).abs().max().item() <= 1e-5
