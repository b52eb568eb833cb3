"""Under ``srun --mpi=pmi2`` on the multi-node lab (slurm/lab/nodes.sh): where each rank is and which network
its messages take. Rank 0 prints one line ``PROBE <json>``: a list, by rank, of

* ``node``, ``addr`` (the IPv4 address of its network namespace's ``eth0``), ``slurm_localid``,
  ``slurm_nodeid``, and hpcvideo's ``local_rank``/``local_world_size``/``master_addr``;
* ``mpi_peers``: the remote addresses of this process's established TCP connections after an MPI
  ``allgather`` and before torch.distributed exists (MPI's own traffic);
* ``gloo_peers``: those that appeared when the gloo process group was made and used (an all_reduce);
* ``all_reduce``: the sum of the ranks as gloo computed it; ``shm``: this node's /dev/shm entries.

The sockets are read from ``/proc/self/fd`` and ``/proc/self/net/tcp{,6}`` (the table of this process's
network namespace), so only this process's connections count.
"""

import json
import os
import socket
import struct
import sys


def _addr(hex_addr: str) -> str:
    """``/proc/net/tcp`` address (little-endian hex, IPv4 or IPv6 with a mapped IPv4) as dotted IPv4, or the IPv6 hex."""
    host = hex_addr.split(":")[0]
    if len(host) == 8:
        return socket.inet_ntoa(struct.pack("<I", int(host, 16)))
    words = [struct.pack("<I", int(host[i:i + 8], 16)) for i in range(0, 32, 8)]
    raw = b"".join(words)
    return socket.inet_ntoa(raw[12:]) if raw[:12] == b"\0" * 10 + b"\xff\xff" else host


def tcp_peers() -> set[tuple[str, str]]:
    """(local port, remote address) of this process's ESTABLISHED TCP sockets."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    peers = set()
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        with open(table) as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                if fields[3] == "01" and fields[9] in inodes:  # 01: ESTABLISHED
                    peers.add((fields[1].split(":")[1], _addr(fields[2])))
    return peers


def eth0_addr() -> str | None:
    import fcntl

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            packed = fcntl.ioctl(sock.fileno(), 0x8915, struct.pack("256s", b"eth0"))  # SIOCGIFADDR
        except OSError:
            return None
    return socket.inet_ntoa(packed[20:24])


def main() -> int:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    comm.allgather(bytes(1 << 16))  # messages to every rank (64 KiB: not only the eager path)
    mpi_peers = tcp_peers()
    from hpcvideo.runtime import init_rank_env, shutdown_rank_env

    env = init_rank_env(device="cpu", timeout_s=60, announce=False)
    import torch
    import torch.distributed as dist

    total = torch.tensor([float(env.rank)])
    dist.all_reduce(total)
    report = {
        "rank": env.rank, "node": env.node, "addr": eth0_addr(), "slurm_localid": os.environ.get("SLURM_LOCALID"),
        "slurm_nodeid": os.environ.get("SLURM_NODEID"), "local_rank": env.local_rank,
        "local_world_size": env.local_world_size, "master_addr": env.master_addr, "device": str(env.device),
        "mpi_peers": sorted({addr for _, addr in mpi_peers}),
        "gloo_peers": sorted({addr for _, addr in tcp_peers() - mpi_peers}), "all_reduce": total.item(),
        "shm": sorted(os.listdir("/dev/shm")),
    }
    reports = comm.gather(report, root=0)
    if env.rank == 0:
        print("PROBE " + json.dumps(reports), flush=True)
    shutdown_rank_env(env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
