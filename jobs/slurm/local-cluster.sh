#!/usr/bin/env bash
# A throw-away single-node Slurm cluster on this machine, for tests and for trying the
# array job before a real cluster. Needs root (it may apt-get install the daemons).
#
#   jobs/slurm/local-cluster.sh start  [STATE_DIR]   install if needed, start, wait until idle
#   jobs/slurm/local-cluster.sh stop   [STATE_DIR]   cancel jobs, stop the daemons it started
#   jobs/slurm/local-cluster.sh status [STATE_DIR]   sinfo/squeue of that cluster
#
# After `start`, point the Slurm clients at it:   export SLURM_CONF=STATE_DIR/slurm.conf
#
# Everything lives in STATE_DIR (default ${TMPDIR:-/tmp}/tilescan-slurm): config, spool,
# logs, pid files, and a private munge daemon with its own key and socket, so it neither
# needs nor disturbs a system-wide munge or Slurm. Ports: the first free pair at or above
# $TILESCAN_SLURM_PORT (default 6817); slurmctld gets the first, slurmd the second.
# Without cgroups here: process tracking by /proc, no CPU or memory enforcement.
# TILESCAN_SLURM_GPUS=N (default 0) gives the node N stand-in GPUs: a generic resource
# `gpu` that Slurm schedules and hands out as it does real ones (`--gres=gpu:G` jobs wait
# for them, and each gets CUDA_VISIBLE_DEVICES for its share), backed by device nodes like
# /dev/null in STATE_DIR/gpus, so that jobs/slurm/tilescan-gpu.sbatch can be tried on the
# real scheduler without a GPU.
# Exit codes: 0 ok, 1 failed to start, 2 usage, 3 not root / cannot install.
set -euo pipefail

cmd=${1:-}
STATE=${2:-${TMPDIR:-/tmp}/tilescan-slurm}
CONF="$STATE/slurm.conf"

say() { echo "local-cluster: $*" >&2; }

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1" 2>/dev/null)" 2>/dev/null; }

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

install_packages() {
  local missing=()
  for b in slurmctld slurmd sbatch munged; do command -v "$b" >/dev/null || missing+=("$b"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" != 0 ]; then
    say "missing ${missing[*]} and not root, cannot apt-get install slurmctld slurmd slurm-client munge"
    exit 3
  fi
  if ! command -v apt-get >/dev/null; then
    say "missing ${missing[*]} and no apt-get on this machine"
    exit 3
  fi
  say "installing slurmctld slurmd slurm-client munge (missing: ${missing[*]})"
  export DEBIAN_FRONTEND=noninteractive
  if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null; }; then
    say "apt-get install failed"
    exit 3
  fi
}

start_munge() {
  # A private munged: own key, socket and pid file under STATE/munge.
  local m="$STATE/munge"
  if [ ${#m} -gt 90 ]; then  # a Unix socket path must fit in 108 bytes
    say "STATE_DIR path too long for munge's socket ($m); use a shorter one"
    exit 1
  fi
  mkdir -p "$m"
  chmod 0700 "$m"
  [ -s "$m/munge.key" ] || dd if=/dev/urandom of="$m/munge.key" bs=1024 count=1 status=none
  chmod 0400 "$m/munge.key"
  if pid_alive "$m/munged.pid"; then return 0; fi
  rm -f "$m/munge.socket" "$m/munge.socket.lock" "$m/munged.pid"
  # --force: munged refuses to run as root or with non-standard paths without it.
  munged --force --key-file="$m/munge.key" --socket="$m/munge.socket" --pid-file="$m/munged.pid" \
         --log-file="$m/munged.log" --seed-file="$m/munged.seed"
  for _ in $(seq 100); do
    munge --socket="$m/munge.socket" -n </dev/null 2>/dev/null | unmunge --socket="$m/munge.socket" >/dev/null 2>&1 && return 0
    sleep 0.05
  done
  say "munged did not come up; see $m/munged.log"
  exit 1
}

write_conf() {
  local host cpus mem port
  host=$(hostname -s)
  cpus=$(nproc)
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 512 ))
  port=${TILESCAN_SLURM_PORT:-6817}
  while port_busy "$port" || port_busy $((port + 1)); do port=$((port + 2)); done
  mkdir -p "$STATE/ctld" "$STATE/spool"
  local gpus=${TILESCAN_SLURM_GPUS:-0} gres="" gres_types=""
  case "$gpus" in ''|*[!0-9]*) say "TILESCAN_SLURM_GPUS must be a number, not '$gpus'"; exit 2 ;; esac
  rm -f "$STATE/gres.conf"
  if [ "$gpus" -gt 0 ]; then  # gres.conf sits beside slurm.conf, where both daemons look
    mkdir -p "$STATE/gpus"
    # Slurm takes only character or block devices: each is a node like /dev/null (1, 3)
    for i in $(seq 0 $((gpus - 1))); do
      [ -c "$STATE/gpus/gpu$i" ] || mknod "$STATE/gpus/gpu$i" c 1 3
    done
    echo "NodeName=${host} Name=gpu File=${STATE}/gpus/gpu[0-$((gpus - 1))]" >"$STATE/gres.conf"
    gres=" Gres=gpu:${gpus}"
    gres_types="GresTypes=gpu"
  fi
  # SlurmctldHost and NodeName must be the short host name; both talk over 127.0.0.1.
  cat >"$CONF" <<EOF
# written by jobs/slurm/local-cluster.sh -- a single-node test cluster
ClusterName=tilescan-local
SlurmctldHost=${host}(127.0.0.1)
SlurmctldPort=${port}
SlurmdPort=$((port + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=${STATE}/munge/munge.socket
StateSaveLocation=${STATE}/ctld
SlurmdSpoolDir=${STATE}/spool
SlurmctldPidFile=${STATE}/slurmctld.pid
SlurmdPidFile=${STATE}/slurmd.pid
SlurmctldLogFile=${STATE}/slurmctld.log
SlurmdLogFile=${STATE}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=${STATE}/jobcomp.txt
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MinJobAge=600
${gres_types}
NodeName=${host} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${mem}${gres} State=UNKNOWN
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
  install_packages
  for d in slurmctld slurmd; do
    if pid_alive "$STATE/$d.pid"; then
      say "$d is already running from $STATE (pid $(cat "$STATE/$d.pid")); stop it first"
      exit 1
    fi
  done
  mkdir -p "$STATE"
  start_munge
  write_conf
  export SLURM_CONF="$CONF"
  # -c: start clean, without the state of an earlier cluster in this folder
  slurmctld -c -f "$CONF"
  for _ in $(seq 200); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.05; done
  slurmd -f "$CONF" -N "$(hostname -s)"
  local st=""
  for _ in $(seq 300); do
    st=$(sinfo -h -o %T 2>/dev/null | head -1 || true)
    case "$st" in idle*|mix*|alloc*) echo "export SLURM_CONF=$CONF"; return 0 ;; esac
    sleep 0.1
  done
  say "node not ready (state '$st'); last log lines:"
  tail -n 15 "$STATE/slurmctld.log" "$STATE/slurmd.log" >&2 || true
  stop
  exit 1
}

stop() {
  if [ -f "$CONF" ] && pid_alive "$STATE/slurmctld.pid"; then
    SLURM_CONF="$CONF" timeout 10 scancel --quiet --user="$(id -un)" 2>/dev/null || true
  fi
  local pids=() f
  for f in "$STATE/slurmd.pid" "$STATE/slurmctld.pid" "$STATE/munge/munged.pid"; do
    if pid_alive "$f"; then
      pids+=("$(cat "$f")")
      kill -TERM "$(cat "$f")" 2>/dev/null || true
    fi
  done
  for p in "${pids[@]}"; do
    for _ in $(seq 150); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$p" 2>/dev/null && kill -KILL "$p" 2>/dev/null || true
  done
  rm -f "$STATE/slurmd.pid" "$STATE/slurmctld.pid" "$STATE/munge/munged.pid"
  say "stopped (${#pids[@]} daemons)"
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  status)
    export SLURM_CONF="$CONF"
    sinfo && squeue ;;
  *) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
