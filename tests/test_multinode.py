"""Two nodes for real: a SLURM cluster of 2 simulated nodes on this machine (slurm/lab/nodes.sh: one
network, UTS, IPC and mount namespace per node, each with its own address, hostname, /dev/shm and boot
id; the file system shared), and hpcvideo runs across it, 2 nodes x 2 ranks:

* where the ranks are and which network they use (tests/mpi/nodes_probe.py under srun): local_rank per
  node (= SLURM_LOCALID, also with MPICH's MPIR_CVAR_NOLOCAL=1), MPI (UCX over TCP) and gloo connections
  between the nodes' addresses, the rendezvous address on node1's network, each node its own /dev/shm;
  then Video-Infinity in the same allocation, equal to its single-process reference;
* DualParal, one store through both ways of submitting: ``hpcvideo submit``, node2 lost (all its
  processes killed, slurmd included) -> node1's ranks exit non-zero within 60 s naming the lost ranks and
  node; then ``sbatch slurm/generate.sbatch`` resumes it, is stopped by USR2 (SLURM's warning before a
  time limit) and requeued, removes the stale MPICH segments on each node, and ends bit-identical to an
  uninterrupted 1-rank run.

Marked ``multinode`` (and ``slurm``): skipped with the reason where the lab cannot start (no SLURM, not
root), a failure instead where SLURM must be there (``HPCVIDEO_REQUIRE_SLURM=1``, .ci/run); a machine that
allows no new namespaces (a container without CAP_SYS_ADMIN) always skips, saying so.
One lab per session; `down.sh` removes its namespaces, links and daemons at the end (checked).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from hpcvideo.runtime.env import RankEnv, _resolve_device, node_local_rank
from hpcvideo.runtime.shm import mpich_world_id
from hpcvideo.store import RunStore
from tests.helpers import ROOT, clean_env, cli, store_arrays

LAB_SCRIPT = ROOT / "slurm" / "lab"
NODE_SETTINGS = [
    "cluster.request_gpus=false", "cluster.nodes=2", "cluster.gpus_per_node=2", "cluster.cpus_per_task=1",
    "cluster.mem_gb=1", "cluster.timeout_min=15", "cluster.signal_delay_s=60", "runtime.heartbeat_timeout_s=10",
]
# tiny-test with 32 blocks of 2 latent frames: 4 * (2 * 32 - 1) + 1 frames, ~35 ticks on 4 stages
FRAMES = 4 * (2 * 32 - 1) + 1


# ---------------------------------------------------------------- without the lab (unit)

@pytest.mark.unit
def test_local_rank_and_device_come_from_the_ranks_on_the_same_node(monkeypatch):
    """2 nodes x 2 ranks (block), and a cyclic placement: the local rank is the index among the ranks of
    the same hostname, never the global rank; with 2 GPUs per node each node binds cuda:0 and cuda:1."""
    block = (("a", 1), ("a", 2), ("b", 3), ("b", 4))
    assert [node_local_rank(block, r) for r in range(4)] == [(0, 2), (1, 2), (0, 2), (1, 2)]
    cyclic = (("a", 1), ("b", 2), ("a", 3), ("b", 4), ("a", 5))
    assert [node_local_rank(cyclic, r) for r in range(5)] == [(0, 3), (0, 2), (1, 3), (1, 2), (2, 3)]
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    devices = [_resolve_device("cuda", node_local_rank(block, r)[0]) for r in range(4)]
    assert devices == [torch.device("cuda", i) for i in (0, 1, 0, 1)]


@pytest.mark.unit
def test_heartbeats_name_the_silent_ranks_of_another_node():
    """A store stand-in: ranks 2 and 3 (node b) stop counting; rank 0 names them after the timeout, and
    only them; its own node's rank 1 is never read (the /proc watch covers it)."""
    from hpcvideo.runtime.nodewatch import NodeWatch, StoreUnreachable, describe_lost

    class Store:
        def __init__(self):
            self.counts, self.reads = {}, []

        def add(self, key, amount):
            self.reads.append(key)
            self.counts[key] = self.counts.get(key, 0) + amount
            return self.counts[key]

    env = RankEnv(rank=0, local_rank=0, world_size=4, local_world_size=2, node="a", device=None, backend="gloo",
                  comm=None, peers=(("a", 10), ("a", 11), ("b", 12), ("b", 13)))
    store = Store()
    beat = NodeWatch(env=env, timeout_s=5.0, store=store)
    assert beat.remote_ranks() == [2, 3]
    assert beat.lost(now=0.0) == []
    store.add("hpcvideo/alive/2", 1)
    assert beat.lost(now=4.0) == []  # rank 2 moved at 4 s, rank 3 silent since 0 s
    assert beat.lost(now=5.0) == [3]
    assert beat.lost(now=6.5) == [2, 3]  # rank 2 silent for half the timeout, on the lost rank 3's node
    store.add("hpcvideo/alive/2", 1)
    assert beat.lost(now=7.0) == [3]
    assert not any(key.endswith("/1") for key in store.reads)
    assert describe_lost(env, [2, 3], 5.0) == ("rank 2 (pid 12) and rank 3 (pid 13) on b sent no heartbeat for 5 s: "
                                               "b was lost or its processes were killed")

    def refuse(key, amount):
        raise RuntimeError("Connection reset by peer\nmore")

    store.add = refuse
    with pytest.raises(StoreUnreachable, match="RuntimeError: Connection reset by peer$"):
        beat.beat()


@pytest.mark.unit
def test_a_lost_connection_waits_for_the_heartbeats_to_name_the_lost_node():
    """gloo raises "Connection closed by peer" when a lost node's processes are killed (their sockets close),
    often before the heartbeats time out (measured on the two-node lab). No peer of this node is gone, so
    the rank gives its monitor the heartbeat timeout to name the other node's silent rank before it aborts."""
    script = """
import os, sys, torch
import torch.distributed as dist
from mpi4py import MPI
from hpcvideo.runtime import RankEnv, abort_on_failure, start_failure_monitor
server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
env = RankEnv(rank=0, local_rank=0, world_size=2, local_world_size=1, node="a", device=torch.device("cpu"),
              backend="gloo", comm=MPI.COMM_SELF, master_addr="127.0.0.1", master_port=server.port,
              peers=(("a", os.getpid()), ("b", 1)))
monitor = start_failure_monitor(env, poll_s=0.05, heartbeat_timeout_s=float(sys.argv[1]))
with abort_on_failure(env, monitor=monitor, notice_wait_s=0.1):
    raise RuntimeError("[pair.cc:553] Connection closed by peer [10.0.0.2]:28819")
"""
    result = subprocess.run([sys.executable, "-c", script, "2"], capture_output=True, text=True, timeout=60,
                            env=clean_env(), cwd=ROOT)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert "rank 0: a connection was lost and no rank of this node is gone: waiting up to 2 s for the heartbeats" in result.stderr
    assert lines[-1] == ("rank 0: stopping because rank 1 (pid 1) on b sent no heartbeat for 2 s: b was lost or its "
                         "processes were killed"), result.stderr
    assert "MPI_Abort" not in result.stderr


@pytest.mark.unit
def test_a_heartbeat_timeout_that_is_not_positive_is_refused():
    result = cli("check", "tiny-test", "--set", "runtime.heartbeat_timeout_s=0", check=False)
    assert result.returncode == 2 and "runtime.heartbeat_timeout_s" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.unit
@pytest.mark.parametrize("script", ["template", "generated"])
def test_sbatch_scripts_requeue_when_a_rank_stopped_though_srun_exits_143(tmp_path, script):
    """srun --kill-on-bad-exit terminates the other ranks once the first exits 75, and then exits 143: the
    scripts requeue because a stopped rank created $HPCVIDEO_STOPPED_FILE (stand-ins for srun, scontrol and
    hpcvideo; the stand-in srun does what a stopped rank does: hpcvideo.runtime.preempt.mark_stopped)."""
    from hpcvideo.config import load_config
    from hpcvideo.launch.sbatch import render_sbatch

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stand_ins = {
        "srun": f'for a in "$@"; do [ "$a" = generate ] && exec {sys.executable} -c '
                '"from hpcvideo.runtime.preempt import mark_stopped; mark_stopped(); raise SystemExit(143)"; done\nexit 0\n',
        "scontrol": f'echo "$@" > {tmp_path}/scontrol.args\n',
        "hpcvideo": "exit 0\n",
    }
    for name, body in stand_ins.items():
        (bin_dir / name).write_text("#!/bin/bash\n" + body)
        (bin_dir / name).chmod(0o755)
    path = ROOT / "slurm" / "generate.sbatch"
    if script == "generated":
        path = tmp_path / "job.sbatch"
        path.write_text(render_sbatch(load_config("tiny-test", [], output=tmp_path / "run.zarr", check_paths=False),
                                   config="tiny-test", overrides=[]))
    environ = {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin", "SLURM_JOB_ID": "77", "SLURM_JOB_NUM_NODES": "2",
               "SLURM_NTASKS": "4", "TMPDIR": str(tmp_path)}
    result = subprocess.run(["bash", str(path), "tiny-test"], env=environ, cwd=tmp_path, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 143, result.stderr
    assert "requeueing job 77" in result.stderr and (tmp_path / "scontrol.args").read_text().split() == ["requeue", "77"]
    assert not list(tmp_path.glob("hpcvideo-stopped-*"))  # removed before the requeue


# ---------------------------------------------------------------- the two-node lab

def _no_lab(reason: str) -> None:
    if os.environ.get("HPCVIDEO_REQUIRE_SLURM") == "1":
        pytest.fail(f"HPCVIDEO_REQUIRE_SLURM=1 but {reason}")
    pytest.skip(reason)


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


@pytest.fixture(scope="module")
def nodes_lab(tmp_path_factory):
    """The 2-node lab (slurm/lab/up.sh --nodes 2), once per session: (environment for its clients, lab dir)."""
    missing = [exe for exe in ("slurmctld", "slurmd", "sbatch", "ip", "unshare", "nsenter") if shutil.which(exe) is None]
    if missing:
        _no_lab(f"the two-node lab needs {', '.join(missing)} (apt-get install slurmctld slurmd slurm-client "
                "iproute2 util-linux, as .ci/run does)")
    if os.geteuid() != 0:
        _no_lab("the two-node lab needs root (network namespaces, slurmd)")
    probe = subprocess.run(["unshare", "--net", "--uts", "--ipc", "--mount", "true"], capture_output=True, text=True,
                           timeout=30)
    if probe.returncode != 0:  # a container without CAP_SYS_ADMIN: no lab can start, SLURM or not
        pytest.skip(f"this machine does not allow new namespaces ({probe.stderr.strip()[-200:]}): the two-node lab "
                    "needs network, UTS, IPC and mount namespaces")
    lab = tmp_path_factory.mktemp("nodes-lab")
    before = _namespaces()
    started = subprocess.run(["bash", str(LAB_SCRIPT / "up.sh"), "--nodes", "2", str(lab)], capture_output=True,
                             text=True, timeout=120)
    if started.returncode != 0:
        _no_lab(f"the two-node lab could not start here: {started.stderr.strip()[-600:]}")
    environ = dict(os.environ)
    environ["SLURM_CONF"] = str(lab / "slurm.conf")
    environ["PATH"] = f"{lab / 'bin'}:{os.path.dirname(sys.executable)}:{environ['PATH']}"
    environ.pop("HPCVIDEO_FAULT", None)
    for key in [k for k in environ if k.startswith(("SLURM_JOB", "SLURM_STEP", "SLURM_PROCID", "SLURM_NTASKS", "PMI_"))]:
        environ.pop(key)
    made = _namespaces() - before
    yield environ, lab
    stopped = subprocess.run(["bash", str(LAB_SCRIPT / "down.sh"), str(lab)], capture_output=True, text=True, timeout=120)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert len(made) == 3 and not (made & _namespaces()), (made, _namespaces())  # head, n1, n2: all gone


def sh(environ, *command, cwd=None, timeout=60, check=True) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in command], env=environ, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, check=check)


def job_state(environ, job_id) -> str:
    out = sh(environ, "squeue", "-h", "--states=all", "-j", job_id, "-o", "%T", check=False).stdout.split()
    return out[0] if out else "UNKNOWN"


def wait_for(predicate, what, timeout_s=300, poll_s=0.3):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def sbatch(environ, cwd, *args) -> str:
    return sh(environ, "sbatch", "--parsable", *args, cwd=cwd).stdout.strip().split(";")[0]


def wait_done(environ, job_id, timeout_s=400) -> str:
    return wait_for(lambda: (s := job_state(environ, job_id)) in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT") and s,
                    f"job {job_id} to end", timeout_s=timeout_s, poll_s=1.0)


@pytest.mark.multinode
@pytest.mark.slurm
@pytest.mark.e2e
def test_two_nodes_own_network_local_ranks_and_videoinfinity(nodes_lab, tmp_path, tiny_model_dir):
    """One allocation of 2 nodes x 2 tasks: the probe (MPIR_CVAR_NOLOCAL=1: MPICH uses no shared memory
    even on one node, which made every rank local rank 0 before), then Video-Infinity 2 x 2."""
    environ, lab = nodes_lab
    nodes = sh(environ, "sinfo", "-h", "-N", "-o", "%N %T").stdout.split("\n")
    assert sorted(line for line in nodes if line) == ["node1 idle", "node2 idle"]
    path = tmp_path / "vi.zarr"
    python = sys.executable
    (tmp_path / "job.sh").write_text(
        "#!/bin/bash\nset -e\n"
        f"MPIR_CVAR_NOLOCAL=1 srun --mpi=pmi2 {python} {ROOT / 'tests/mpi/nodes_probe.py'}\n"
        f"srun --mpi=pmi2 --kill-on-bad-exit=1 {python} -m hpcvideo.cli generate tiny-vi-wan --output {path} --no-progress\n")
    job_id = sbatch(environ, tmp_path, "--nodes=2", "--ntasks-per-node=2", "--cpus-per-task=1", "--output=job.out", "job.sh")
    reference = tmp_path / "reference.zarr"  # the single-process executor, one clip = the whole video, meanwhile
    cli("generate", "tiny-vi-wan", "--output", reference, "--no-progress", "--set", "strategy.clip_latent_frames=8")
    assert wait_done(environ, job_id) == "COMPLETED", (tmp_path / "job.out").read_text()
    output = (tmp_path / "job.out").read_text()
    probe = json.loads(next(line[6:] for line in output.splitlines() if line.startswith("PROBE ")))
    assert [(r["node"], r["addr"], r["slurm_nodeid"]) for r in probe] == [
        ("node1", "10.233.0.1", "0"), ("node1", "10.233.0.1", "0"), ("node2", "10.233.0.2", "1"), ("node2", "10.233.0.2", "1")]
    assert [(r["local_rank"], r["local_world_size"]) for r in probe] == [(0, 2), (1, 2), (0, 2), (1, 2)]
    assert [str(r["local_rank"]) for r in probe] == [r["slurm_localid"] for r in probe]
    assert {r["master_addr"] for r in probe} == {"10.233.0.1"} and {r["all_reduce"] for r in probe} == {6.0}
    for r in probe:  # each node reaches the other over its veth: MPI before gloo existed, then gloo's own sockets
        other = "10.233.0.2" if r["node"] == "node1" else "10.233.0.1"
        assert other in r["mpi_peers"] and other in r["gloo_peers"], r
    assert probe[0]["shm"] == probe[1]["shm"] and probe[2]["shm"] == probe[3]["shm"]
    assert probe[0]["shm"] and not set(probe[0]["shm"]) & set(probe[2]["shm"])  # each node its own /dev/shm
    latents, frames = store_arrays(path)
    expected = store_arrays(reference)
    assert np.array_equal(latents, expected[0]) and np.array_equal(frames, expected[1])
    stats = RunStore.open(path).attrs["rank_stats"]
    assert [s["clip"] for s in stats] == [[0, 2], [2, 4], [4, 6], [6, 8]]
    assert "node node1: rank 0 pid" in output and "node node2: rank 2 pid" in output


def _checkpoint(path) -> int:
    try:
        return RunStore.open(path).status_dict()["last_checkpoint_tick"] or 0
    except Exception:  # noqa: BLE001 - not created yet, or being written
        return 0


@pytest.mark.multinode
@pytest.mark.slurm
@pytest.mark.e2e
def test_dualparal_on_two_nodes_survives_a_lost_node_and_a_requeue_bit_identically(nodes_lab, tmp_path, tiny_model_dir,
                                                                                    forker):
    """DualParal 2 nodes x 2 ranks (4 stages, 2 per node) through both ways of submitting, one store:
    ``hpcvideo submit`` -> node2 lost (every process of it killed, slurmd included) -> node1's ranks exit
    non-zero within 60 s naming the lost ranks and node; ``sbatch slurm/generate.sbatch`` resumes the
    store, is stopped by USR2 (SLURM's warning before a time limit) and requeued by the script, removes the
    stopped allocation's MPICH segments on each node, resumes again and ends bit-identical to one rank."""
    environ, lab = nodes_lab
    path = tmp_path / "run.zarr"
    # `submit` and the uninterrupted 1-rank reference (running while the jobs wait): forks of the pre-imported worker
    submitted = forker.run("submit", "tiny-test", "--output", path, "--frames", FRAMES,
                           *[f"--set={s}" for s in NODE_SETTINGS], env=environ)
    reference = forker.start("generate", "tiny-test", "--output", tmp_path / "reference.zarr", "--frames", FRAMES,
                             "--no-progress")
    reference_code = None
    try:
        first = submitted.stdout.strip().splitlines()[-1].split()[1].rstrip(":")  # "job ID: store PATH  logs FOLDER"
        wait_for(lambda: _checkpoint(path) >= 3, "the first job's checkpoints", poll_s=0.05)
        killed = sh(environ, "bash", LAB_SCRIPT / "nodes.sh", "kill-node", "2", lab)
        lost_at = time.monotonic()
        assert killed.stdout.startswith("killed node2:")
        def node1_logs() -> str:  # whichever of node1's ranks notices first names node2's ranks (the other: that rank's exit)
            return "".join((Path(f"{path}.logs") / f"rank{r}.log").read_text() for r in (0, 1))

        wait_for(lambda: "on node2 sent no heartbeat" in node1_logs(), "node1's ranks to name the lost node",
                 timeout_s=60, poll_s=0.2)
        # both ranks of node1 exit within 60 s of the loss, non-zero (srun: "node1: tasks 0-1: Exited with exit code 1")
        table = next(line for line in _submitit_err(path, first).splitlines() if "node node1: rank 0 pid" in line)
        node1_pids = [int(table.split(f"rank {r} pid ")[1].split(";")[0].split(",")[0]) for r in (0, 1)]
        wait_for(lambda: not any(_running(pid) for pid in node1_pids), "node1's ranks to exit",
                 timeout_s=60 - (time.monotonic() - lost_at), poll_s=0.2)
        assert time.monotonic() - lost_at < 60

        def node1_exits():  # rank 1 exits 1 itself, or is killed by srun (--kill-on-bad-exit) after rank 0 exited 1
            found = re.findall(r"node1: tasks? ([-0-9,]+): (\w+.*)", _submitit_err(path, first))
            return found if {t for tasks, _ in found for t in tasks.replace("-", ",").split(",")} >= {"0", "1"} else None

        exits = wait_for(node1_exits, "srun's report of node1's tasks", timeout_s=30)
        assert all(re.match(r"Exited with exit code [1-9]|Killed", what) for _, what in exits), exits
        assert any(what.startswith("Exited with exit code 1") for _, what in exits), exits
        named = next(line for line in node1_logs().splitlines() if "on node2 sent no heartbeat" in line)
        assert re.fullmatch(r"rank [01]: stopping because rank 2 \(pid \d+\) and rank 3 \(pid \d+\) on node2 sent no "
                            r"heartbeat for 10 s: node2 was lost or its processes were killed", named), named
        sh(environ, "bash", LAB_SCRIPT / "nodes.sh", "start-node", "2", lab, timeout=120)  # the node comes back
        assert wait_done(environ, first, timeout_s=180) in ("FAILED", "CANCELLED")
        crashed = RunStore.open(path).status_dict()
        assert not crashed["complete"] and crashed["last_checkpoint_tick"] >= 3

        job_id = sbatch(environ, tmp_path, "--nodes=2", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1",
                        "--mem=1G", ROOT / "slurm/generate.sbatch", "tiny-test", "--output", path, "--frames", FRAMES,
                        "--set", "runtime.heartbeat_timeout_s=10")
        job_out = tmp_path / f"hpcvideo-{job_id}.out"
        resumed_at = crashed["last_checkpoint_tick"]
        wait_for(lambda: _checkpoint(path) >= resumed_at + 2, "the sbatch job's checkpoints", poll_s=0.05)
        sh(environ, "scancel", "--signal=USR2", job_id)  # to the job's steps: the ranks
        wait_for(lambda: f"requeueing job {job_id}" in job_out.read_text(), "the script to requeue the job")
        wait_for(lambda: job_state(environ, job_id) == "PENDING", "the job to be pending again")
        # what a killed allocation leaves on each node (the ranks of the stopped one all left cleanly here):
        # MPICH's segments of step 1 (the generate step), named after "JOBID.1" and the node's index
        stale = {node: f"mpich_shm_{mpich_world_id(f'{job_id}.1'):x}_{node - 1}" for node in (1, 2)}
        for node, name in stale.items():
            _in_node(lab, node, "touch", f"/dev/shm/{name}")
        # requeued jobs wait 120 s otherwise; not in the second of the requeue: slurmd compares the new credential's
        # time with the revocation of the old one in whole seconds ("Job credential revoked", job FAILED; seen once)
        time.sleep(1.05 - time.time() % 1.0)  # into the next whole second
        sh(environ, "scontrol", "update", f"JobId={job_id}", "StartTime=now")
        assert wait_done(environ, job_id) == "COMPLETED", job_out.read_text()
        reference_code = forker.wait_started(timeout=300)
        assert reference_code == 0
        latents, frames = store_arrays(path)
        expected = store_arrays(tmp_path / "reference.zarr")
        assert np.array_equal(latents, expected[0]) and np.array_equal(frames, expected[1])
        log = job_out.read_text()
        assert log.count("4 ranks, gloo via tcp://10.233.0.1:") == 2 and "node node2: rank 2 pid" in log
        assert len([line for line in log.splitlines() if "resuming" in line]) == 2, log  # before and after the requeue
        # the requeued allocation removed the stale segments on each node, before its MPI step; none is left
        assert f"removed 1 stale MPICH segment(s) of job {job_id} on node1: {stale[1]}" in log
        assert f"removed 1 stale MPICH segment(s) of job {job_id} on node2: {stale[2]}" in log
        for node in (1, 2):
            left = _in_node(lab, node, "ls", "/dev/shm").split()
            assert not [name for name in left if f"{mpich_world_id(f'{job_id}.1'):x}" in name], left
    finally:
        if reference_code is None:  # the test ended first: stop the reference (by its pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(reference, signal.SIGKILL)
            forker.wait_started(timeout=60)


def _in_node(lab: Path, node: int, *command: str) -> str:
    """``command`` in node ``node``'s mount namespace (its own /dev/shm), entered through its running slurmd."""
    pids = [line.split() for line in (lab / "pids").read_text().splitlines()]
    pid = [fields[1] for fields in pids if fields[0] == "slurmd" and fields[2].endswith(f"-n{node}")][-1]
    return subprocess.run(["nsenter", "-t", pid, "-m", *command], capture_output=True, text=True, timeout=30,
                          check=True).stdout


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[-1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def _submitit_err(path, job_id) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted(Path(f"{path}.slurm").glob(f"{job_id}_*_log.err")))


