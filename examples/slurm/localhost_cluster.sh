#!/bin/bash
# A one-node Slurm cluster on this machine, for trying examples/slurm/pretrain.sbatch (and the
# test that runs it): Debian's slurm-wlm + munge (`apt-get install slurm-wlm munge`), as root.
#
#   eval "$(bash examples/slurm/localhost_cluster.sh start DIR)"   # exports SLURM_CONF
#   sbatch ...; squeue; scontrol requeue JOB
#   bash examples/slurm/localhost_cluster.sh stop DIR
set -euo pipefail
cmd=${1:?usage: localhost_cluster.sh start|stop DIR}
dir=$(realpath -m "${2:?usage: localhost_cluster.sh start|stop DIR}")
host=$(hostname -s)

if [ "$cmd" = stop ]; then
  for d in slurmd slurmctld; do
    [ -f "$dir/$d.pid" ] && kill "$(cat "$dir/$d.pid")" 2>/dev/null || true
  done
  exit 0
fi

mkdir -p "$dir/state" "$dir/spool" "$dir/log"
cpus=$(nproc)
mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
cat > "$dir/slurm.conf" <<CONF
ClusterName=predet-localhost
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldPort=${SLURMCTLD_PORT:-6817}
SlurmdPort=${SLURMD_PORT:-6818}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/linear
JobRequeue=1
KillWait=30
ReturnToService=2
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
if ! munge -n >/dev/null 2>&1; then
  mkdir -p /run/munge && chown munge:munge /run/munge 2>/dev/null || true
  su -s /bin/sh munge -c /usr/sbin/munged 2>/dev/null || /usr/sbin/munged --force
fi
export SLURM_CONF="$dir/slurm.conf"
slurmctld -f "$SLURM_CONF" >/dev/null 2>&1
slurmd -f "$SLURM_CONF" >/dev/null 2>&1
for _ in $(seq 60); do
  if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
    echo "export SLURM_CONF=$SLURM_CONF"
    exit 0
  fi
  sleep 0.5
done
echo "localhost_cluster.sh: slurm did not come up; see $dir/log" >&2
exit 1
