"""Under mpiexec -n N: one clip-parallel forward per case, clip r on rank r; rank 0 saves the whole
video's noise_pred of every case (and each rank's bytes sent) to OUT.pt.

``python -m tests.mpi.videoinfinity_forward OUT.pt UNET3D_DIR WAN_DIR``. Inputs are drawn from fixed
seeds, the same on every rank (see :func:`cases`), so the test can recompute them in one process.
"""

import sys

import torch

from hpcvideo.runtime import abort_on_failure, init_rank_env, shutdown_rank_env, start_failure_monitor, stop_failure_monitor
from hpcvideo.strategies.videoinfinity.clips import ClipComm, ClipLayout, DualScope
from hpcvideo.strategies.videoinfinity.reference import patched

NUM_FRAMES = 8  # latent frames of the test video: 8 x 1, 4 x 2, 2 x 4 clips
EXACT = DualScope(local_frames=NUM_FRAMES - 1, global_frames=0)
DUAL = DualScope(local_frames=2, global_frames=3, switch_timestep=500.0, global_bias=2.0)


def cases():
    """(name, family, scope, timestep, latents (B, C, T, h, w), encoder_hidden_states)."""
    g = torch.Generator().manual_seed(1234)
    unet_latents = torch.randn(2, 4, NUM_FRAMES, 8, 8, generator=g)  # batch 2: cond + uncond as in CFG
    unet_text = torch.randn(2, 77, 32, generator=g)
    wan_latents = torch.randn(1, 4, NUM_FRAMES, 4, 4, generator=g)
    wan_text = torch.randn(1, 16, 32, generator=g)
    out = []
    for family, latents, text in (("unet3d", unet_latents, unet_text), ("wan", wan_latents, wan_text)):
        out.append((f"{family}-exact", family, EXACT, 900.0, latents, text))
        out.append((f"{family}-dual-early", family, DUAL, 900.0, latents, text))  # global keys favoured
        out.append((f"{family}-dual-late", family, DUAL, 100.0, latents, text))  # local keys favoured
    return out


def load_models(unet3d_dir, wan_dir):
    from hpcvideo.models import load_wan
    from hpcvideo.models.unet3d import load_unet3d

    return {"unet3d": load_unet3d(unet3d_dir, parts=("unet",)).unet, "wan": load_wan(wan_dir, parts=("transformer",)).transformer}


def forward_all(env, out_path: str, unet3d_dir: str, wan_dir: str) -> None:
    """Every case's clip-parallel forward on the ranks of ``env``; rank 0 saves the results to ``out_path``."""
    torch.set_num_threads(1)
    models = load_models(unet3d_dir, wan_dir)
    clip_frames = NUM_FRAMES // env.world_size
    layout = ClipLayout(rank=env.rank, world_size=env.world_size, clip_frames=clip_frames)
    results, sent = {}, {}
    for name, family, scope, timestep, latents, text in cases():
        comm = ClipComm(layout)
        clip = latents[:, :, layout.start:layout.stop].contiguous()
        with torch.no_grad(), patched(models[family], family, comm=comm, scope=scope):
            noise_pred = models[family](clip, torch.tensor([timestep]), text, return_dict=False)[0]
        sent[name] = comm.bytes_received  # before the test's own gather below
        results[name] = comm.gather_frames(noise_pred.contiguous(), dim=2)
    if env.is_main:
        torch.save({"noise_pred": results, "bytes_received_rank0": sent}, out_path)


def main(out_path: str, unet3d_dir: str, wan_dir: str) -> int:
    env = init_rank_env(device="cpu", timeout_s=120)
    monitor = start_failure_monitor(env)
    with abort_on_failure(env):
        forward_all(env, out_path, unet3d_dir, wan_dir)
    stop_failure_monitor(monitor)
    shutdown_rank_env(env)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
