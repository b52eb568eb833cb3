#!/usr/bin/env bash
# Bring up a single-node SLURM on this machine, for the cluster tests (tests/test_cluster.py) and CI.
#
#   bash slurm/lab/up.sh [LAB_DIR]      # default /tmp/hpcvideo-slurm-lab; prints LAB_DIR on success
#   bash slurm/lab/up.sh --nodes 2 LAB_DIR   # N simulated nodes in network namespaces instead (nodes.sh)
#   . LAB_DIR/env.sh                    # SLURM_CONF + the sacct stand-in on PATH, for sbatch/squeue/submitit
#   bash slurm/lab/down.sh [LAB_DIR]    # stops the daemons by the PIDs recorded here
#
# Needs Debian's slurmctld, slurmd and slurm-client (22.05; `apt-get install -y --no-install-recommends
# slurmctld slurmd slurm-client munge libpmix-dev`) and root (slurmd runs jobs as their user). Why each
# setting (measured with slurm-wlm 22.05):
#
# * no systemd: the daemons run in the foreground (-D) as background processes; their PIDs go to
#   LAB_DIR/pids and down.sh kills exactly those;
# * AuthType=auth/none + CredType=cred/none: no munge daemon (exists in 22.05, removed in 23.11);
# * the node advertises 8 CPUs whatever the real count (config_overrides), else 4-task jobs pend forever;
# * FirstJobId from the clock: a fresh state dir restarts job ids at 1, and a reused submitit folder
#   would then return a stale result at once;
# * no accounting: `sacct` exits 1, and submitit then never sees a job that died before writing its
#   result; LAB_DIR/bin/sacct answers from squeue instead (header JobID|State|NodeList).
# * KillWait=1: submitit's tasks ignore the SIGTERM of a requeue (they have checkpointed by then), so a
#   requeued job stays COMPLETING until the SIGKILL, KillWait seconds later (SLURM's default: 30).
set -euo pipefail
if [ "${1:-}" = "--nodes" ]; then
  exec bash "$(dirname "$0")/nodes.sh" up "${2:?up.sh --nodes N LAB_DIR}" "${3:?up.sh --nodes N LAB_DIR}"
fi
LAB="${1:-/tmp/hpcvideo-slurm-lab}"
for exe in slurmctld slurmd sbatch squeue scontrol sinfo; do
  command -v "$exe" >/dev/null || { echo "up.sh: $exe not found (apt-get install slurmctld slurmd slurm-client)" >&2; exit 3; }
done
version="$(slurmctld -V | awk '{print $2}')"
case "$version" in
  2[0-2].*|23.0[0-9].*) ;;
  *) echo "up.sh: SLURM $version has no auth/none (removed in 23.11); this script supports 20.x-23.02" >&2; exit 3 ;;
esac
if [ -f "$LAB/pids" ]; then bash "$(dirname "$0")/down.sh" "$LAB" >/dev/null 2>&1 || true; fi
PORT="${HPCVIDEO_SLURM_PORT:-6817}"  # slurmctld; slurmd uses PORT+1
if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null || (exec 3<>"/dev/tcp/127.0.0.1/$((PORT + 1))") 2>/dev/null; then
  echo "up.sh: port $PORT or $((PORT + 1)) is in use (another SLURM, or a lab not stopped: slurm/lab/down.sh DIR); set HPCVIDEO_SLURM_PORT" >&2
  exit 3
fi
mkdir -p "$LAB"/{state,spool,log,bin}
host="$(hostname -s)"
mem_mb="$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)"
cat > "$LAB/slurm.conf" <<CONF
ClusterName=hpcvideo-lab
SlurmctldHost=${host}(127.0.0.1)
SlurmUser=root
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
AuthType=auth/none
CredType=cred/none
StateSaveLocation=$LAB/state
SlurmdSpoolDir=$LAB/spool
SlurmctldPidFile=$LAB/slurmctld.pid
SlurmdPidFile=$LAB/slurmd.pid
SlurmctldLogFile=$LAB/log/slurmctld.log
SlurmdLogFile=$LAB/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=pmi2
SlurmdParameters=config_overrides
ReturnToService=2
FirstJobId=$(( $(date +%s) % 1000000 * 10 ))
MaxJobId=67043328
KillWait=1
MinJobAge=600
SchedulerParameters=defer_batch,batch_sched_delay=0
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=${host} NodeAddr=127.0.0.1 CPUs=8 RealMemory=${mem_mb} State=UNKNOWN
PartitionName=debug Nodes=${host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
cat > "$LAB/bin/sacct" <<'SACCT'
#!/usr/bin/env bash
# sacct stand-in for a SLURM without accounting: answers submitit's
# `sacct -o JobID,State,NodeList --parsable2 -j IDS` from squeue (jobs stay listed MinJobAge seconds).
ids=""; prev=""
for arg in "$@"; do [ "$prev" = "-j" ] && ids="$arg"; prev="$arg"; done
echo "JobID|State|NodeList"
[ -n "$ids" ] && squeue --states=all -h -j "$ids" -o '%i|%T|%N' 2>/dev/null
exit 0
SACCT
chmod +x "$LAB/bin/sacct"
cat > "$LAB/env.sh" <<ENV
export SLURM_CONF="$LAB/slurm.conf"
export PATH="$LAB/bin:\$PATH"
ENV
export SLURM_CONF="$LAB/slurm.conf"
: > "$LAB/pids"
slurmctld -D -c -f "$SLURM_CONF" >> "$LAB/log/slurmctld.out" 2>&1 &
echo "slurmctld $!" >> "$LAB/pids"
slurmd -D -f "$SLURM_CONF" >> "$LAB/log/slurmd.out" 2>&1 &
echo "slurmd $!" >> "$LAB/pids"
for _ in $(seq 1 150); do
  if sinfo -h -o '%T' 2>/dev/null | grep -qx 'idle'; then echo "$LAB"; exit 0; fi
  sleep 0.2
done
echo "up.sh: the node did not become idle in 30 s; logs in $LAB/log" >&2
tail -n 20 "$LAB/log/"*.log >&2 || true
bash "$(dirname "$0")/down.sh" "$LAB" >/dev/null 2>&1 || true
exit 4
