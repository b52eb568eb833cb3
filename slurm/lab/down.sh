#!/usr/bin/env bash
# Stop the single-node SLURM started by up.sh: the daemons whose PIDs up.sh recorded, nothing else.
set -uo pipefail
LAB="${1:-/tmp/hpcvideo-slurm-lab}"
if [ -f "$LAB/netns" ]; then  # the multi-node lab (up.sh --nodes N): its clients, daemons and namespaces
  timeout 10 "$LAB/bin/scancel" --user="$(id -un)" >/dev/null 2>&1 || true
  exec bash "$(dirname "$0")/nodes.sh" down "$LAB"
fi
[ -f "$LAB/pids" ] || { echo "down.sh: no $LAB/pids (nothing started there)"; exit 0; }
if [ -f "$LAB/slurm.conf" ]; then  # cancel what is still queued or running, so no job step outlives slurmd
  SLURM_CONF="$LAB/slurm.conf" timeout 10 scancel --user="$(id -un)" >/dev/null 2>&1 || true
  sleep 0.5
fi
stopping=()
while read -r name pid; do
  # only a process that still is the daemon started (a PID may have been reused since)
  [ "$(ps -p "$pid" -o comm= 2>/dev/null)" = "$name" ] || { echo "$name ($pid) is not running"; continue; }
  kill "$pid" 2>/dev/null && stopping+=("$name $pid")
done < "$LAB/pids"
for entry in ${stopping[@]+"${stopping[@]}"}; do  # all were told to stop first: they shut down side by side (about 2 s, not 2 + 1.5)
  name="${entry% *}" pid="${entry#* }"
  for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
  echo "stopped $name ($pid)"
done
rm -f "$LAB/pids"
