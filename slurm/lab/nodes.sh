#!/usr/bin/env bash
# A SLURM cluster of N simulated nodes on this one machine, for the multi-node tests
# (tests/test_multinode.py). Started by `slurm/lab/up.sh --nodes N [LAB_DIR]`, stopped by
# `slurm/lab/down.sh [LAB_DIR]` (which calls `nodes.sh down LAB_DIR`).
#
#   bash slurm/lab/nodes.sh up N LAB_DIR       # prints LAB_DIR once the N nodes are idle
#   bash slurm/lab/nodes.sh kill-node I LAB_DIR  # SIGKILL every process of node I (slurmd included): a lost node
#   bash slurm/lab/nodes.sh start-node I LAB_DIR # start node I's slurmd again (the node returns to service)
#   bash slurm/lab/nodes.sh down LAB_DIR       # every process, namespace and link made here, nothing else
#
# What it makes (PREFIX = "hv" + 6 hex digits of the lab dir's path, so that two labs never share a name):
#
# * network namespaces PREFIX-head (slurmctld, the login node) and PREFIX-n1 .. PREFIX-nN (one slurmd
#   each); the list goes to LAB_DIR/netns;
# * in PREFIX-head a bridge `br0` (10.233.0.254/24); per node a veth pair created directly inside the
#   namespaces (`eth0` in the node, 10.233.0.I/24; `nI` in the head, enslaved to br0). No link and no
#   address is ever added to this machine's own namespace, so the lab's traffic stays between its
#   namespaces (no route leads out of them);
# * each daemon also has its own UTS namespace (hostname head, node1 .. nodeN), IPC namespace (SysV
#   shared memory) and mount namespace, in which /etc/hosts (LAB_DIR/hosts: the lab's names and
#   addresses) is bind-mounted, /dev/shm is a fresh tmpfs (each node's own shared memory) and
#   /etc/nsswitch.conf says "hosts: files" (no DNS server is reachable: a lookup would wait for its
#   timeout), /proc/sys/kernel/random/boot_id is the node's own (LAB_DIR/boot_id-HOST): UCX (the mpich wheel's
#   netmod) takes two processes with the same boot id for one machine and talks over SysV shared
#   memory and cross-memory attach (process_vm_readv) instead of the network (measured: no TCP
#   connection between the nodes without it). Every other path is shared, as a cluster's shared
#   file system; the PID namespace too (processes of every node are visible in /proc);
# * the job steps a slurmd starts inherit its namespaces: a rank on node2 sees hostname node2, its
#   own /dev/shm and only the addresses of the lab's network.
#
# Client commands (sbatch, squeue, scontrol, scancel, sinfo, srun, salloc) are reached through LAB_DIR/bin,
# whose wrappers run the real command in PREFIX-head when called from outside the lab, and directly when
# called inside a node (srun in a batch script). `. LAB_DIR/env.sh` puts them on PATH with SLURM_CONF.
set -euo pipefail
action="${1:?usage: nodes.sh up N LAB_DIR | kill-node I LAB_DIR | start-node I LAB_DIR | down LAB_DIR}"
here="$(cd "$(dirname "$0")" && pwd)"

prefix_of() { echo "hv$(printf '%s' "$1" | md5sum | cut -c1-6)"; }

start_daemon() {  # NAME NETNS HOSTNAME COMMAND...: a daemon in its namespaces; records "NAME PID" in LAB/pids
  local name="$1" ns="$2" host="$3"; shift 3
  # nsenter and unshare exec (no fork), and so does sh -c 'exec ...': $! is the daemon itself. (Not
  # `ip netns exec`: it remounts /sys, hiding the cgroup file system that slurmd 22.05 needs.)
  [ -f "$LAB/boot_id-$host" ] || cat /proc/sys/kernel/random/uuid > "$LAB/boot_id-$host"
  nsenter --net="/run/netns/$ns" unshare --uts --ipc --mount --propagation private -- sh -c '
    set -e; hostname "$1"; mount --bind "$2" /etc/hosts; mount -t tmpfs -o mode=1777,size=2g "shm-$1" /dev/shm
    mount --bind "$3" /proc/sys/kernel/random/boot_id; mount --bind "$4" /etc/nsswitch.conf
    shift 4; exec "$@"' sh "$host" "$LAB/hosts" "$LAB/boot_id-$host" "$LAB/nsswitch.conf" "$@" >> "$LAB/log/$host.out" 2>&1 &
  echo "$name $! $ns" >> "$LAB/pids"
}

down() {
  [ -f "$LAB/netns" ] || { echo "nodes.sh: no $LAB/netns (no namespace made there)"; return 0; }
  local ns pid pids
  while read -r ns; do  # every process still in a lab namespace is one the lab started (or a job step of it)
    [ -e "/run/netns/$ns" ] || continue
    pids="$(ip netns pids "$ns" 2>/dev/null)"
    [ -z "$pids" ] && continue
    for pid in $pids; do kill -9 "$pid" 2>/dev/null || true; done
    echo "killed $(echo $pids | wc -w) process(es) in $ns"
  done < "$LAB/netns"
  for _ in $(seq 1 50); do
    local left=""
    while read -r ns; do [ -e "/run/netns/$ns" ] && left="$left$(ip netns pids "$ns" 2>/dev/null)"; done < "$LAB/netns"
    [ -z "$left" ] && break
    sleep 0.1
  done
  while read -r ns; do  # deleting a namespace deletes its links (veth pairs, bridge) with it
    if [ -e "/run/netns/$ns" ]; then ip netns delete "$ns" && echo "deleted namespace $ns"; fi
  done < "$LAB/netns"
  rm -f "$LAB/netns" "$LAB/pids"
}

case "$action" in
  up)
    N="${2:?nodes.sh up N LAB_DIR}"; LAB="${3:?nodes.sh up N LAB_DIR}"
    case "$N" in [1-9]) ;; *) echo "nodes.sh: --nodes $N is not allowed; allowed: 1 to 9" >&2; exit 2 ;; esac
    for exe in ip unshare slurmctld slurmd sbatch squeue scontrol sinfo; do
      command -v "$exe" >/dev/null || { echo "nodes.sh: $exe not found (apt-get install iproute2 util-linux slurmctld slurmd slurm-client)" >&2; exit 3; }
    done
    [ "$(id -u)" = 0 ] || { echo "nodes.sh: network namespaces need root" >&2; exit 3; }
    [ -f "$LAB/pids" ] && { bash "$here/down.sh" "$LAB" >/dev/null 2>&1 || true; }
    mkdir -p "$LAB"/{state,log,bin}
    P="$(prefix_of "$LAB")"
    trap 'echo "nodes.sh: the lab did not start; logs in $LAB/log" >&2; tail -n 15 "$LAB"/log/*.log >&2 2>/dev/null; down >/dev/null 2>&1' ERR
    # fail early and clean (ERR trap) if this kernel or container forbids namespaces
    printf '%s\n' "$P-head" > "$LAB/netns"
    for i in $(seq 1 "$N"); do echo "$P-n$i" >> "$LAB/netns"; done
    : > "$LAB/pids"
    ip netns add "$P-head"
    ip -n "$P-head" link set lo up
    ip -n "$P-head" link add br0 type bridge
    ip -n "$P-head" addr add 10.233.0.254/24 dev br0
    ip -n "$P-head" link set br0 up
    printf '127.0.0.1 localhost\n10.233.0.254 head\n' > "$LAB/hosts"
    # names from LAB/hosts only: no DNS server is reachable from the lab (a lookup would wait for its timeout)
    sed -E 's/^(hosts:).*/\1 files/' /etc/nsswitch.conf > "$LAB/nsswitch.conf"
    nodes=""
    for i in $(seq 1 "$N"); do
      ns="$P-n$i"
      ip netns add "$ns"
      ip -n "$ns" link set lo up
      ip -n "$ns" link add eth0 type veth peer name "n$i" netns "$P-head"
      ip -n "$ns" addr add "10.233.0.$i/24" dev eth0
      ip -n "$ns" link set eth0 up
      ip -n "$P-head" link set "n$i" master br0 up
      echo "10.233.0.$i node$i" >> "$LAB/hosts"
      nodes="${nodes:+$nodes,}node$i"
    done
    PORT="${HPCVIDEO_SLURM_PORT:-6817}"  # inside the lab's own namespaces: no clash with a SLURM outside it
    mem_mb="$(awk -v n="$N" '/MemTotal/ {print int($2 / 1024 * 0.8 / n)}' /proc/meminfo)"
    {
      cat <<CONF
ClusterName=hpcvideo-nodes
SlurmctldHost=head(10.233.0.254)
SlurmUser=root
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
AuthType=auth/none
CredType=cred/none
StateSaveLocation=$LAB/state
SlurmdSpoolDir=$LAB/spool-%n
SlurmctldPidFile=$LAB/slurmctld.pid
SlurmdPidFile=$LAB/slurmd-%n.pid
SlurmctldLogFile=$LAB/log/slurmctld.log
SlurmdLogFile=$LAB/log/slurmd-%n.log
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
KillWait=5
MinJobAge=600
SchedulerParameters=defer_batch
SlurmctldTimeout=30
SlurmdTimeout=120
CONF
      for i in $(seq 1 "$N"); do
        echo "NodeName=node$i NodeAddr=10.233.0.$i CPUs=4 RealMemory=$mem_mb State=UNKNOWN"
      done
      echo "PartitionName=debug Nodes=$nodes Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES"
    } > "$LAB/slurm.conf"
    for cmd in sbatch squeue scontrol scancel sinfo srun salloc; do
      real="$(command -v "$cmd")"
      cat > "$LAB/bin/$cmd" <<WRAP
#!/usr/bin/env bash
# $cmd of the lab: run in its head namespace when called from outside the lab (nodes.sh)
if [ -z "\$(ip netns identify \$\$ 2>/dev/null)" ]; then exec nsenter --net=/run/netns/$P-head $real "\$@"; fi
exec $real "\$@"
WRAP
      chmod +x "$LAB/bin/$cmd"
    done
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
    printf 'export SLURM_CONF="%s"\nexport PATH="%s:$PATH"\n' "$LAB/slurm.conf" "$LAB/bin" > "$LAB/env.sh"
    echo "$N" > "$LAB/nodes"
    export SLURM_CONF="$LAB/slurm.conf"
    start_daemon slurmctld "$P-head" head "$(command -v slurmctld)" -D -c -f "$SLURM_CONF"
    for i in $(seq 1 "$N"); do
      mkdir -p "$LAB/spool-node$i"
      start_daemon slurmd "$P-n$i" "node$i" "$(command -v slurmd)" -D -N "node$i" -f "$SLURM_CONF"
    done
    for _ in $(seq 1 150); do
      if [ "$("$LAB/bin/sinfo" -h -N -o '%N %T' 2>/dev/null | grep -c ' idle$')" = "$N" ]; then trap - ERR; echo "$LAB"; exit 0; fi
      while read -r name pid ns; do  # a daemon that exited: no need to wait 30 s
        kill -0 "$pid" 2>/dev/null || { echo "nodes.sh: $name in $ns exited at start" >&2; false; }
      done < "$LAB/pids"
      sleep 0.2
    done
    echo "nodes.sh: the $N nodes did not become idle in 30 s" >&2
    false
    ;;
  kill-node|start-node)
    I="${2:?}"; LAB="${3:?}"; P="$(prefix_of "$LAB")"; ns="$P-n$I"
    [ -e "/run/netns/$ns" ] || { echo "nodes.sh: no node $I in $LAB" >&2; exit 2; }
    if [ "$action" = kill-node ]; then
      pids="$(ip netns pids "$ns")"
      [ -z "$pids" ] || kill -9 $pids
      echo "killed node$I: $(echo $pids | wc -w) process(es)"
    else
      export SLURM_CONF="$LAB/slurm.conf"
      start_daemon slurmd "$ns" "node$I" "$(command -v slurmd)" -D -N "node$I" -f "$SLURM_CONF"
      for _ in $(seq 1 150); do
        "$LAB/bin/sinfo" -h -n "node$I" -o '%T' 2>/dev/null | grep -qx idle && { echo "node$I idle"; exit 0; }
        sleep 0.2
      done
      echo "nodes.sh: node$I did not become idle in 30 s" >&2; exit 4
    fi
    ;;
  down)
    LAB="${2:?nodes.sh down LAB_DIR}"
    down
    ;;
  *) echo "nodes.sh: unknown action $action" >&2; exit 2 ;;
esac
