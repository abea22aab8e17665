#!/usr/bin/env bash
# A batch cluster on this one machine, as strict as a real HPC site, for the integration tests.
# This file is the machines (namespaces, users, node-local folders) and the verbs; the batch
# system is the part that varies: BATCH=slurm (default) sources slurm.sh beside it, BATCH=sge
# sge.sh (Grid Engine; its clusters are named hpcs*, so both can run at once).
#
#   tests/testcluster/cluster.sh up       users, munged, slurmctld, a login node and N compute nodes (idempotent)
#   tests/testcluster/cluster.sh down     stop everything; remove every namespace, link, mount and user process
#   tests/testcluster/cluster.sh env      the exports a user needs (eval "$(... env)"), HPCDASK_IMAGE included
#   tests/testcluster/cluster.sh login [-u USER] [CMD...]
#                                     CMD (default: a shell) on the login node as USER (default hpcuser)
#   tests/testcluster/cluster.sh node NAME [-u USER] CMD...   CMD on compute node NAME (default user: root)
#   tests/testcluster/cluster.sh userenv [USER]  the environment USER's login shell gets (KEY=VALUE lines)
#   tests/testcluster/cluster.sh status   daemons and nodes; exit 0 only when healthy
#   tests/testcluster/cluster.sh deps     apt-get install what this script needs
#
# What makes it strict (each node is a separate machine in the ways that matter):
#   users     root runs only munged, slurmctld and slurmd. Jobs are submitted by, and run as, the
#             ordinary user hpcuser (uid >= 1000, home /home/hpcuser: the shared filesystem);
#             otheruser exists for isolation tests. `up` creates both (they are kept by `down`).
#   nodes     nodeI: its own network (ib0 = the fast fabric, eth0 = the management/ethernet
#             network), hostname (UTS namespace) and /tmp, /var/tmp (mount namespace: folders under
#             $STATE/nodes/nodeI/ bound there). Only /home and the rest of the host's filesystem are
#             shared; the checkout is shown read-only at $STATE/src (bind-checkout.sh: hpcuser
#             cannot reach the original, which may be a 0700 folder in root's /tmp).
#   devices   each machine gets a /dev/fuse every user may open (a node of its own bound over
#             the host's 0600 one), so the runner mounts .sif files with squashfuse as users do.
#   login     a `login` namespace with eth0 only (no ib0), its own hostname and /tmp: where users
#             run sbatch, clients and dask-jobqueue.
#   $TMPDIR   a Prolog makes $STATE/local/job-<id> (0700, the job's user) on every node of a job,
#             node-local (the node's own folder is bound there), the TaskProlog exports it as TMPDIR;
#             the Epilog records anything left in it ($STATE/leftovers/) and removes it.
#   memory    memory is a consumable resource (CR_Core_Memory, DefMemPerCPU) and enforced by
#             jobacct_gather/linux with OverMemoryKill, sampled every second: a step over its
#             allocation is killed. (No task/cgroup: that would create cgroups outside our own.)
# A real site still differs in: a real Apptainer (setuid or user-namespace) instead of the
# bubblewrap runner, cgroup enforcement instead of polling, Lustre/GPFS semantics, separate kernels.
#
# Several clusters may run at once (for parallel work): HPCDASK_CLUSTER_INSTANCE=N (0-9) changes
# every name, subnet, port and the state folder. Generated config, keys, logs and spools live in
# $STATE, never in the repository.
#
# Settings (environment):
#   HPCDASK_CLUSTER_INSTANCE  0-9 (default 0): names hpcd-* (hpcdN-* for N > 0)
#   HPCDASK_CLUSTER_NODES     number of compute nodes (default 3; NODES is read too)
#   HPCDASK_CLUSTER_STATE     state directory (default /var/lib/hpcdask-test/<name>)
#   HPCDASK_CLUSTER_SUBNET    first three octets of the ib0 /24 (default 10.253.71+2N)
#   HPCDASK_CLUSTER_ETH_SUBNET  ... of the eth0 /24 (default 10.253.72+2N)
#   HPCDASK_CLUSTER_CPUS      CPUs per node (default 2)      HPCDASK_CLUSTER_MEMORY  MiB per node (default 4000)
#   HPCDASK_CLUSTER_PORT      slurmctld port (default 6817+10N)
#   HPCDASK_IMAGE             the image for `env` (default: the test image as a SIF, dask-<key>.sif,
#                             built by `up` when missing: containers/imagebuild/sif.py)
#   BATCH                     the batch system: slurm (slurm.sh: munged, slurmctld, slurmd) or
#                             sge (sge.sh: sge_qmaster, sge_execd); HPCDASK_CLUSTER_BATCH too
# Needs root, iproute2, util-linux (nsenter, unshare, setpriv, flock) and the batch system's
# packages (slurm.sh: slurm-wlm and munge).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)

INSTANCE=${HPCDASK_CLUSTER_INSTANCE:-0}
[[ $INSTANCE =~ ^[0-9]$ ]] || { echo "cluster.sh: HPCDASK_CLUSTER_INSTANCE must be 0-9, not $INSTANCE" >&2; exit 2; }
BATCH=${HPCDASK_CLUSTER_BATCH:-${BATCH:-slurm}}
case "$BATCH" in
    slurm | sge) ;;
    *) echo "cluster.sh: BATCH must be slurm or sge, not $BATCH" >&2; exit 2 ;;
esac
# A Grid Engine cluster has names and subnets of its own (hpcs*, 10.253.171+), so it runs beside
# the same instance's Slurm cluster (one test session uses both).
if [ "$BATCH" = sge ]; then NAME=hpcs; NET0=171; else NAME=hpcd; NET0=71; fi
[ "$INSTANCE" = 0 ] || NAME=$NAME$INSTANCE
STATE=${HPCDASK_CLUSTER_STATE:-/var/lib/hpcdask-test/$NAME}
NODES=${HPCDASK_CLUSTER_NODES:-${NODES:-3}}
SUBNET=${HPCDASK_CLUSTER_SUBNET:-10.253.$((NET0 + 2 * INSTANCE))}
ETH_SUBNET=${HPCDASK_CLUSTER_ETH_SUBNET:-10.253.$((NET0 + 1 + 2 * INSTANCE))}
CPUS=${HPCDASK_CLUSTER_CPUS:-2}
MEMORY=${HPCDASK_CLUSTER_MEMORY:-4000}
PORT=${HPCDASK_CLUSTER_PORT:-$((6817 + 10 * INSTANCE))}
[[ $STATE == /?* && $STATE != *..* ]] || { echo "cluster.sh: HPCDASK_CLUSTER_STATE must be an absolute path" >&2; exit 2; }
PREFIX=$NAME-   # every namespace and link this script makes starts with it
IB_BRIDGE=${PREFIX}ib
ETH_BRIDGE=${PREFIX}eth
HOST_IB=$SUBNET.1
HOST_ETH=$ETH_SUBNET.1
LOGIN_ETH=$ETH_SUBNET.2
LOCK=/run/lock/hpcdask-cluster-$NAME.lock
USERS=(hpcuser otheruser)
USER_PATH=/usr/local/bin:/usr/bin:/bin
SRC=$STATE/src       # the checkout, read-only, as every node and the login node see it
LOCAL=$STATE/local   # each node's node-local scratch is bound here ($TMPDIR of jobs lives below)

say() { echo "cluster.sh: $*" >&2; }
die() { say "$*"; exit 1; }
now() { date +%s.%N; }
took() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

node_name() { echo "node$1"; }
node_ns() { echo "${PREFIX}node$1"; }
node_addr() { echo "$SUBNET.$((10 + $1))"; }
node_eth() { echo "$ETH_SUBNET.$((10 + $1))"; }
login_ns() { echo "${PREFIX}login"; }

# The batch system: its daemons, config and commands (batch_* functions, BATCH_* settings).
# shellcheck source=slurm.sh
. "$here/$BATCH.sh"

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

# All processes inside our namespaces: holders, slurmd, slurmstepd, jobs, users' login processes.
ns_pids() {
    local ns
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^${PREFIX}" || true); do
        ip netns pids "$ns" 2>/dev/null || true
    done
}

# --- namespaces of a "machine" -------------------------------------------------------------------

# The holder of a machine's UTS + mount namespaces (inside its network namespace): a sleeping
# process whose namespaces every daemon and user command of that machine enters.
holder_pid() { pid_of "$STATE/run/holder-$1.pid" sleep; }

# The hosts file every machine binds as its /etc/hosts (start_holder), as a site's DNS names
# them: localhost, the LINES given (a batch system's own names), the login node, and each node
# by name (its eth0 address) and NAME-ib (its ib0 one).
write_machine_hosts() {
    local i
    {
        echo "127.0.0.1 localhost"
        [ $# -eq 0 ] || printf '%s\n' "$@"
        echo "$LOGIN_ETH login"
        for ((i = 1; i <= NODES; i++)); do
            echo "$(node_eth "$i") $(node_name "$i")"
            echo "$(node_addr "$i") $(node_name "$i")-ib"
        done
    } >"$STATE/etc/hosts"
    chmod 0644 "$STATE/etc/hosts"
}

# Start the holder of MACHINE (node1.., login) in network namespace NS, with hostname HOSTNAME
# (default: MACHINE). When $STATE/etc/hosts exists (write_machine_hosts), it is the machine's /etc/hosts.
start_holder() {
    local machine=$1 ns=$2 dir=$STATE/nodes/$1 hostname=${3:-$1}
    mkdir -p "$dir/tmp" "$dir/var-tmp" "$dir/local"
    chmod 1777 "$dir/tmp" "$dir/var-tmp"
    chmod 0755 "$dir/local"
    rm -f "$STATE/run/holder-$machine.ready"
    # unshare --mount makes every mount private: these binds are this machine's alone.
    setsid nsenter --net="/run/netns/$ns" unshare --uts --mount --propagation private -- \
        /bin/sh -c '
            set -e
            hostname "$1"
            # The checkout first: it may sit under /tmp, which the next binds cover.
            sh "$4/tests/testcluster/bind-checkout.sh" "$4" "$5"
            mount --bind "$2/tmp" /tmp
            mount --bind "$2/var-tmp" /var/tmp
            mount --bind "$2/local" "$3"
            [ ! -e "$7" ] || mount --bind "$7" /etc/hosts
            # /dev/fuse usable by every user, as on a normal host (here it is 0600): a device
            # node of our own bound over it, in this machine only.
            mknod -m 0666 "$2/fuse" c 10 229
            mount --bind "$2/fuse" /dev/fuse
            echo $$ >"$6.pid"
            touch "$6.ready"
            exec sleep infinity' sh "$hostname" "$dir" "$LOCAL" "$repo" "$SRC" "$STATE/run/holder-$machine" \
        "$STATE/etc/hosts" \
        9>&- </dev/null >>"$STATE/log/holder-$machine.out" 2>&1 &
    local i
    for ((i = 0; i < 100; i++)); do
        [ -e "$STATE/run/holder-$machine.ready" ] && holder_pid "$machine" >/dev/null && return 0
        sleep 0.05
    done
    cat "$STATE/log/holder-$machine.out" >&2 2>/dev/null || true
    die "the namespaces of $machine did not come up"
}

# Run CMD... in MACHINE's namespaces (network, hostname, mounts), as root.
in_machine() {
    local machine=$1 pid
    shift
    pid=$(holder_pid "$machine") || die "$machine is not up (run: $0 up)"
    nsenter -t "$pid" --net --uts --mount --wd=/ -- "$@"
}

# The environment a user's login shell gets on the cluster (no root or test-runner leftovers).
user_env() {
    local user=$1 home
    home=$(getent passwd "$user" | cut -d: -f6)
    printf '%s\n' "HOME=$home" "USER=$user" "LOGNAME=$user" "SHELL=/bin/bash" "LANG=C.UTF-8" \
        "PATH=$SRC/tests/testcluster/bin:$USER_PATH" "HPCDASK_IMAGE=$(image_path)" \
        "HPCDASK_SRC=$SRC" $(batch_user_env)
}

# Run CMD... as USER in MACHINE, from USER's home, with user_env plus KEY=VALUE words given
# before CMD in EXTRA (an array name).
as_user() {
    local machine=$1 user=$2
    shift 2
    id "$user" >/dev/null 2>&1 || die "no user $user (run: $0 up)"
    local envs=()
    mapfile -t envs < <(user_env "$user")
    [ $# -gt 0 ] || set -- bash -l
    in_machine "$machine" setpriv --reuid="$user" --regid="$user" --init-groups --reset-env -- \
        env -i "${envs[@]}" bash -c 'cd && exec "$@"' sh "$@"
}

# --- health --------------------------------------------------------------------------------------

daemons_alive() {
    holder_pid login >/dev/null || return 1
    local n i
    n=$(cat "$STATE/nodes.count" 2>/dev/null) || return 1
    for ((i = 1; i <= n; i++)); do
        holder_pid "$(node_name "$i")" >/dev/null || return 1
    done
    batch_alive "$n"
}

healthy() {
    # ... and made from this checkout, not from another clone on the machine.
    batch_configured && [ "$(cat "$STATE/repo" 2>/dev/null)" = "$repo" ] \
        && daemons_alive && [ "$(batch_nodes_ready)" -eq "$(cat "$STATE/nodes.count")" ] \
        && [ "$(cat "$STATE/nodes.count")" -eq "$NODES" ]
}

# --- down ----------------------------------------------------------------------------------------

do_down() {
    local t0 pids p ns link
    t0=$(now)
    # Jobs first, so their steps and tasks end cleanly; then whatever lives in our namespaces.
    batch_stop_jobs root "${USERS[@]}"
    batch_stop_node_daemons
    mapfile -t pids < <(ns_pids)
    stop_pids 5 "${pids[@]}"
    batch_stop_daemons

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
    # Node-local folders die with the nodes (jobs' $TMPDIR included).
    rm -rf "${STATE:?}/nodes"
    rm -f "$STATE"/run/*.pid "$STATE"/run/*.ready
    say "down in $(took "$t0")s (logs kept in $STATE/log)"
}

# --- up ------------------------------------------------------------------------------------------

check_deps() {
    local missing=()
    for c in "${BATCH_COMMANDS[@]}" ip nsenter unshare setpriv flock setsid ss useradd; do
        command -v "$c" >/dev/null || missing+=("$c")
    done
    [ ${#missing[@]} -eq 0 ] || die "missing: ${missing[*]} (run: $0 deps)"
    [ "$(id -u)" -eq 0 ] || die "needs root (network namespaces, slurmd, users)"
}

# The ordinary users; homes on the shared filesystem, private to each.
make_users() {
    local u
    for u in "${USERS[@]}"; do
        if ! id "$u" >/dev/null 2>&1; then
            useradd --create-home --home-dir "/home/$u" --shell /bin/bash --user-group "$u"
        fi
        chmod 0700 "/home/$u"
        [ "$(id -u "$u")" -ge 1000 ] || die "user $u has uid $(id -u "$u") < 1000"
        # A login shell (make cluster-login) resets PATH from /etc/profile: the user's profile
        # puts the apptainer runner back in front, as a site's `module load apptainer` would.
        if ! grep -qs 'hpcdask test cluster (testcluster)' "/home/$u/.profile"; then
            cat >>"/home/$u/.profile" <<'PROFILE'
# hpcdask test cluster (testcluster): its apptainer first on PATH, like `module load apptainer`
b=${HPCDASK_SRC:-/nonexistent}/tests/testcluster/bin; case ":$PATH:" in *":$b:"*) ;; *) [ ! -d "$b" ] || PATH="$b:$PATH" ;; esac; unset b
PROFILE
            chown "$u:" "/home/$u/.profile"
        fi
    done
}

# veth LINK (host end, on BRIDGE) whose peer becomes IFNAME with ADDR in namespace NS.
add_port() {
    local ns=$1 bridge=$2 link=$3 ifname=$4 addr=$5
    ip link add "$link" type veth peer name "${link}p"
    ip link set "${link}p" netns "$ns"
    ip -n "$ns" link set "${link}p" name "$ifname"
    ip -n "$ns" addr add "$addr/24" dev "$ifname"
    ip -n "$ns" link set "$ifname" up
    ip link set "$link" master "$bridge"
    ip link set "$link" up
}

make_network() {
    local i ns b
    mountpoint -q /run/netns 2>/dev/null || touch "$STATE/netns-mounted-by-us"
    for b in "$IB_BRIDGE:$HOST_IB" "$ETH_BRIDGE:$HOST_ETH"; do
        ip link add "${b%%:*}" type bridge
        ip addr add "${b#*:}/24" dev "${b%%:*}"
        ip link set "${b%%:*}" up
    done
    for ((i = 1; i <= NODES; i++)); do
        ns=$(node_ns "$i")
        ip netns add "$ns"
        ip -n "$ns" link set lo up
        add_port "$ns" "$IB_BRIDGE" "${PREFIX}i$i" ib0 "$(node_addr "$i")"
        add_port "$ns" "$ETH_BRIDGE" "${PREFIX}e$i" eth0 "$(node_eth "$i")"
    done
    ns=$(login_ns)
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    add_port "$ns" "$ETH_BRIDGE" "${PREFIX}el" eth0 "$LOGIN_ETH"
}

# The image users get in `env`: HPCDASK_IMAGE if set, else the test image (built when missing).
image_path() {
    if [ -n "${HPCDASK_IMAGE:-}" ]; then
        echo "$HPCDASK_IMAGE"
    elif [ -s "$STATE/image" ]; then
        cat "$STATE/image"
    fi
}

build_image() {
    if [ -n "${HPCDASK_IMAGE:-}" ]; then
        echo "$HPCDASK_IMAGE" >"$STATE/image"
        return 0
    fi
    local img
    img=$(cd "$repo" && PYTHONPATH="$repo/containers" python3 -m imagebuild.sif build | tail -n 1) \
        || die "building the test image failed (PYTHONPATH=containers python3 -m imagebuild.sif build)"
    [ -f "$img" ] || die "python3 -m imagebuild.sif printed no image"
    echo "$img" >"$STATE/image"
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
    local t0 i
    t0=$(now)
    check_deps
    [[ $NODES =~ ^[1-9][0-9]?$ ]] || die "HPCDASK_CLUSTER_NODES must be 1..99, not $NODES"
    mkdir -p "$STATE"
    [ "${HPCDASK_CLUSTER_NO_IMAGE:-0}" = 1 ] || build_image
    if healthy; then
        say "already up ($NODES nodes); nothing to do"
        return 0
    fi
    # Whatever an earlier, partial or different cluster left is removed first.
    do_down 2>/dev/null
    trap on_up_exit EXIT
    trap 'exit 130' INT TERM
    if [ -n "$BATCH_HOST_PORT" ] && ss -Hltn "sport = :$BATCH_HOST_PORT" 2>/dev/null | grep -q .; then
        die "port $BATCH_HOST_PORT is in use: stop what listens there or set HPCDASK_CLUSTER_PORT"
    fi
    # The previous run's logs are kept one generation back.
    rm -rf "${STATE:?}/log.prev"
    [ -d "$STATE/log" ] && mv "$STATE/log" "$STATE/log.prev"
    rm -rf "${STATE:?}/run" "$STATE/ctld" "$STATE/spool" "${STATE:?}/jobcomp.txt" "${STATE:?}/etc" \
        "${STATE:?}/leftovers"
    mkdir -p "$STATE"/{run,log,ctld,spool,etc,nodes,src,local,leftovers}
    chmod 0755 "$STATE" "$STATE/src" "$STATE/local"
    chmod 0700 "$STATE/leftovers"
    make_users
    echo "$NODES" >"$STATE/nodes.count"
    echo "$repo" >"$STATE/repo"
    make_network
    # A batch system may need more before the machines start (Grid Engine: names, its master).
    ! declare -F batch_before_machines >/dev/null || batch_before_machines
    for ((i = 1; i <= NODES; i++)); do start_holder "$(node_name "$i")" "$(node_ns "$i")"; done
    start_holder login "$(login_ns)"
    batch_up
    trap - EXIT INT TERM
    say "$BATCH up in $(took "$t0")s: $NODES nodes ($(for ((i = 1; i <= NODES; i++)); do printf '%s=%s ' "$(node_name "$i")" "$(node_addr "$i")"; done| sed 's/ $//')), login=$LOGIN_ETH"
    say "use: $0 login   (a shell on the login node as hpcuser), or eval \"\$($0 env)\""
}

# --- env / login / node / status / deps ----------------------------------------------------------

do_env() {
    local line bin=$SRC/tests/testcluster/bin path=":$PATH:"
    # On the login node (or a node) the checkout is at $SRC; on the host, where it is.
    [ -d "$bin" ] || bin=$here/bin
    path=${path//:$bin:/:}
    path=${path#:}; path=${path%:}
    printf 'export PATH=%q\n' "$bin${path:+:$path}"
    batch_env_exports
    line=$(image_path)
    [ -z "$line" ] || printf 'export HPCDASK_IMAGE=%q\n' "$line"
    printf 'export HPCDASK_CLUSTER_LOGIN=%q\n' "$(login_ns)"
    printf 'export HPCDASK_CLUSTER_STATE=%q\n' "$STATE"
}

do_login() {
    local user=hpcuser
    if [ "${1:-}" = -u ]; then user=$2; shift 2; fi
    as_user login "$user" "$@"
}

do_node() {
    [ $# -ge 2 ] || { echo "usage: $0 node NAME [-u USER] CMD..." >&2; exit 2; }
    local node=$1 user=''
    shift
    if [ "$1" = -u ]; then user=$2; shift 2; fi
    if [ -n "$user" ]; then as_user "$node" "$user" "$@"; else in_machine "$node" "$@"; fi
}

do_status() {
    local ok=0 i f p
    batch_status || ok=1
    if p=$(holder_pid login); then echo "login: up (namespace $(login_ns), eth0 $LOGIN_ETH)"; else echo "login: down"; ok=1; fi
    if [ $ok -eq 0 ]; then
        batch_overview || ok=1
    fi
    if [ $ok -eq 0 ] && healthy; then echo "status: up ($STATE)"; else echo "status: down or unhealthy"; return 1; fi
}

do_deps() {
    [ "$(id -u)" -eq 0 ] || die "needs root"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        "${BATCH_PACKAGES[@]}" iproute2 util-linux procps passwd
}

cmd=${1:-}
[ $# -eq 0 ] || shift
case "$cmd" in
    up|down)
        mkdir -p "$(dirname "$LOCK")"
        exec 9>"$LOCK"
        flock -w 300 9 || die "another cluster.sh holds $LOCK"
        "do_$cmd"
        ;;
    env|status|deps|login|node) "do_$cmd" "$@" ;;
    userenv) user_env "${1:-hpcuser}" ;;
    *) echo "usage: $0 up|down|env|status|login [-u USER] [CMD...]|node NAME [-u USER] CMD...|deps" >&2; exit 2 ;;
esac
