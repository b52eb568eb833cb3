"""Video-Infinity clip parallelism (arXiv 2406.16260) on UNet3D and Wan: layout, masks, patches, and
the N-rank forward against the single-process executor and (exact mode) unsplit diffusers.

Tolerances: Wan has no GroupNorm, and its N-rank forward is bit-identical to the reference and, in
exact mode, to diffusers. UNet3D's frame-spanning GroupNorms take video-wide statistics from
per-frame float64 sums instead of torch's kernel, and the split runs its convolutions on shorter
tensors: float32 round-off, measured max |diff| 1.7e-6 on outputs of magnitude ~1.3; asserted 1e-5.
"""

import shutil

import pytest
import torch

from hpcvideo.strategies.videoinfinity.clips import ClipComm, ClipLayout, DualScope, global_frame_indices
from hpcvideo.strategies.videoinfinity.masks import frame_mask
from hpcvideo.strategies.videoinfinity.reference import patched, reference_forward
from tests.mpi.videoinfinity_forward import EXACT, NUM_FRAMES, cases, load_models

UNET3D_ATOL = 1e-5


def test_layout_and_halo_ranges():
    layout = ClipLayout(rank=1, world_size=4, clip_frames=4)
    assert (layout.start, layout.stop, layout.num_frames) == (4, 8, 16)
    assert layout.halo_range(1, 2, 2) == ((2, 4), (8, 10))
    assert layout.halo_range(0, 2, 2) == ((0, 0), (4, 6))  # true start: no left halo, no zero pads
    assert layout.halo_range(3, 6, 6) == ((6, 12), (16, 16))  # longer than a clip: two owners
    with pytest.raises(ValueError):
        ClipLayout(rank=4, world_size=4, clip_frames=4)


def test_stand_in_exchanges_keep_the_shapes_of_a_synchronised_run_and_send_nothing():
    # the benchmark's "stand-in" mode (same compute as the real run, no messages): without a process group
    x = torch.randn(2, 3, 4, 5)  # frames on dim 2
    for rank, (n_left, n_right) in ((0, (0, 2)), (1, (2, 2)), (3, (2, 0))):
        comm = ClipComm(ClipLayout(rank=rank, world_size=4, clip_frames=4), sync="stand-in")
        left, right = comm.halo(x, dim=2, before=2, after=2)
        assert left.shape == (2, 3, n_left, 5) and right.shape == (2, 3, n_right, 5)
        assert comm.global_frames(x, dim=2, global_frames=6).shape == (2, 3, 6, 5)
        assert torch.equal(comm.sum(x), x)
        assert comm.bytes_sent == comm.bytes_received == 0
    with pytest.raises(ValueError, match="sync='yes'"):
        ClipComm(ClipLayout(rank=0, world_size=2, clip_frames=4), sync="yes")


def test_global_set_depends_on_the_video_only():
    assert global_frame_indices(16, 4) == [0, 4, 8, 12]
    assert global_frame_indices(8, 3) == [0, 2, 5]
    assert global_frame_indices(3, 16) == [0, 1, 2]
    assert global_frame_indices(8, 0) == []


def test_frame_mask_matches_the_definition():
    scope = DualScope(local_frames=1, global_frames=2, switch_timestep=800, global_bias=10.0)
    queries, local = range(4, 6), range(3, 7)
    inf = float("-inf")
    early = frame_mask(queries, local, 2, scope, "global", device="cpu", dtype=torch.float32)
    assert early.tolist() == [[0, 10, 0, inf, 10, 10], [inf, 0, 10, 0, 10, 10]]  # own frame (4, 5) exempt
    released = DualScope(local_frames=1, global_frames=2, switch_timestep=800, global_bias=10.0, exempt_own_frame=False)
    early = frame_mask(queries, local, 2, released, "global", device="cpu", dtype=torch.float32)
    assert early.tolist() == [[0, 0, 0, inf, 10, 10], [inf, 0, 0, 0, 10, 10]]
    late = frame_mask(queries, local, 2, scope, "local", device="cpu", dtype=torch.float32)
    assert late.tolist() == [[10, 10, 10, inf, 0, 0], [inf, 10, 10, 10, 0, 0]]
    assert frame_mask(queries, local, 0, scope, "-", device="cpu", dtype=torch.float32).tolist() == [
        [True, True, True, False], [False, True, True, True]]
    assert frame_mask(range(0, 2), range(0, 2), 0, scope, "-", device="cpu", dtype=torch.float32) is None


@pytest.fixture(scope="module")
def models(tiny_unet3d_dir, tiny_model_dir):
    return load_models(tiny_unet3d_dir, tiny_model_dir)


@torch.no_grad()
def test_dual_scope_temporal_attention_matches_a_dense_definition(models):
    """One UNet3D temporal attention with the patch (one rank, whole video) against softmax written out."""
    from diffusers.models.transformers.transformer_temporal import TransformerTemporalModel

    unet = models["unet3d"]
    attn = next(m for m in unet.modules() if isinstance(m, TransformerTemporalModel)).transformer_blocks[0].attn1
    x = torch.randn(3, 6, attn.to_q.in_features, generator=torch.Generator().manual_seed(0))  # (N, T, C)
    comm = ClipComm(ClipLayout(rank=0, world_size=1, clip_frames=6))
    for timestep, exempt in ((900.0, True), (900.0, False), (100.0, True)):
        scope = DualScope(local_frames=1, global_frames=2, switch_timestep=500.0, global_bias=3.0, exempt_own_frame=exempt)
        with patched(unet, "unet3d", comm=comm, scope=scope):
            unet._video_infinity[0].timestep = timestep
            got = attn(x)
        heads, d = attn.heads, attn.to_q.out_features // attn.heads
        q, k, v = (f(x).view(3, 6, heads, d) for f in (attn.to_q, attn.to_k, attn.to_v))
        glob = global_frame_indices(6, 2)  # [0, 3]
        rows = []
        for f in range(6):
            keys = [j for j in range(6) if abs(j - f) <= 1]
            own = 3.0 if timestep < 500 or exempt else 0.0  # the query frame's own key
            bias = [own if j == f else 3.0 if timestep < 500 else 0.0 for j in keys] + [3.0 if timestep >= 500 else 0.0] * len(glob)
            kk, vv = k[:, keys + glob], v[:, keys + glob]  # (N, K, heads, d)
            logits = torch.einsum("nhd,nkhd->nhk", q[:, f], kk) / d**0.5 + torch.tensor(bias)
            rows.append(torch.einsum("nhk,nkhd->nhd", logits.softmax(-1), vv).reshape(3, heads * d))
        want = attn.to_out[0](torch.stack(rows, dim=1))
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


@torch.no_grad()
def test_patches_are_reversible_and_refuse_to_stack(models):
    for family, (name, fam, scope, t, latents, text) in zip(("unet3d", "wan"), (cases()[0], cases()[3])):
        model = models[family]
        before = model(latents, torch.tensor([t]), text, return_dict=False)[0]
        comm = ClipComm(ClipLayout(rank=0, world_size=1, clip_frames=NUM_FRAMES))
        with patched(model, family, comm=comm, scope=DualScope(local_frames=1, global_frames=2)):
            changed = model(latents, torch.tensor([t]), text, return_dict=False)[0]
            with pytest.raises(ValueError, match="already patched"):
                with patched(model, family, comm=comm, scope=EXACT):
                    pass
        after = model(latents, torch.tensor([t]), text, return_dict=False)[0]
        assert torch.equal(before, after)
        assert not torch.allclose(before, changed, atol=1e-3)  # the patch does act


@torch.no_grad()
def test_exact_mode_on_one_rank_equals_diffusers(models):
    for name, family, scope, t, latents, text in cases():
        if scope is not EXACT:
            continue
        stock = models[family](latents, torch.tensor([t]), text, return_dict=False)[0]
        got = reference_forward(models[family], family, latents, torch.tensor([t]), text, scope=scope)
        if family == "wan":
            assert torch.equal(got, stock), name
        else:
            torch.testing.assert_close(got, stock, atol=UNET3D_ATOL, rtol=0)


@pytest.fixture(scope="module")
def references(models):
    out = {}
    with torch.no_grad():
        for name, family, scope, t, latents, text in cases():
            stock = models[family](latents, torch.tensor([t]), text, return_dict=False)[0]
            out[name] = (family, scope, stock, reference_forward(models[family], family, latents, torch.tensor([t]), text, scope=scope))
    return out


@pytest.mark.mpi
@pytest.mark.parametrize("num_ranks", [2, 4])
def test_ranks_equal_the_reference_and_exact_mode_equals_diffusers(mpi_world, references, num_ranks):
    """The "vi_forward" scenario of the one launch per world size (tests/conftest.py: mpi_world)."""
    out = mpi_world(num_ranks)["vi_forward"]
    got = torch.load(out)["noise_pred"]
    for name, (family, scope, stock, reference) in references.items():
        if family == "wan":
            assert torch.equal(got[name], reference), name
        else:
            torch.testing.assert_close(got[name], reference, atol=UNET3D_ATOL, rtol=0, msg=name)
        if scope is EXACT:
            torch.testing.assert_close(got[name], stock, atol=0 if family == "wan" else UNET3D_ATOL, rtol=0, msg=name)
        else:
            assert not torch.allclose(got[name], stock, atol=1e-2), name  # dual scope changes the result


def test_config_rules_for_clips():
    from hpcvideo.config import ConfigError, load_config
    from hpcvideo.strategies.videoinfinity.executor import check_fit, scope_of

    from hpcvideo.layout import resolve_config

    derived = load_config("tiny-vi-unet3d", check_paths=False)
    assert derived.strategy.clip_latent_frames is None  # derived from the rank count
    cfg = resolve_config(derived, 4)
    assert cfg.strategy.clip_latent_frames == 4 and resolve_config(derived, 2).strategy.clip_latent_frames == 8
    assert (cfg.num_latent_frames, cfg.num_blocks, cfg.block_first_frame(2)) == (16, 4, 8)  # per-frame VAE
    assert [cfg.prompt_index_for_block(r) for r in range(4)] == [0, 0, 1, 1]  # clip r's prompt
    # the first round(0.5 * 4) = 2 of DDIM's steps global: the switch between their timesteps
    assert scope_of(cfg, torch.tensor([751, 501, 251, 1])) == DualScope(local_frames=2, global_frames=4,
                                                                        switch_timestep=376.0, global_bias=10.0)
    released = load_config("tiny-vi-unet3d", ["strategy.switch_fraction=null", "strategy.switch_timestep=500",
                                              "strategy.exempt_own_frame=false"], check_paths=False)
    assert scope_of(released, [751, 501, 251, 1]) == DualScope(local_frames=2, global_frames=4, switch_timestep=500.0,
                                                               global_bias=10.0, exempt_own_frame=False)
    wan = resolve_config(load_config("tiny-vi-wan", check_paths=False), 4)
    assert (wan.num_latent_frames, wan.num_blocks) == (8, 4)
    # any frame count: the clips cover the video (the last one may reach past it)
    odd = load_config("tiny-vi-unet3d", ["video.num_frames=30", "strategy.clip_latent_frames=4"], check_paths=False)
    assert (odd.num_latent_frames, odd.num_blocks) == (30, 8)
    assert resolve_config(load_config("tiny-vi-wan", ["video.num_frames=33"], check_paths=False), 3).num_blocks == 3
    with pytest.raises(ConfigError, match="strategy.name='dualparal' needs model.family='wan'"):
        load_config("tiny-vi-unet3d", ["strategy.name=dualparal"], check_paths=False)
    with pytest.raises(ConfigError, match="sampling.scheduler='unipc' is not allowed; allowed: 'ddim', 'dpmsolver'"):
        load_config("tiny-vi-unet3d", ["sampling.scheduler=unipc"], check_paths=False)
    with pytest.raises(ConfigError, match="strategy.local_frames=-1 is out of range; allowed: >= 0"):
        load_config("tiny-vi-wan", ["strategy.local_frames=-1"], check_paths=False)
    info = {"stride": 16, "model_id": "tiny", "rope_max_seq_len": 1024}
    assert check_fit(wan, info, 4) == []
    (problem,) = check_fit(wan, info, 2)  # would hang the exchange: refused before any weights load
    assert "strategy.clip_latent_frames=2" in problem and "allowed: 4 rank(s)" in problem
    tall = load_config("tiny-vi-wan", ["video.height=48"], check_paths=False)
    assert check_fit(tall, {**info, "stride": 32}, 4) == ["video.height=48 is not a multiple of 32 (VAE x UNet/patch "
                                                          "stride of tiny)"]


def test_frame_noise_does_not_depend_on_the_split():
    from hpcvideo.noise import frame_noise

    shape = dict(latent_channels=2, latent_height=3, latent_width=3)
    whole = frame_noise(seed=5, start=0, stop=8, **shape)
    parts = torch.cat([frame_noise(seed=5, start=s, stop=s + 2, **shape) for s in range(0, 8, 2)], dim=2)
    assert whole.shape == (1, 2, 8, 3, 3) and torch.equal(whole, parts)
    assert not torch.equal(whole, frame_noise(seed=6, start=0, stop=8, **shape))


@torch.no_grad()
def test_videocrafter2_fps_condition(tmp_path, tiny_unet3d_dir):
    """The fps embedding of a VideoCrafter2 conversion is added to the time embedding; reversible."""
    from diffusers.models.embeddings import get_timestep_embedding
    from safetensors.torch import load_file, save_file

    from hpcvideo.models.unet3d import apply_fps_condition, load_unet3d, remove_fps_condition

    folder = tmp_path / "vc2"
    shutil.copytree(tiny_unet3d_dir, folder)
    with pytest.raises(FileNotFoundError, match="no fps_embedding"):
        apply_fps_condition(load_unet3d(folder, parts=("unet",)).unet, folder, 24)
    file = next((folder / "unet").glob("*.safetensors"))
    g = torch.Generator().manual_seed(0)
    fps_weights = {"linear_1.weight": torch.randn(32, 8, generator=g), "linear_1.bias": torch.randn(32, generator=g),
                   "linear_2.weight": torch.randn(32, 32, generator=g), "linear_2.bias": torch.randn(32, generator=g)}
    save_file({**load_file(file), **{f"fps_embedding.{k}": v for k, v in fps_weights.items()}}, file)
    unet = load_unet3d(folder, parts=("unet",)).unet
    x, text = torch.randn(2, 4, 3, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    stock = unet(x, 500, text).sample
    sinusoid = get_timestep_embedding(torch.tensor([24.0], dtype=torch.float64), 8, flip_sin_to_cos=True,
                                      downscale_freq_shift=0).float()
    hidden = torch.nn.functional.silu(sinusoid @ fps_weights["linear_1.weight"].T + fps_weights["linear_1.bias"])
    fps_emb = hidden @ fps_weights["linear_2.weight"].T + fps_weights["linear_2.bias"]  # (1, 32)
    handle = unet.time_embedding.register_forward_hook(lambda m, a, out: out + fps_emb)
    want = unet(x, 500, text).sample
    handle.remove()
    apply_fps_condition(unet, folder, 24)
    got = unet(x, 500, text).sample
    remove_fps_condition(unet)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(got, stock, atol=1e-3)
    assert torch.equal(unet(x, 500, text).sample, stock)
