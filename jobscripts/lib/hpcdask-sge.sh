# shellcheck shell=bash
# hpcdask-sge.sh: Grid Engine's part of hpcdask-job.sh (sourced by it, never run): the jobscripts in
# jobscripts/sge/ size the worker from the job's slots and memory, start it on the job's own host
# (a Grid Engine job is one host's: no launcher is needed), and stop on -notify's SIGUSR2.

# h_rt of this job in seconds: its own request (qstat -j: "hard resource_list: h_rt=..."), else
# its queue's limit (qconf -sq). Empty when neither sets one. Both forms, seconds and H:M:S, occur.
hj_sge_h_rt() {
    local rt
    rt=$(qstat -j "$JOB_ID" 2>/dev/null | sed -n 's/^hard resource_list: *//p' | tr ',' '\n' | sed -n 's/^h_rt=//p' | head -n 1)
    [ -n "$rt" ] || rt=$(qconf -sq "${QUEUE:-all.q}" 2>/dev/null | awk '$1 == "h_rt" { print $2 }')
    case $rt in
        '' | INFINITY) return 0 ;;
        *:*:*) IFS=: read -r h m s <<<"$rt"; echo $((10#$h * 3600 + 10#$m * 60 + 10#$s)) ;;
        *) echo "$rt" ;;
    esac
}

# This job's share of a host: threads from NSLOTS, memory from its enforced address-space limit
# (h_vmem: Grid Engine sets it per job as RLIMIT_AS), else mem_free x NSLOTS. HPCDASK_NTHREADS
# and HPCDASK_MEMORY_LIMIT, when set, still win.
hj_sge_sizing() {
    local nw=${HPCDASK_NWORKERS:-1} slots=${NSLOTS:-1} kib mf
    export HPCDASK_NTHREADS=${HPCDASK_NTHREADS:-$((slots / nw > 0 ? slots / nw : 1))}
    kib=$(ulimit -v)
    if [ "$kib" != unlimited ]; then
        export HPCDASK_NODE_MEMORY=$((kib * 1024))
    else
        mf=$(qstat -j "$JOB_ID" 2>/dev/null | sed -n 's/^hard resource_list: *//p' | tr ',' '\n' | sed -n 's/^mem_free=//p' | head -n 1)
        [ -z "$mf" ] || export HPCDASK_NODE_MEMORY=$(($(hj_sge_bytes "$mf") * slots))
    fi
}

# Grid Engine's memory values (1024-based K/M/G/T, 1000-based k/m/g/t, or bytes) in bytes.
hj_sge_bytes() {
    local v=$1 n=${1%[KMGTkmgt]}
    case $v in
        *K) echo $((n * 1024)) ;; *M) echo $((n * 1024 ** 2)) ;; *G) echo $((n * 1024 ** 3)) ;; *T) echo $((n * 1024 ** 4)) ;;
        *k) echo $((n * 1000)) ;; *m) echo $((n * 1000 ** 2)) ;; *g) echo $((n * 1000 ** 3)) ;; *t) echo $((n * 1000 ** 4)) ;;
        *) echo "$n" ;;
    esac
}

# The worker of this job on this host, in the background: FILE END.
hj_sge_worker() {
    hj_worker_argv "$1" "$2"
    # Its scratch: the user's setting, else the job's $TMPDIR (Grid Engine's, removed after the job).
    HPCDASK_LOCAL_DIRECTORY=${HJ_USER_LOCAL:-${TMPDIR:-}} "${HJ_WORKER_ARGV[@]}" &
    HJ_WORKERS=$!
}

# With -notify, Grid Engine sends SIGUSR2 to every process of the job (qdel, the end of h_rt)
# the queue's notify time before SIGKILL, and SIGUSR1 before SIGSTOP (a suspension). SIGUSR2 is
# the jobscripts' warning signal (HPCDASK_WARNING_SIGNAL, hj_traps/hj_drain_traps): the roles
# handle it themselves, as Apptainer gives its payload the default of every signal back (a
# trap '' here would not reach them). The jobscript only ignores SIGUSR1: a suspension ends nothing.
hj_sge_notify_ignore() { trap '' USR1; }
