"""The rank environment: who this process is, which device it drives, how ranks talk.

Rank layout (one MPI rank per GPU; ranks are numbered node by node, as mpiexec/srun place them by
default). Worked example, 2 nodes x 4 GPUs, ``srun -N 2 --ntasks-per-node 4 --mpi=pmix``::

    node     rank  local_rank  device   world_size  local_world_size
    gpu-a      0       0       cuda:0       8              4
    gpu-a      1       1       cuda:1       8              4
    gpu-a      2       2       cuda:2       8              4
    gpu-a      3       3       cuda:3       8              4
    gpu-b      4       0       cuda:0       8              4
    gpu-b      5       1       cuda:1       8              4
    gpu-b      6       2       cuda:2       8              4
    gpu-b      7       3       cuda:3       8              4

``rank``/``world_size`` come from MPI COMM_WORLD, ``local_rank``/``local_world_size`` from the
hostnames of all ranks (:func:`node_local_rank`: the ranks that share this rank's hostname, in rank
order; what srun gives as ``SLURM_LOCALID``). Not from MPI's shared-memory split
(``COMM_TYPE_SHARED``): with ``MPIR_CVAR_NOLOCAL=1`` (MPICH: no shared memory, every message over
the network) that split has one rank per process, so every rank of a node was local rank 0 and
bound ``cuda:0`` (measured with the mpich wheel 5.0.2, 2 nodes x 2 ranks). The device is
``cuda:<local_rank % torch.cuda.device_count()>``, so 8 ranks on a node that shows 4 GPUs share
them two by two (correct, but slow); on a CPU machine every rank uses ``cpu``.

Two channels: mpi4py COMM_WORLD (``env.comm``) for control (rendezvous, failure notices, small
Python objects) and torch.distributed for tensors (NCCL on GPU, gloo on CPU). The torch process
group is the default (global) group; it exists only when ``world_size > 1``.

Rendezvous: rank 0 chooses an address (``MASTER_ADDR`` if set, else the IP its hostname resolves
to, or when that is a loopback address the address of the interface of the default route) and a
free TCP port (``MASTER_PORT`` if set, else one the kernel hands out), and broadcasts both over
MPI; every rank then joins ``init_process_group(init_method="tcp://addr:port")``. Nothing assumes
one host.
"""

from __future__ import annotations

import os
import re
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Mapping

from ..config.schema import DEVICES  # the allowed runtime.device names, defined once

if TYPE_CHECKING:  # torch is imported when a rank env is built, so launchers stay light
    import torch


# Variables a process launcher sets in every rank it starts. srun sets SLURM_PROCID in every task
# but also in the batch shell of an allocation, so it counts only together with SLURM_NTASKS and
# SLURM_STEP_ID (set in job steps, i.e. under srun, not in the batch script itself).
_LAUNCHER_VARS = (
    ("PMI_RANK", "PMI_SIZE"),  # MPICH hydra (mpiexec), Intel MPI, srun --mpi=pmi2
    ("OMPI_COMM_WORLD_SIZE",),  # Open MPI mpirun/mpiexec
    ("PMIX_RANK",),  # PMIx launchers (prterun, srun --mpi=pmix)
    ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_ID"),  # srun
)


def under_mpi_launcher(environ: Mapping[str, str] | None = None) -> bool:
    """True when this process was started by mpiexec/mpirun/srun (so it must not spawn ranks itself).

    MPICH hydra sets ``PMI_RANK``/``PMI_SIZE``, Open MPI ``OMPI_COMM_WORLD_SIZE``, PMIx launchers
    ``PMIX_RANK``, srun ``SLURM_PROCID`` + ``SLURM_NTASKS`` (+ ``SLURM_STEP_ID`` in a job step).
    """
    environ = os.environ if environ is None else environ
    return any(all(var in environ for var in group) for group in _LAUNCHER_VARS)


@dataclass(frozen=True, kw_only=True)
class RankEnv:
    """One rank's place in the job; built once by :func:`init_rank_env` and passed by keyword."""

    rank: int  # global rank in [0, world_size)
    local_rank: int  # rank among the ranks of this node, in [0, local_world_size)
    world_size: int  # number of ranks in the job
    local_world_size: int  # number of ranks on this node
    node: str  # hostname of this rank's node
    device: torch.device  # cuda:<local_rank % visible GPUs> with GPUs, else cpu
    backend: str | None  # "nccl" | "gloo"; None when world_size == 1 (no process group)
    comm: Any  # mpi4py COMM_WORLD; None in a plain single process (no launcher: MPI is never loaded)
    master_addr: str | None = None  # rendezvous address chosen by rank 0 (None: no process group)
    master_port: int | None = None  # rendezvous TCP port chosen by rank 0
    peers: tuple[tuple[str, int], ...] = ()  # (node, pid) of every rank, indexed by rank

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that prints progress and changes store metadata."""
        return self.rank == 0


MPI_HELP = (
    "on a laptop or a CI machine: pip install 'hpcvideo[mpi]' (the mpich wheel, which brings mpiexec); "
    "on a cluster: load the site's MPI module (e.g. `module load openmpi`) before installing mpi4py"
)


class LaunchError(RuntimeError):
    """The processes were started in a way that cannot work (wrong launcher, PMI flavour, task count); the
    message names the fix. The CLI prints it as one line (exit 2)."""


class MPIUnavailable(LaunchError):
    """Several ranks were asked for but no MPI library (or mpi4py) can be loaded; the message says how to get one."""


def _import_mpi():
    """mpi4py's MPI module (initialises MPI) for a process started by an MPI launcher.

    Raises :class:`MPIUnavailable` when mpi4py or its MPI library cannot be loaded. A plain single
    process never calls this: single-rank runs need no MPI library at all.
    """
    try:
        from mpi4py import MPI
    except (ImportError, RuntimeError) as error:  # mpi4py missing, or libmpi.so not found (mpi4py 4 raises RuntimeError)
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise MPIUnavailable(
            f"this process was started by an MPI launcher but mpi4py cannot load an MPI library ({first}); {MPI_HELP}"
        ) from error
    return MPI


def mpi_available() -> str | None:
    """None when mpi4py can load an MPI library in this environment, else why not (one line).

    Checked in a child process, because loading MPI in the launching process would initialise it there.
    Used before starting ranks (``--ranks N > 1``) so that a missing MPI library is one clear error.
    """
    import subprocess

    probe = "from mpi4py import MPI; MPI.Get_library_version()"
    try:
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
                              env={**os.environ, "MPI4PY_RC_INITIALIZE": "0"})
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"cannot check mpi4py ({error})"
    if done.returncode == 0:
        return None
    lines = [line.strip() for line in done.stderr.strip().splitlines() if line.strip()]
    raised = [line for line in lines if re.match(r"^[\w.]*(Error|Exception):", line)]
    detail = raised[-1] if raised else (lines[-1] if lines else f"exit code {done.returncode}")
    return f"mpi4py cannot load an MPI library ({detail})"


def check_world_size(world_size: int, environ: Mapping[str, str] | None = None) -> None:
    """Refuse a COMM_WORLD whose size disagrees with what the launcher started (the singleton trap).

    A launcher whose process-management interface the MPI library does not speak (``srun --mpi=none``
    or the wrong ``--mpi`` flavour; an ``mpiexec`` of another MPI library) starts N processes that
    each initialise MPI alone as a world of 1. They would all compute rank 0's work and overwrite
    each other's output, so this is an error before anything starts.
    """
    environ = os.environ if environ is None else environ
    for var, what in (
        ("PMI_SIZE", "the mpiexec/PMI launcher"),
        ("OMPI_COMM_WORLD_SIZE", "Open MPI's mpirun"),
    ):
        if environ.get(var, "").isdigit() and int(environ[var]) != world_size:
            raise LaunchError(
                f"{what} started {environ[var]} ranks ({var}={environ[var]}) but MPI COMM_WORLD has size "
                f"{world_size}: the launcher belongs to a different MPI library than the one mpi4py loaded "
                f"(mpi4py uses: {_mpi_library_name()}); use that library's mpiexec (with the mpich wheel: "
                "the mpiexec next to python in the venv)"
            )
        if var in environ:
            return  # the launcher's own count agrees; SLURM_NTASKS may describe hydra's proxies
    ntasks = environ.get("SLURM_STEP_NUM_TASKS") if "SLURM_STEP_ID" in environ else None
    ntasks = ntasks or environ.get("SLURM_NTASKS")
    if ntasks and ntasks.isdigit() and int(ntasks) > 1 and int(ntasks) != world_size:
        raise LaunchError(
            f"SLURM started {ntasks} tasks (SLURM_NTASKS={ntasks}) but MPI COMM_WORLD has size {world_size}: "
            "every task initialised MPI as a singleton because srun's PMI does not match the MPI library "
            f"(mpi4py uses: {_mpi_library_name()}). Launch with `srun --mpi=pmi2` for MPICH (the mpich wheel, "
            "Intel MPI) or `srun --mpi=pmix` for Open MPI; `srun --mpi=list` shows what this cluster offers"
        )


def check_not_a_lone_task(environ: Mapping[str, str] | None = None) -> None:
    """Refuse a plain process (no launcher) inside a SLURM allocation of several tasks.

    In an sbatch script with ``--ntasks=4``, ``hpcvideo generate`` run without ``srun`` is one process
    of world size 1: it would do the work of one rank while three GPUs idle. Raises RuntimeError naming
    the fix (:class:`LaunchError`); a one-task allocation is fine.
    """
    environ = os.environ if environ is None else environ
    ntasks = environ.get("SLURM_NTASKS", "")
    if ntasks.isdigit() and int(ntasks) > 1:
        raise LaunchError(
            f"SLURM allocated {ntasks} tasks (SLURM_NTASKS={ntasks}) but this process was not started by an MPI "
            "launcher, so it would run alone as rank 0 of 1: start the ranks with `srun --mpi=pmi2 hpcvideo generate "
            "...` (MPICH; --mpi=pmix for Open MPI), or ask for one task"
        )


def _mpi_library_name() -> str:
    try:
        from mpi4py import MPI

        return MPI.Get_library_version().splitlines()[0].strip()
    except Exception:  # noqa: BLE001 - only used inside an error message
        return "unknown MPI library"


def _default_route_addr() -> str | None:
    """IPv4 address of the interface the kernel would use to reach a non-local address (no packet is sent)."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("198.51.100.1", 9))  # TEST-NET-2: routed by the default route unless a route exists
        return probe.getsockname()[0]
    except OSError:
        return None
    finally:
        probe.close()


def choose_master_addr(*, single_node: bool, environ: Mapping[str, str] | None = None) -> str:
    """Rendezvous address of rank 0: ``MASTER_ADDR``, else its hostname's IP, else the default-route IP.

    A hostname that resolves to loopback (Debian's 127.0.1.1, containers' 127.0.0.1) is useless to
    other nodes, so the default-route interface is preferred then; loopback is kept only when all
    ranks are on this node and there is no route.
    """
    environ = os.environ if environ is None else environ
    if environ.get("MASTER_ADDR"):
        return environ["MASTER_ADDR"]
    try:
        addr = socket.gethostbyname(socket.gethostname())
    except OSError:
        addr = None
    if addr is None or addr.startswith("127."):
        routed = _default_route_addr()
        if routed is not None:
            return routed
        if addr is None or not single_node:
            raise RuntimeError(
                f"cannot find an address of {socket.gethostname()!r} that other nodes can reach "
                f"(hostname resolves to {addr}, no default route); set MASTER_ADDR to rank 0's cluster IP"
            )
    return addr


def choose_master_port(environ: Mapping[str, str] | None = None) -> int:
    """``MASTER_PORT``, else a TCP port that is free now (bind to port 0)."""
    environ = os.environ if environ is None else environ
    if environ.get("MASTER_PORT"):
        return int(environ["MASTER_PORT"])
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _resolve_device(device: str, local_rank: int) -> torch.device:
    import torch

    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if not use_cuda:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("device='cuda' but torch sees no CUDA device; use device='cpu' or 'auto'")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def init_rank_env(*, device: str = "auto", timeout_s: float = 60.0, announce: bool = True) -> RankEnv:
    """Initialise MPI (via mpi4py), bind the device, and join the torch.distributed process group.

    Works under mpiexec, under srun (``--mpi=pmi2`` for MPICH, ``--mpi=pmix`` for Open MPI) and in
    a plain single process, which loads no MPI library at all (world 1, ``comm`` None): single-rank
    runs work with mpi4py installed without an MPI library. Raises :class:`MPIUnavailable` (a
    ``RuntimeError``) when a launcher started this process but no MPI library loads.
    ``device``: "auto" (cuda when torch sees a GPU, else cpu) | "cpu" | "cuda". ``timeout_s``: the
    torch.distributed timeout of every collective (a peer that stops answering raises after it).
    Backend: nccl on cuda, gloo on cpu (chosen at run time: the CPU wheel has neither NCCL nor MPI).
    ``announce``: rank 0 prints the rank table (rank -> pid on node) to stderr when world_size > 1,
    so that a launcher's "BAD TERMINATION ... PID p RUNNING AT node" can be mapped to a rank.
    """
    if device not in DEVICES:
        raise ValueError(f"device={device!r} is not allowed; use one of {', '.join(DEVICES)}")
    node = socket.gethostname()
    if not under_mpi_launcher():  # a plain process: one rank, no MPI library loaded at all
        check_not_a_lone_task()
        comm, rank, world_size, local_rank, local_world_size = None, 0, 1, 0, 1
        peers = ((node, os.getpid()),)
    else:
        MPI = _import_mpi()
        comm = MPI.COMM_WORLD
        rank, world_size = comm.Get_rank(), comm.Get_size()
        check_world_size(world_size)
        peers = tuple(comm.allgather((node, os.getpid())))
        local_rank, local_world_size = node_local_rank(peers, rank)
    import torch

    torch_device = _resolve_device(device, local_rank)
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)
    backend = master_addr = master_port = None
    if world_size > 1:
        backend = "nccl" if torch_device.type == "cuda" else "gloo"
        if rank == 0:
            endpoint = (choose_master_addr(single_node=local_world_size == world_size), choose_master_port())
        else:
            endpoint = None
        master_addr, master_port = comm.bcast(endpoint, root=0)
        import torch.distributed as dist

        dist.init_process_group(
            backend,
            init_method=f"tcp://{master_addr}:{master_port}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
        )
        if announce and rank == 0:
            sys.stderr.write(f"hpcvideo: {world_size} ranks, {backend} via tcp://{master_addr}:{master_port}; {rank_table(peers)}\n")
            sys.stderr.flush()
    return RankEnv(
        rank=rank,
        local_rank=local_rank,
        world_size=world_size,
        local_world_size=local_world_size,
        node=node,
        device=torch_device,
        backend=backend,
        comm=comm,
        master_addr=master_addr,
        master_port=master_port,
        peers=peers,
    )


def node_local_rank(peers: tuple[tuple[str, int], ...], rank: int) -> tuple[int, int]:
    """(local_rank, local_world_size) of ``rank``: its index among the ranks on its node, and their count.

    ``peers``: (hostname, pid) of every rank, indexed by rank (``RankEnv.peers``). The ranks of a node
    are those with the same hostname, in rank order, so the result is srun's ``SLURM_LOCALID`` (block or
    cyclic distribution alike) and hydra's ``MPI_LOCALRANKID``, whatever MPI's shared-memory notion of
    a node is. Raises IndexError for a rank outside ``peers``.
    """
    node = peers[rank][0]
    same = [peer for peer, (host, _) in enumerate(peers) if host == node]
    return same.index(rank), len(same)


def rank_table(peers: tuple[tuple[str, int], ...]) -> str:
    """``"node vm: rank 0 pid 101, rank 1 pid 102; node vm2: ..."`` (one entry per node, in rank order)."""
    by_node: dict[str, list[str]] = {}
    for rank, (node, pid) in enumerate(peers):
        by_node.setdefault(node, []).append(f"rank {rank} pid {pid}")
    return "; ".join(f"node {node}: {', '.join(entries)}" for node, entries in by_node.items())


def shutdown_rank_env(env: RankEnv) -> None:
    """Destroy the torch.distributed process group (idempotent; MPI itself is finalised at exit by mpi4py)."""
    import torch.distributed as dist

    if env.backend is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


RELAUNCHED_VAR = "HPCVIDEO_RELAUNCHED"  # "1" in ranks started by launch.local.relaunch_under_mpiexec (never relaunch again)


def launcher_rank_and_size() -> tuple[int, int] | None:
    """(rank, world_size) as the MPI launcher that started this process says (before MPI is
    initialised), or None outside a launcher or when its variables do not tell."""
    if not (under_mpi_launcher() or os.environ.get(RELAUNCHED_VAR) == "1"):
        return None
    env = os.environ
    pairs = [("PMI_RANK", "PMI_SIZE"), ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE")]
    if "SLURM_STEP_ID" in env:  # srun: the step's task count (SLURM_NTASKS may describe the whole allocation)
        pairs.append(("SLURM_PROCID", "SLURM_STEP_NUM_TASKS"))
    for rank_var, size_var in pairs:
        if env.get(rank_var, "").isdigit() and env.get(size_var, "").isdigit():
            return int(env[rank_var]), int(env[size_var])
    return None
