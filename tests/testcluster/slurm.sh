# The test cluster's batch system: Slurm (sourced by cluster.sh when BATCH=slurm, the default).
#
# munged (a fresh key per cluster) and slurmctld on the host, one slurmd per node inside that
# node's namespaces; the config is rendered from slurm/ (slurm.conf.in, prolog/epilog, TaskProlog)
# into $STATE/etc. There is no slurmdbd. cluster.sh calls:
#   batch_up                   config, daemons, and wait until every node is idle (holders are up)
#   batch_alive N              the daemons run (N nodes)      batch_configured   a config exists
#   batch_nodes_ready          how many nodes take jobs       batch_user_env     KEY=VALUE for users
#   batch_env_exports          `export` lines for `cluster.sh env`
#   batch_stop_jobs USER...    cancel their jobs              batch_stop_node_daemons, batch_stop_daemons
#   batch_status, batch_overview   status lines; BATCH_COMMANDS, BATCH_PACKAGES   what it needs

CONF=$STATE/etc/slurm.conf
MUNGE_SOCKET=$STATE/munge/munge.socket
BATCH_COMMANDS=(slurmctld slurmd sinfo srun sbatch scontrol munged munge unmunge)
BATCH_PACKAGES=(slurm-wlm munge)
BATCH_HOST_PORT=$PORT   # slurmctld listens on the host's end of the bridge
# Clients (sinfo, scontrol, ...) read the generated config.
export SLURM_CONF=$CONF

batch_configured() { [ -s "$CONF" ]; }

batch_user_env() { echo "SLURM_CONF=$CONF"; }

batch_env_exports() { printf 'export SLURM_CONF=%q\n' "$CONF"; }

batch_alive() {
    local n=$1 i
    pid_of "$STATE/run/munged.pid" munged >/dev/null || return 1
    pid_of "$STATE/run/slurmctld.pid" slurmctld >/dev/null || return 1
    for ((i = 1; i <= n; i++)); do
        pid_of "$STATE/run/slurmd-$(node_name "$i").pid" slurmd >/dev/null || return 1
    done
}

# Number of nodes sinfo reports as usable (idle, or running jobs).
batch_nodes_ready() {
    { timeout 10 sinfo -h -N -o '%N %T' 2>/dev/null || true; } \
        | awk '$2 ~ /^(idle|mixed|allocated|completing)$/' | sort -u | wc -l
}

batch_stop_jobs() {
    local u
    if [ -s "$CONF" ] && pid_of "$STATE/run/slurmctld.pid" slurmctld >/dev/null; then
        for u in "$@"; do
            timeout 10 scancel --quiet --full --user="$u" 2>/dev/null || true
        done
    fi
}

batch_stop_node_daemons() {
    local pids=() p
    for p in "$STATE"/run/slurmd-*.pid; do
        [ -e "$p" ] && p=$(pid_of "$p" slurmd) && pids+=("$p")
    done
    stop_pids 5 "${pids[@]}"
}

batch_stop_daemons() {
    local pids=() p
    p=$(pid_of "$STATE/run/slurmctld.pid" slurmctld) && pids+=("$p")
    p=$(pid_of "$STATE/run/munged.pid" munged) && pids+=("$p")
    stop_pids 10 "${pids[@]}"
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
}

# The machines' /etc/hosts (cluster.sh): Open OnDemand's apps listen on $(hostname).
batch_before_machines() { write_machine_hosts; }

batch_up() {
    write_conf
    start_munge
    start_slurm
    wait_idle 60
}

batch_status() {
    local ok=0 i f p
    for f in munged slurmctld; do
        if p=$(pid_of "$STATE/run/$f.pid" "$f"); then echo "$f: running (pid $p)"; else echo "$f: not running"; ok=1; fi
    done
    for ((i = 1; i <= $(cat "$STATE/nodes.count" 2>/dev/null || echo 0); i++)); do
        f=$(node_name "$i")
        if p=$(pid_of "$STATE/run/slurmd-$f.pid" slurmd); then
            echo "slurmd $f: running (pid $p, namespace $(node_ns "$i"), ib0 $(node_addr "$i"), eth0 $(node_eth "$i"))"
        else
            echo "slurmd $f: not running"; ok=1
        fi
    done
    return $ok
}

batch_overview() { timeout 10 sinfo -N -l 2>/dev/null || { echo "sinfo: no answer"; return 1; }; }

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

# Render tests/testcluster/slurm/* into $STATE/etc (slurmd reads them inside the nodes' namespaces).
write_conf() {
    local i nodes="" f
    for ((i = 1; i <= NODES; i++)); do
        nodes+="NodeName=$(node_name "$i") NodeAddr=$(node_eth "$i") CPUs=$CPUS RealMemory=$MEMORY State=UNKNOWN"$'\n'
    done
    mkdir -p "$STATE/etc"
    for f in "$here"/slurm/*; do
        # slurmctld refuses to start unless SlurmctldHost names this host.
        awk -v name="$(hostname -s)" -v addr="$HOST_ETH" -v port="$PORT" -v state="$STATE" \
            -v src="$SRC" -v local="$LOCAL" -v nodes="$nodes" '
            { gsub(/@CTLD_NAME@/, name); gsub(/@CTLD_ADDR@/, addr); gsub(/@CTLD_PORT@/, port)
              gsub(/@STATE@/, state); gsub(/@SRC@/, src); gsub(/@LOCAL@/, local)
              if ($0 == "@NODES@") { printf "%s", nodes; next } print }' \
            "$f" >"$STATE/etc/$(basename "${f%.in}")"
    done
    chmod 0755 "$STATE"/etc/*.sh
}

# The daemons' environment.
daemon_env() {
    env -i PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
        SLURM_CONF="$CONF" HOME=/root LANG=C.UTF-8 "$@"
}

# slurmctld on the host, one slurmd in each node's namespaces (their holders are up).
start_slurm() {
    local i node
    # -c: start from a clean state (no jobs, no node states from an earlier cluster).
    daemon_env setsid slurmctld -c -f "$CONF" 9>&- </dev/null >>"$STATE/log/slurmctld.out" 2>&1 \
        || { tail -n 30 "$STATE/log/slurmctld.out" "$STATE/log/slurmctld.log" >&2 || true; die "slurmctld failed"; }
    wait_ctld 20
    for ((i = 1; i <= NODES; i++)); do
        node=$(node_name "$i")
        mkdir -p "$STATE/spool/$node"
        # slurmd enters the node's namespaces (nsenter, not `ip netns exec`, which remounts /sys).
        daemon_env setsid nsenter -t "$(holder_pid "$node")" --net --uts --mount --wd=/ \
            slurmd -f "$CONF" -N "$node" 9>&- </dev/null >>"$STATE/log/slurmd-$node.out" 2>&1 \
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
        ready=$(batch_nodes_ready)
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
