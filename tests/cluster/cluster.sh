#!/usr/bin/env bash
# A real multi-node Slurm cluster on this one machine, for the integration tests.
#
#   tests/cluster/cluster.sh up       start munged, slurmctld and N slurmd "nodes" (idempotent)
#   tests/cluster/cluster.sh down     stop everything and remove every namespace, link and mount made
#   tests/cluster/cluster.sh env      print the exports a client needs (eval "$(... env)")
#   tests/cluster/cluster.sh status   show daemons and nodes; exit 0 only when healthy
#   tests/cluster/cluster.sh deps     apt-get install what this script needs
#
# Layout, as on a real cluster where each node has one fabric interface:
#   host:  slurmctld + munged, bridge hpcd-br0 with $SUBNET.1/24
#   nodeI: network namespace hpcd-nodeI holding lo and ib0 ($SUBNET.(10+I)/24, a veth whose host end
#          hpcd-vI sits on the bridge); slurmd -N nodeI runs in it, so every job step does too.
# Only the network is namespaced: all nodes see the host's filesystem (the "shared filesystem").
# slurmd is started with nsenter (not `ip netns exec`, which remounts /sys).
# Generated config, keys, logs, spools and pid files live in $STATE, never in the repository.
#
# Settings (environment):
#   HPCDASK_CLUSTER_NODES   number of nodes (default 3; NODES is read too)
#   HPCDASK_CLUSTER_STATE   state directory (default /var/lib/hpcdask-test/slurm)
#   HPCDASK_CLUSTER_SUBNET  first three octets of the private /24 (default 10.253.71)
#   HPCDASK_CLUSTER_CPUS    CPUs per node (default 2)      HPCDASK_CLUSTER_MEMORY  MiB per node (default 4000)
#   HPCDASK_CLUSTER_PORT    slurmctld port (default 6817)
#   HPCDASK_IMAGE           passed through by `env`
# Needs root, iproute2, util-linux (nsenter, flock), slurm-wlm and munge.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
bin=$here/bin

STATE=${HPCDASK_CLUSTER_STATE:-/var/lib/hpcdask-test/slurm}
NODES=${HPCDASK_CLUSTER_NODES:-${NODES:-3}}
SUBNET=${HPCDASK_CLUSTER_SUBNET:-10.253.71}
CPUS=${HPCDASK_CLUSTER_CPUS:-2}
MEMORY=${HPCDASK_CLUSTER_MEMORY:-4000}
PORT=${HPCDASK_CLUSTER_PORT:-6817}
[[ $STATE == /?* && $STATE != *..* ]] || { echo "cluster.sh: HPCDASK_CLUSTER_STATE must be an absolute path" >&2; exit 2; }
BRIDGE=hpcd-br0
HOST_ADDR=$SUBNET.1
CONF=$STATE/etc/slurm.conf
MUNGE_SOCKET=$STATE/munge/munge.socket
LOCK=/run/lock/hpcdask-cluster.lock
PREFIX=hpcd-   # every namespace and link this script makes starts with it

say() { echo "cluster.sh: $*" >&2; }
die() { say "$*"; exit 1; }
now() { date +%s.%N; }
took() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

node_name() { echo "node$1"; }
node_ns() { echo "${PREFIX}node$1"; }
node_addr() { echo "$SUBNET.$((10 + $1))"; }

# Clients (sinfo, scontrol, ...) read the generated config.
export SLURM_CONF=$CONF

# --- processes -----------------------------------------------------------------------------------

# True if PID runs and is not a zombie (PID 1 here may reap the daemons' zombies late).
alive() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [ "${stat%% *}" != Z ]
}

# pid in FILE if that process is alive and runs COMM.
pid_of() {
    local file=$1 comm=$2 pid
    [ -s "$file" ] || return 1
    pid=$(tr -dc 0-9 <"$file")
    [ -n "$pid" ] && alive "$pid" && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$comm" ] || return 1
    echo "$pid"
}

# Send TERM to the given pids, wait up to SECS, then KILL what is left.
stop_pids() {
    local secs=$1; shift
    [ $# -gt 0 ] || return 0
    kill -TERM "$@" 2>/dev/null || true
    local i p any
    for ((i = 0; i < secs * 10; i++)); do
        any=0
        for p in "$@"; do alive "$p" && any=1; done
        [ $any = 0 ] && return 0
        sleep 0.1
    done
    kill -KILL "$@" 2>/dev/null || true
    sleep 0.2
}

# All processes inside one of our namespaces: slurmd, slurmstepd and every job task on that node.
ns_pids() {
    local ns
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^${PREFIX}" || true); do
        ip netns pids "$ns" 2>/dev/null || true
    done
}

# --- health --------------------------------------------------------------------------------------

daemons_alive() {
    pid_of "$STATE/run/munged.pid" munged >/dev/null || return 1
    pid_of "$STATE/run/slurmctld.pid" slurmctld >/dev/null || return 1
    local n i
    n=$(cat "$STATE/nodes" 2>/dev/null) || return 1
    for ((i = 1; i <= n; i++)); do
        pid_of "$STATE/run/slurmd-$(node_name "$i").pid" slurmd >/dev/null || return 1
    done
}

# Number of nodes sinfo reports as usable (idle, or running jobs).
nodes_ready() {
    { timeout 10 sinfo -h -N -o '%N %T' 2>/dev/null || true; } \
        | awk '$2 ~ /^(idle|mixed|allocated|completing)$/' | sort -u | wc -l
}

healthy() {
    # ... and made from this checkout (its TaskProlog), not from another clone on the machine.
    [ -s "$CONF" ] && grep -qxF "TaskProlog=$repo/tests/cluster/slurm/task_prolog.sh" "$CONF" \
        && daemons_alive && [ "$(nodes_ready)" -eq "$(cat "$STATE/nodes")" ] \
        && [ "$(cat "$STATE/nodes")" -eq "$NODES" ]
}

# --- down ----------------------------------------------------------------------------------------

do_down() {
    local t0 pids p ns link
    t0=$(now)
    # Jobs first, so slurmstepd and tasks end cleanly; then whatever lives in our namespaces.
    if [ -s "$CONF" ] && pid_of "$STATE/run/slurmctld.pid" slurmctld >/dev/null; then
        timeout 10 scancel --quiet --full --user=root 2>/dev/null || true
    fi
    pids=()
    for p in "$STATE"/run/slurmd-*.pid; do
        [ -e "$p" ] && p=$(pid_of "$p" slurmd) && pids+=("$p")
    done
    stop_pids 5 "${pids[@]}"
    mapfile -t pids < <(ns_pids)
    stop_pids 5 "${pids[@]}"
    pids=()
    p=$(pid_of "$STATE/run/slurmctld.pid" slurmctld) && pids+=("$p")
    p=$(pid_of "$STATE/run/munged.pid" munged) && pids+=("$p")
    stop_pids 10 "${pids[@]}"

    for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^${PREFIX}" || true); do
        ip netns del "$ns" 2>/dev/null || say "could not delete namespace $ns"
    done
    for link in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1 | grep "^${PREFIX}" || true); do
        ip link del "$link" 2>/dev/null || true
    done
    # `ip netns add` turns /run/netns into a mount point; undo that if we caused it and it is unused.
    if [ -e "$STATE/netns-mounted-by-us" ]; then
        if [ -z "$(ls -A /run/netns 2>/dev/null)" ] && mountpoint -q /run/netns; then
            umount /run/netns 2>/dev/null || true
        fi
        rm -f "$STATE/netns-mounted-by-us"
    fi
    rm -f "$STATE"/run/*.pid "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    say "down in $(took "$t0")s (logs kept in $STATE/log)"
}

# --- up ------------------------------------------------------------------------------------------

check_deps() {
    local missing=()
    for c in slurmctld slurmd sinfo srun sbatch scontrol munged munge unmunge ip nsenter flock setsid ss; do
        command -v "$c" >/dev/null || missing+=("$c")
    done
    [ ${#missing[@]} -eq 0 ] || die "missing: ${missing[*]} (run: $0 deps)"
    [ "$(id -u)" -eq 0 ] || die "needs root (network namespaces, slurmd)"
}

start_munge() {
    mkdir -p "$STATE/munge"
    chmod 0755 "$STATE/munge"   # munged wants the socket directory searchable by all
    # A fresh key per cluster; the host's /etc/munge is left alone.
    dd if=/dev/urandom of="$STATE/munge/munge.key" bs=1024 count=1 status=none
    chmod 0400 "$STATE/munge/munge.key"
    munged --socket="$MUNGE_SOCKET" --key-file="$STATE/munge/munge.key" \
        --pid-file="$STATE/run/munged.pid" --log-file="$STATE/log/munged.log" \
        --seed-file="$STATE/munge/munged.seed" 9>&- </dev/null >>"$STATE/log/munged.out" 2>&1 \
        || { cat "$STATE/log/munged.out" "$STATE/log/munged.log" >&2 2>/dev/null; die "munged failed"; }
    local i
    for ((i = 0; i < 50; i++)); do
        munge -S "$MUNGE_SOCKET" -n 2>/dev/null | unmunge -S "$MUNGE_SOCKET" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    die "munged does not answer on $MUNGE_SOCKET (see $STATE/log/munged.log)"
}

make_network() {
    local i ns veth peer
    mountpoint -q /run/netns 2>/dev/null || touch "$STATE/netns-mounted-by-us"
    ip link add "$BRIDGE" type bridge
    ip addr add "$HOST_ADDR/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
    for ((i = 1; i <= NODES; i++)); do
        ns=$(node_ns "$i"); veth=${PREFIX}v$i; peer=${PREFIX}p$i
        ip netns add "$ns"
        ip link add "$veth" type veth peer name "$peer"
        ip link set "$peer" netns "$ns"
        ip -n "$ns" link set "$peer" name ib0
        ip -n "$ns" addr add "$(node_addr "$i")/24" dev ib0
        ip -n "$ns" link set lo up
        ip -n "$ns" link set ib0 up
        ip link set "$veth" master "$BRIDGE"
        ip link set "$veth" up
    done
}

write_conf() {
    local i nodes=""
    for ((i = 1; i <= NODES; i++)); do
        nodes+="NodeName=$(node_name "$i") NodeAddr=$(node_addr "$i") CPUs=$CPUS RealMemory=$MEMORY State=UNKNOWN"$'\n'
    done
    mkdir -p "$STATE/etc"
    # slurmctld refuses to start unless SlurmctldHost names this host.
    awk -v name="$(hostname -s)" -v addr="$HOST_ADDR" -v port="$PORT" -v state="$STATE" \
        -v repo="$repo" -v nodes="$nodes" '
        { gsub(/@CTLD_NAME@/, name); gsub(/@CTLD_ADDR@/, addr); gsub(/@CTLD_PORT@/, port)
          gsub(/@STATE@/, state); gsub(/@REPO@/, repo)
          if ($0 == "@NODES@") { printf "%s", nodes; next } print }' \
        "$here/slurm/slurm.conf.in" >"$CONF"
    cp "$here/slurm/cgroup.conf" "$STATE/etc/cgroup.conf"
    echo "$NODES" >"$STATE/nodes"
}

# The daemons' environment: tests/cluster/bin first on PATH (TaskProlog puts it first in tasks too).
daemon_env() {
    env -i PATH="$bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
        SLURM_CONF="$CONF" HOME=/root LANG=C.UTF-8 "$@"
}

start_slurm() {
    local i node
    # -c: start from a clean state (no jobs, no node states from an earlier cluster).
    daemon_env setsid slurmctld -c -f "$CONF" 9>&- </dev/null >>"$STATE/log/slurmctld.out" 2>&1 \
        || { tail -n 30 "$STATE/log/slurmctld.out" "$STATE/log/slurmctld.log" >&2 || true; die "slurmctld failed"; }
    wait_ctld 20
    for ((i = 1; i <= NODES; i++)); do
        node=$(node_name "$i")
        mkdir -p "$STATE/spool/$node"
        daemon_env setsid nsenter --net="/run/netns/$(node_ns "$i")" slurmd -f "$CONF" -N "$node" \
            9>&- </dev/null >>"$STATE/log/slurmd-$node.out" 2>&1 \
            || { tail -n 30 "$STATE/log/slurmd-$node.out" "$STATE/log/slurmd-$node.log" >&2 || true; die "slurmd $node failed"; }
    done
}

# slurmctld answers (scontrol ping); fail fast with its log when it died instead.
wait_ctld() {
    local deadline=$((SECONDS + $1))
    while [ $SECONDS -lt $deadline ]; do
        timeout 5 scontrol ping 2>/dev/null | grep -q 'is UP' && return 0
        if [ -s "$STATE/run/slurmctld.pid" ] && ! pid_of "$STATE/run/slurmctld.pid" slurmctld >/dev/null; then
            break
        fi
        sleep 0.2
    done
    grep -E 'error|fatal' "$STATE/log/slurmctld.log" 2>/dev/null | tail -n 5 >&2 || true
    die "slurmctld is not answering (see $STATE/log/slurmctld.log)"
}

wait_idle() {
    local deadline=$((SECONDS + ${1:-60})) ready=0
    while [ $SECONDS -lt $deadline ]; do
        ready=$(nodes_ready)
        [ "$ready" -eq "$NODES" ] && return 0
        daemons_alive || break
        sleep 0.5
    done
    sinfo -N -l >&2 2>/dev/null || true
    for f in "$STATE"/log/slurmctld.log "$STATE"/log/slurmd-*.log; do
        [ -e "$f" ] && { echo "--- $f" >&2; tail -n 15 "$f" >&2; }
    done
    die "$ready of $NODES nodes idle"
}

# A failed or interrupted `up` leaves nothing running.
on_up_exit() {
    local rc=$?
    if [ $rc -ne 0 ]; then
        say "up failed: tearing down"
        do_down
    fi
}

do_up() {
    local t0
    t0=$(now)
    check_deps
    [[ $NODES =~ ^[1-9][0-9]?$ ]] || die "HPCDASK_CLUSTER_NODES must be 1..99, not $NODES"
    if healthy; then
        say "already up ($NODES nodes); nothing to do"
        return 0
    fi
    # Whatever an earlier, partial or different cluster left is removed first.
    do_down 2>/dev/null
    trap on_up_exit EXIT
    trap 'exit 130' INT TERM
    if ss -Hltn "sport = :$PORT" 2>/dev/null | grep -q .; then
        die "port $PORT is in use: stop what listens there or set HPCDASK_CLUSTER_PORT"
    fi
    # The previous run's logs are kept one generation back.
    rm -rf "${STATE:?}/log.prev"
    [ -d "$STATE/log" ] && mv "$STATE/log" "$STATE/log.prev"
    rm -rf "${STATE:?}/run" "$STATE/ctld" "$STATE/spool" "${STATE:?}/jobcomp.txt" "${STATE:?}/etc"
    mkdir -p "$STATE"/{run,log,ctld,spool,etc}
    chmod 0755 "$STATE"
    write_conf
    start_munge
    make_network
    start_slurm
    wait_idle 60
    trap - EXIT INT TERM
    say "up in $(took "$t0")s: $NODES nodes ($(for ((i = 1; i <= NODES; i++)); do printf '%s=%s ' "$(node_name "$i")" "$(node_addr "$i")"; done| sed 's/ $//'))"
    say "use: eval \"\$($0 env)\""
}

# --- env / status / deps -------------------------------------------------------------------------

do_env() {
    local path=":$PATH:"
    path=${path//:$bin:/:}
    path=${path#:}; path=${path%:}
    printf 'export SLURM_CONF=%q\n' "$CONF"
    printf 'export PATH=%q\n' "$bin${path:+:$path}"
    if [ -n "${HPCDASK_IMAGE:-}" ]; then
        printf 'export HPCDASK_IMAGE=%q\n' "$HPCDASK_IMAGE"
    fi
}

do_status() {
    local ok=0 i f comm p
    for f in munged slurmctld; do
        if p=$(pid_of "$STATE/run/$f.pid" "$f"); then echo "$f: running (pid $p)"; else echo "$f: not running"; ok=1; fi
    done
    for ((i = 1; i <= $(cat "$STATE/nodes" 2>/dev/null || echo 0); i++)); do
        f=$(node_name "$i")
        if p=$(pid_of "$STATE/run/slurmd-$f.pid" slurmd); then
            echo "slurmd $f: running (pid $p, namespace $(node_ns "$i"), ib0 $(node_addr "$i"))"
        else
            echo "slurmd $f: not running"; ok=1
        fi
    done
    if [ $ok -eq 0 ]; then
        timeout 10 sinfo -N -l 2>/dev/null || { echo "sinfo: no answer"; ok=1; }
    fi
    if [ $ok -eq 0 ] && healthy; then echo "status: up ($STATE)"; else echo "status: down or unhealthy"; return 1; fi
}

do_deps() {
    [ "$(id -u)" -eq 0 ] || die "needs root"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        slurm-wlm munge iproute2 util-linux procps
}

cmd=${1:-}
case "$cmd" in
    up|down)
        mkdir -p "$(dirname "$LOCK")"
        exec 9>"$LOCK"
        flock -w 120 9 || die "another cluster.sh holds $LOCK"
        "do_$cmd"
        ;;
    env|status|deps) "do_$cmd" ;;
    *) echo "usage: $0 up|down|env|status|deps" >&2; exit 2 ;;
esac
