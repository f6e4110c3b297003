#!/usr/bin/env bash
# Stop the cluster started by start-slurm.sh: cancel its jobs, then stop the daemons by the pid
# files that script wrote (never by process name).
set -uo pipefail
BASE=${SLURM_LOCAL_BASE:-/var/lib/slurm-local}
RUN=$BASE/run

# stop FILE COMM: TERM the pid in FILE if it is a live COMM; KILL after 20 s
stop() {
  local f=$1 comm=$2 p
  [ -s "$f" ] || return 0
  p=$(cat "$f")
  if [ -z "$p" ] || [ ! -r "/proc/$p/comm" ] || [ "$(cat "/proc/$p/comm")" != "$comm" ]; then
    echo "stop-slurm: $f: pid '$p' is not a running $comm; removing the stale pid file"
    rm -f "$f"; return 0
  fi
  kill -TERM "$p"
  for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
  kill -0 "$p" 2>/dev/null && { echo "stop-slurm: $comm ($p) ignored SIGTERM; sending SIGKILL"; kill -KILL "$p"; }
  rm -f "$f"
  echo "stop-slurm: stopped $comm (pid $p)"
}

# Cancel the jobs first so no job process outlives slurmd.
if [ -s "$RUN/slurmctld.pid" ] && command -v squeue >/dev/null; then
  jobs=$(squeue -h -o %A 2>/dev/null | sort -u)
  if [ -n "$jobs" ]; then
    echo "stop-slurm: cancelling jobs:" $jobs
    # shellcheck disable=SC2086
    scancel $jobs 2>/dev/null
    for _ in $(seq 50); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.2; done
  fi
fi

stop "$RUN/slurmd.pid" slurmd
stop "$RUN/slurmctld.pid" slurmctld
stop "$RUN/munge/munged.pid" munged
echo "stop-slurm: done"
