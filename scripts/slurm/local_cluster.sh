#!/usr/bin/env bash
# A SLURM cluster of N nodes on this one machine, to try the multi-node path before a real cluster.
#
#   sudo scripts/slurm/local_cluster.sh up 2        # node1, node2 (partition "local")
#   sbatch --nodes=2 --ntasks-per-node=1 --gpus-per-node=0 --cpus-per-task=1 \
#       scripts/slurm/multi_node.sbatch trainer.accelerator=cpu data.batch_size=8 \
#       data.num_workers=0 trainer.max_steps=5 logger=csv
#   sudo scripts/slurm/local_cluster.sh kill-node node2   # lose a node: its slurmd and its tasks
#   sudo scripts/slurm/local_cluster.sh start-node node2  # and bring it back
#   sudo scripts/slurm/local_cluster.sh down
#
# Each node is one slurmd in its own UTS namespace (its hostname is its node name, as on a real
# cluster) on its own loopback port; every address is 127.0.0.1. Nodes share the filesystem, except
# $CLIPSCALE_SLURM_STATE/node-local: each node sees its own empty folder there, like a node's
# local disk (a run dir there is refused by multi_node.sbatch: the nodes must share it). `up` writes /etc/slurm/slurm.conf
# and adds one /etc/hosts line so the node names resolve; `down` stops the daemons by their pid
# files and puts both files back as they were. State, logs and pid files live in
# $CLIPSCALE_SLURM_STATE (default /tmp/clipscale-slurm). It needs root and the packages slurmctld,
# slurmd, slurm-client and munge (scripts/ci_install_slurm.sh installs them on Debian/Ubuntu);
# it installs nothing itself.
set -euo pipefail

STATE=${CLIPSCALE_SLURM_STATE:-/tmp/clipscale-slurm}
SLURM_CONF=/etc/slurm/slurm.conf
HOSTS=/etc/hosts
MUNGE_DIRS=(/run/munge /var/log/munge /var/lib/munge)
FIRST_SLURMD_PORT=6818  # slurmctld keeps SLURM's default 6817

fail() {
    echo "error: $*" >&2
    exit 1
}

usage() {
    fail "usage: $0 up N | down | kill-node NODE | start-node NODE (e.g. up 2, kill-node node2)"
}

check_ready() {
    [ "$(id -u)" -eq 0 ] || fail "$0 starts slurmctld/slurmd and writes $SLURM_CONF: run it as root"
    local missing=()
    for tool in slurmctld slurmd sbatch sinfo scontrol munged unshare; do
        command -v "$tool" >/dev/null || missing+=("$tool")
    done
    [ ${#missing[@]} -eq 0 ] || fail "missing ${missing[*]}: install the packages slurmctld" \
        "slurmd slurm-client munge (scripts/ci_install_slurm.sh does it on Debian/Ubuntu)"
}

# Whether the process named in a pid file is alive.
alive() {
    [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

# SIGTERM the process of a pid file, SIGKILL it after 10 s, remove the file.
stop_pid_file() {
    alive "$1" || { rm -f "$1"; return 0; }
    local pid
    pid=$(cat "$1")
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$1"
}

munge_answers() {
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1
}

start_munge() {
    munge_answers && return 0
    mkdir -p "${MUNGE_DIRS[@]}"
    # munged refuses ("Logfile is insecure") to run as munge with files root once created.
    chown -R munge:munge "${MUNGE_DIRS[@]}"
    runuser -u munge -- /usr/sbin/munged
    touch "$STATE/munged.started"
    for _ in $(seq 50); do munge_answers && return 0; sleep 0.2; done
    fail "munged started but credentials do not round-trip (see /var/log/munge/munged.log)"
}

# This machine's NodeName line from `slurmd -C`, renamed to NAME on its own loopback port.
node_line() {
    local name=$1 port=$2 line memory
    line=$(slurmd -C | head -n 1)
    # slurmd drains a node whose measured memory is below the configured one: leave 5% of room.
    memory=$(sed -E 's/.*RealMemory=([0-9]+).*/\1/' <<<"$line")
    sed -E "s/^NodeName=[^ ]+/NodeName=$name NodeAddr=127.0.0.1 Port=$port/;
        s/RealMemory=[0-9]+/RealMemory=$((memory * 95 / 100))/" <<<"$line"
}

write_conf() {
    local nodes=$1
    cat <<EOF
ClusterName=clipscale-local
SlurmctldHost=$(hostname)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
# Without it a job asking for more CPUs than the nodes have pends forever instead of being refused.
EnforcePartLimits=ALL
MailProg=/bin/true
# Seconds between SIGTERM and SIGKILL when a job is requeued or cancelled.
KillWait=10
# A node whose slurmd stops answering is marked DOWN (and its jobs requeued) after this many s.
SlurmdTimeout=20
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool-%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd-%n.log
EOF
    for k in $(seq "$nodes"); do
        node_line "node$k" $((FIRST_SLURMD_PORT + k - 1))
    done
    echo "PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
}

# Start NODE's slurmd in UTS and mount namespaces of its own: its hostname is NODE, and
# $STATE/node-local is a tmpfs only NODE sees (a compute node's local disk: not shared).
start_node() {
    mkdir -p "$STATE/spool-$1" "$STATE/node-local"
    unshare --uts --mount sh -c "mount -t tmpfs tmpfs '$STATE/node-local' && hostname $1 && exec slurmd"
}

# All nodes listed by sinfo report STATE.
nodes_in_state() {
    local states
    states=$(sinfo -h -N -o %t 2>/dev/null | sort -u)
    [ "$states" = "$1" ]
}

up() {
    local nodes=$1
    [[ "$nodes" =~ ^[1-9][0-9]*$ ]] || fail "up N: N must be a positive node count, got '$nodes'"
    check_ready
    alive "$STATE/slurmctld.pid" && fail "a local cluster is already up (state in $STATE); run" \
        "'$0 down' first"
    mkdir -p "$STATE/state"
    start_munge
    # Keep what `down` puts back: slurm.conf (or that there was none) and /etc/hosts.
    if [ -f "$SLURM_CONF" ]; then cp -p "$SLURM_CONF" "$STATE/slurm.conf.saved"; fi
    cp -p "$HOSTS" "$STATE/hosts.saved"
    mkdir -p "$(dirname "$SLURM_CONF")"
    write_conf "$nodes" >"$SLURM_CONF"
    # In place (not a new file): /etc/hosts may be a bind mount in containers.
    echo "127.0.0.1 $(seq -f 'node%g' -s ' ' "$nodes")" >>"$HOSTS"
    # -c: forget jobs from any earlier state; -i: ignore unreadable state files.
    slurmctld -c -i
    for k in $(seq "$nodes"); do start_node "node$k"; done
    for _ in $(seq 150); do nodes_in_state idle && break; sleep 0.2; done
    nodes_in_state idle || fail "nodes not idle after 30 s: $(sinfo -h -N -o '%N %t' | xargs);" \
        "logs in $STATE"
    echo "local SLURM cluster up: $(sinfo -h -o %N) (partition local), state in $STATE"
}

down() {
    [ "$(id -u)" -eq 0 ] || fail "$0 down stops root daemons and restores $SLURM_CONF: run it as root"
    if alive "$STATE/slurmctld.pid"; then
        scancel --full --user=root 2>/dev/null || true
        for _ in $(seq 150); do [ -z "$(squeue -h -o %i)" ] && break; sleep 0.2; done
    fi
    for pid_file in "$STATE"/slurmd-*.pid "$STATE/slurmctld.pid"; do
        if [ -e "$pid_file" ]; then stop_pid_file "$pid_file"; fi
    done
    if [ -e "$STATE/munged.started" ]; then
        stop_pid_file /run/munge/munged.pid
        rm -f "$STATE/munged.started"
    fi
    if [ -e "$STATE/hosts.saved" ]; then
        cat "$STATE/hosts.saved" >"$HOSTS"
        rm -f "$STATE/hosts.saved"
        if [ -e "$STATE/slurm.conf.saved" ]; then
            mv "$STATE/slurm.conf.saved" "$SLURM_CONF"
        else
            rm -f "$SLURM_CONF"
        fi
    fi
    echo "local SLURM cluster down; $SLURM_CONF and $HOSTS restored"
}

# SIGKILL every process of NODE: all processes in its slurmd's UTS namespace (slurmd, the job
# step daemons and the tasks they started), as if the machine had lost power.
kill_node() {
    local pid_file="$STATE/slurmd-$1.pid" namespace pid
    alive "$pid_file" || fail "no running slurmd for $1 (pid file $pid_file)"
    namespace=$(readlink "/proc/$(cat "$pid_file")/ns/uts")
    for proc in /proc/[0-9]*; do
        pid=${proc#/proc/}
        if [ "$(readlink "$proc/ns/uts" 2>/dev/null)" = "$namespace" ]; then
            kill -KILL "$pid" 2>/dev/null || true  # it may have exited meanwhile
        fi
    done
    rm -f "$pid_file"
    echo "killed every process of $1"
}

case "${1:-}" in
    up) [ $# -eq 2 ] || usage; up "$2" ;;
    down) [ $# -eq 1 ] || usage; down ;;
    kill-node) [ $# -eq 2 ] || usage; kill_node "$2" ;;
    start-node) [ $# -eq 2 ] || usage; check_ready; start_node "$2" ;;
    *) usage ;;
esac
