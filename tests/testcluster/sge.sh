# The test cluster's batch system: Grid Engine (sourced by cluster.sh when BATCH=sge), beside
# slurm.sh with the same batch_* functions; cluster.sh owns the core (namespaces, users, image,
# mounts). Debian bookworm's Grid Engine 8.1.9
# (gridengine-master, -exec, -client), set up by hand the way /usr/share/gridengine/scripts/
# init_cluster does (spoolinit + spooldefaults), then configured with qconf:
#   master    sge_qmaster in a machine of its own ("master": eth0 only, hostname $NAME-master), so
#             several instances' clusters never share a port or a name; it runs as root and works
#             as the admin user sgeadmin (the package's), spooling classic files under $STATE/sge.
#   names     every machine of the cluster binds one hosts file ($STATE/etc/hosts) over /etc/hosts:
#             node1.. (eth0 addresses; nodeI-ib the ib0 ones), login, $NAME-master, and the
#             host by its hostname (and $NAME-host) at its end of the bridge (a submit host, like login). The host's
#             own /etc/hosts gets one line naming the master, marked, removed again by `down`.
#   nodes     one sge_execd per node namespace; queue all.q on @allhosts with CPUS slots per node,
#             h_rt (HPCDASK_CLUSTER_SGE_H_RT, default 4:00:00) as its limit.
#   memory    h_vmem is a consumable (MEMORY per host, default MEMORY/CPUS per job) and Grid Engine
#             enforces it as every site does: the job's address-space limit (setrlimit).
#   $TMPDIR   Grid Engine's own: sge_execd makes <tmpdir>/<job>.<task>.all.q, owned by the job's
#             user, in the node's own /tmp (Grid Engine's default tmpdir), and removes it when the job ends; the queue's
#             epilog first records anything left there in $STATE/leftovers/.
#   users     min_uid 1000: jobs run as hpcuser/otheruser, never root. The cell-wide sge_request
#             puts the apptainer runner (tests/testcluster/bin) first on every job's PATH, as a
#             site's default request file or module would.
# Shell functions only; the variables (STATE, NAME, PREFIX, NODES, ...) are cluster.sh's.

BATCH_COMMANDS=(/usr/sbin/sge_qmaster /usr/sbin/sge_execd qsub qconf qstat qdel qhost qacct)
BATCH_PACKAGES=(gridengine-master gridengine-exec gridengine-client)
BATCH_HOST_PORT=   # sge_qmaster listens in the master's own namespace: no host port to check

SGE_ROOT_DIR=$STATE/sge/root      # SGE_ROOT: links to the package's bin/lib/utilbin/util + the cell
SGE_CELL_NAME=hpcdask
SGE_SPOOL=$STATE/sge/spool
SGE_MASTER_HOST=${NAME}-master
SGE_MASTER_ETH=$ETH_SUBNET.3
SGE_H_RT=${HPCDASK_CLUSTER_SGE_H_RT:-4:00:00}
SGE_HOSTS_MARK="# hpcdask test cluster $NAME (tests/testcluster/sge.sh)"

sge_env_words() {
    printf '%s\n' "SGE_ROOT=$SGE_ROOT_DIR" "SGE_CELL=$SGE_CELL_NAME" "SGE_QMASTER_PORT=6444" \
        "SGE_EXECD_PORT=6445"
}

# Run a Grid Engine command as root on the master (the qmaster host is an admin host).
sge_admin() {
    local envs=()
    mapfile -t envs < <(sge_env_words)
    in_machine master env "${envs[@]}" "$@"
}

sge_qmaster_pid() { pid_of "$SGE_SPOOL/qmaster/qmaster.pid" sge_qmaster; }
sge_execd_pid() { pid_of "$SGE_SPOOL/execd/$1/execd.pid" sge_execd; }

# The hosts file every machine of the cluster sees as /etc/hosts, with Grid Engine's names: the
# host by its own name too (a client tells the master its hostname, which must resolve), and
# the master.
sge_write_hosts() {
    write_machine_hosts "$HOST_ETH $(hostname) ${NAME}-host" "$HOST_IB ${NAME}-host-ib" \
        "$SGE_MASTER_ETH $SGE_MASTER_HOST"
}

# The host's /etc/hosts names the master (clients on the host reach it over the bridge). Written
# in place: /etc/hosts is often a bind mount that cannot be renamed over.
sge_host_hosts_add() {
    sge_host_hosts_remove
    printf '%s %s %s\n' "$SGE_MASTER_ETH" "$SGE_MASTER_HOST" "$SGE_HOSTS_MARK" >>/etc/hosts
}

sge_host_hosts_remove() {
    grep -qF "$SGE_HOSTS_MARK" /etc/hosts 2>/dev/null || return 0
    local kept
    kept=$(grep -vF "$SGE_HOSTS_MARK" /etc/hosts)
    printf '%s\n' "$kept" >/etc/hosts
}

# Before the machines start: their hosts file (each binds it) and the master's network namespace.
batch_before_machines() {
    sge_write_hosts
    local ns=${PREFIX}master
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    add_port "$ns" "$ETH_BRIDGE" "${PREFIX}em" eth0 "$SGE_MASTER_ETH"
}

batch_configured() { [ -s "$SGE_ROOT_DIR/$SGE_CELL_NAME/common/bootstrap" ]; }

batch_user_env() { sge_env_words; }

batch_env_exports() {
    local w
    while read -r w; do printf 'export %s=%q\n' "${w%%=*}" "${w#*=}"; done < <(sge_env_words)
}

batch_up() {
    sge_write_conf
    sge_start
    sge_wait_idle 60
}

batch_alive() { sge_alive "$1"; }

batch_nodes_ready() { sge_nodes_ready; }

batch_stop_jobs() {
    local p
    if sge_qmaster_pid >/dev/null && holder_pid master >/dev/null; then
        sge_admin timeout 10 qdel -f -u '*' >/dev/null 2>&1 || true
        for ((p = 0; p < 20; p++)); do
            [ -z "$(sge_admin timeout 5 qstat -u '*' 2>/dev/null)" ] && break
            sleep 0.5
        done
    fi
}

batch_stop_node_daemons() {
    local pids=() p f
    for f in "$SGE_SPOOL"/execd/*/execd.pid; do
        [ -e "$f" ] && p=$(pid_of "$f" sge_execd) && pids+=("$p")
    done
    stop_pids 10 "${pids[@]}"
}

batch_stop_daemons() {
    local pids=() p
    p=$(sge_qmaster_pid) && pids+=("$p")
    stop_pids 10 "${pids[@]}"
    sge_host_hosts_remove
}

batch_overview() { sge_admin timeout 10 qhost 2>/dev/null || { echo "qhost: no answer"; return 1; }; }

# SGE_ROOT, the cell and the spool, as init_cluster makes them (as the admin user).
sge_write_conf() {
    local root=$SGE_ROOT_DIR cell=$SGE_ROOT_DIR/$SGE_CELL_NAME d init=$STATE/sge/init
    rm -rf "${STATE:?}/sge"
    mkdir -p "$root" "$cell/common" "$SGE_SPOOL"/{qmaster,execd} "$init"
    for d in bin lib utilbin util; do ln -s "/var/lib/gridengine/$d" "$root/$d"; done
    echo "$SGE_MASTER_HOST" >"$cell/common/act_qmaster"
    echo "hpcdask" >"$cell/common/cluster_name"
    cat >"$cell/common/bootstrap" <<EOF
# Version: 8.1.9
admin_user              sgeadmin
default_domain          none
ignore_fqdn             true
spooling_method         classic
spooling_lib            libspoolc
spooling_params         $cell/common;$SGE_SPOOL/qmaster
binary_path             /usr/sbin
qmaster_spool_dir       $SGE_SPOOL/qmaster
security_mode           none
listener_threads        2
worker_threads          2
scheduler_threads       1
EOF
    # Every job's default request: the apptainer runner first on PATH (a site's module/default).
    # Jobs start in a login shell (bash is in login_shells), whose /etc/profile resets PATH: the
    # users' ~/.profile (cluster.sh make_users) puts the runner back when HPCDASK_SRC is set.
    printf '%s\n' "-v PATH=$SRC/tests/testcluster/bin:$USER_PATH,HPCDASK_SRC=$SRC" >"$cell/common/sge_request"
    # The global configuration: the package's defaults with this cluster's spool, quick reports.
    # (Not ENABLE_ADDGRP_KILL: here it kills other jobs' processes as a job ends.)
    sed -e "s|^execd_spool_dir .*|execd_spool_dir        $SGE_SPOOL/execd|" \
        -e "s|^load_report_time .*|load_report_time       00:00:05|" \
        -e "s|^max_unheard .*|max_unheard            00:01:00|" \
        -e "s|^mailer .*|mailer                 /bin/true|" \
        -e "s|^reporting_params .*|reporting_params       accounting=true reporting=false flush_time=00:00:01 joblog=false sharelog=00:00:00 accounting_flush_time=00:00:00|" \
        -e "s|^administrator_mail .*|administrator_mail     none|" \
        /usr/share/gridengine/default-configuration >"$init/configuration"
    # h_vmem: a consumable, as sites make it, so memory is booked per slot and enforced per job.
    cp -r /usr/share/gridengine/util/resources/centry "$init/centry"
    rm -f "$init/centry/README"
    sed -i -e 's/^consumable .*/consumable  YES/' -e "s/^default .*/default     $((MEMORY / CPUS))M/" "$init/centry/h_vmem"
    chown -R sgeadmin: "$STATE/sge"
    chmod -R a+rX "$STATE/sge"
    (
        export SGE_ROOT=$root SGE_CELL=$SGE_CELL_NAME
        cd /
        setpriv --reuid=sgeadmin --regid=sgeadmin --init-groups -- /usr/lib/gridengine/spoolinit classic libspoolc "$cell/common;$SGE_SPOOL/qmaster" init
        for d in "configuration $init/configuration" "complexes $init/centry" \
            "usersets /usr/share/gridengine/util/resources/usersets" "managers sgeadmin root"; do
            # shellcheck disable=SC2086
            setpriv --reuid=sgeadmin --regid=sgeadmin --init-groups -- /usr/lib/gridengine/spooldefaults $d
        done
    ) >>"$STATE/log/sge-init.out" 2>&1 || { cat "$STATE/log/sge-init.out" >&2; die "initialising the Grid Engine spool failed"; }
    sed -e "s|@STATE@|$STATE|g" -e "s|@LOCAL@|$LOCAL|g" "$here/sge/epilog.sh" >"$STATE/etc/sge-epilog.sh"
    chmod 0755 "$STATE/etc/sge-epilog.sh"
}

sge_daemon_env() {
    local envs=()
    mapfile -t envs < <(sge_env_words)
    env -i PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" HOME=/root LANG=C.UTF-8 \
        "${envs[@]}" "$@"
}

# qconf answers on the master.
sge_wait_master() {
    local deadline=$((SECONDS + $1))
    while [ $SECONDS -lt $deadline ]; do
        sge_admin timeout 5 qconf -sh >/dev/null 2>&1 && return 0
        sge_qmaster_pid >/dev/null || [ ! -s "$SGE_SPOOL/qmaster/qmaster.pid" ] || break
        sleep 0.3
    done
    tail -n 20 "$SGE_SPOOL/qmaster/messages" >&2 2>/dev/null || true
    die "sge_qmaster is not answering (see $SGE_SPOOL/qmaster/messages)"
}

# The cluster's hosts, queue, parallel environment and scheduler, through qconf as on a site.
sge_configure() {
    local i node tmp=$STATE/sge/init hosts=""
    for ((i = 1; i <= NODES; i++)); do
        node=$(node_name "$i")
        hosts+="$node "
        printf '%s\n' "hostname $node" "load_scaling NONE" "complex_values h_vmem=${MEMORY}M" \
            "user_lists NONE" "xuser_lists NONE" "projects NONE" "xprojects NONE" \
            "usage_scaling NONE" "report_variables NONE" >"$tmp/host-$node"
        sge_admin qconf -ah "$node" >>"$STATE/log/sge-qconf.out" 2>&1
        # The nodes share one PID namespace: each execd tracks its jobs' processes by an extra
        # group ID from gid_range, so the ranges must differ, or a job's end kills another's.
        printf 'gid_range %s-%s\n' $((20000 + 100 * i)) $((20099 + 100 * i)) >"$tmp/$node"
        sge_admin qconf -Aconf "$tmp/$node" >>"$STATE/log/sge-qconf.out" 2>&1
        sge_admin qconf -Ae "$tmp/host-$node" >>"$STATE/log/sge-qconf.out" 2>&1
    done
    for node in login "$(hostname)" $hosts; do sge_admin qconf -as "$node" >>"$STATE/log/sge-qconf.out" 2>&1; done
    printf '%s\n' "group_name @allhosts" "hostlist ${hosts% }" >"$tmp/allhosts"
    sge_admin qconf -Ahgrp "$tmp/allhosts" >>"$STATE/log/sge-qconf.out" 2>&1
    # The master has a /tmp of its own, where a checkout in /tmp (mktemp -d) is not: what it
    # reads goes through $tmp, like the files made here.
    cp "$here/sge/pe-smp.conf" "$here/sge/sched.conf" "$tmp/"
    sge_admin qconf -Ap "$tmp/pe-smp.conf" >>"$STATE/log/sge-qconf.out" 2>&1
    sed -e "s|@CPUS@|$CPUS|" -e "s|@LOCAL@|$LOCAL|" -e "s|@STATE@|$STATE|" -e "s|@H_RT@|$SGE_H_RT|" \
        "$here/sge/queue.conf.in" >"$tmp/all.q"
    sge_admin qconf -Aq "$tmp/all.q" >>"$STATE/log/sge-qconf.out" 2>&1
    sge_admin qconf -Msconf "$tmp/sched.conf" >>"$STATE/log/sge-qconf.out" 2>&1
}

sge_start() {
    local i node
    sge_host_hosts_add
    start_holder master "${PREFIX}master" "$SGE_MASTER_HOST"
    sge_daemon_env setsid nsenter -t "$(holder_pid master)" --net --uts --mount --wd=/ \
        /usr/sbin/sge_qmaster 9>&- </dev/null >>"$STATE/log/sge_qmaster.out" 2>&1 \
        || { tail -n 30 "$STATE/log/sge_qmaster.out" >&2; die "sge_qmaster failed"; }
    sge_wait_master 30
    sge_configure
    for ((i = 1; i <= NODES; i++)); do
        node=$(node_name "$i")
        mkdir -p "$SGE_SPOOL/execd/$node"
        chown sgeadmin: "$SGE_SPOOL/execd/$node"
        sge_daemon_env setsid nsenter -t "$(holder_pid "$node")" --net --uts --mount --wd=/ \
            /usr/sbin/sge_execd 9>&- </dev/null >>"$STATE/log/sge_execd-$node.out" 2>&1 \
            || { tail -n 30 "$STATE/log/sge_execd-$node.out" >&2; die "sge_execd $node failed"; }
    done
    # sge_execd writes its pid file once it runs as a daemon.
    local deadline=$((SECONDS + 30))
    for ((i = 1; i <= NODES; i++)); do
        until sge_execd_pid "$(node_name "$i")" >/dev/null; do
            [ $SECONDS -lt $deadline ] || die "sge_execd on $(node_name "$i") wrote no pid file (see $SGE_SPOOL/execd/$(node_name "$i")/messages)"
            sleep 0.2
        done
    done
}

# Number of execution hosts reporting load to the master.
sge_nodes_ready() {
    { sge_admin timeout 10 qhost 2>/dev/null || true; } \
        | awk 'NR > 3 && $1 ~ /^node[0-9]+$/ && $4 != "-"' | wc -l
}

sge_wait_idle() {
    local deadline=$((SECONDS + ${1:-60})) ready=0
    while [ $SECONDS -lt $deadline ]; do
        ready=$(sge_nodes_ready)
        [ "$ready" -eq "$NODES" ] && return 0
        sge_alive "$NODES" || break
        sleep 0.5
    done
    sge_admin qhost >&2 2>/dev/null || true
    tail -n 15 "$SGE_SPOOL/qmaster/messages" "$SGE_SPOOL"/execd/*/messages >&2 2>/dev/null || true
    die "$ready of $NODES Grid Engine exec hosts report"
}

sge_alive() {
    sge_qmaster_pid >/dev/null || return 1
    holder_pid master >/dev/null || return 1
    local n=${1:-$NODES} i
    for ((i = 1; i <= n; i++)); do
        sge_execd_pid "$(node_name "$i")" >/dev/null || return 1
    done
}

batch_status() {
    local ok=0 i f p
    if p=$(sge_qmaster_pid); then echo "sge_qmaster: running (pid $p, $SGE_MASTER_HOST $SGE_MASTER_ETH)"; else echo "sge_qmaster: not running"; ok=1; fi
    for ((i = 1; i <= $(cat "$STATE/nodes.count" 2>/dev/null || echo 0); i++)); do
        f=$(node_name "$i")
        if p=$(sge_execd_pid "$f"); then
            echo "sge_execd $f: running (pid $p, namespace $(node_ns "$i"), ib0 $(node_addr "$i"), eth0 $(node_eth "$i"))"
        else
            echo "sge_execd $f: not running"; ok=1
        fi
    done
    return $ok
}
