# shellcheck shell=bash
# hpcdask-job.sh: the shared core of hpcdask's jobscripts. Sourced, never run.
#
# Every jobscript (slurm/dask-cluster.sbatch, slurm/dask-scheduler.sbatch, slurm/dask-workers.sbatch,
# pbs/dask-cluster.pbs, sge/dask-scheduler.sge, sge/dask-workers.sge) is a few lines calling the functions below; the logic lives here once.
# Every role runs as `apptainer exec "$HPCDASK_IMAGE" hpcdask ROLE ...`; workers are srun steps
# (Slurm) or pbsdsh tasks (PBS), never `apptainer instance`s.
#
# Settings: hpcdask reads its own from HPCDASK_<KEY> (HPCDASK_INTERFACE, HPCDASK_NWORKERS,
# HPCDASK_NTHREADS, HPCDASK_MEMORY_LIMIT, HPCDASK_MEMORY_PRESET, HPCDASK_LOCAL_DIRECTORY,
# HPCDASK_LIFETIME_MARGIN, ... see `hpcdask.yaml`), passed into the image with the environment.
# Only these are the jobscripts' own:
#   HPCDASK_IMAGE          the image (.sif file or sandbox folder) every role runs in (required)
#   HPCDASK_APPTAINER      the apptainer command (default: apptainer)
#   HPCDASK_BIND           extra apptainer --bind specs, comma-separated (e.g. /scratch,/project)
#   HPCDASK_SHARED_DIR     parent of the per-job cluster folders (default ~/.hpcdask/clusters)
#   HPCDASK_CLUSTER_DIR    the cluster folder of the scheduler job + worker jobs pattern
#   HPCDASK_READY_TIMEOUT  how long to wait for every worker to join (default 300s)
#   HPCDASK_STOP_TIMEOUT   seconds the scheduler and the workers get, together, to stop once the client is done (default 60)
#   HPCDASK_KILL_GRACE     seconds the roles get to end on SIGTERM/exit before SIGKILL (default 4:
#                          inside Slurm's KillWait, which is 30 s on most sites)
#   HPCDASK_WARNING_SIGNAL the batch system's early warning (default USR1: #SBATCH --signal=B:USR1@N;
#                          USR2 for Grid Engine's -notify); hpcdask's own setting too (warning-signal)
# Signals: a worker job passes SIGTERM (scancel, preemption) and the warning signal once to its
# workers, which drain (hand their results to the other workers, hpcdask.drain-timeout) and exit;
# the job waits for them. A scheduler or all-in-one job passes the warning once to its scheduler,
# which tells the clients the cluster is ending and stops in order. A second signal changes nothing.
# The interface is hpcdask's setting (hpcdask.yaml: ib0), so ~/.config/dask/*.yaml,
# DASK_HPCDASK__INTERFACE and HPCDASK_INTERFACE all reach the roles unchanged.
# Node-local scratch: $TMPDIR (Slurm/PBS make it per job on each node) is bound into the image
# and is the workers' local directory; nothing of the job is written to /tmp.

HJ_APPTAINER=${HPCDASK_APPTAINER:-apptainer}
HJ_READY_TIMEOUT=${HPCDASK_READY_TIMEOUT:-300s}
HJ_STOP_TIMEOUT=${HPCDASK_STOP_TIMEOUT:-60}
HJ_KILL_GRACE=${HPCDASK_KILL_GRACE:-4}
HJ_WARNING=${HPCDASK_WARNING_SIGNAL:-USR1}
HJ_WARNING=${HJ_WARNING#SIG}
HJ_SIGNALLED=''   # the first signal this job passed on (a second one changes nothing)

HJ_EXEC=()        # apptainer exec [--bind ...] IMAGE: the prefix of every role
HJ_DIR=''         # this cluster's folder (scheduler file + credentials)
HJ_OWN_DIR=0      # 1: the folder is this job's own and is removed at the end
HJ_SCHED=''       # pid of the scheduler
HJ_WORKERS=''     # pid of the srun (or pbsdsh) that runs the workers
HJ_CLIENT=''      # pid of the client
HJ_WAITER=''      # pid of `hpcdask wait`
HJ_FILE=''        # the scheduler file this job's scheduler writes
HJ_MARKS=''       # folder where each of this job's worker processes marks its node while it runs
HJ_WITH_SCHEDULER=0  # 1: the workers start together with the scheduler (hpcdask worker --with-scheduler)
HJ_SCRATCH=''     # scratch of this node's roles (scheduler, client): removed even if they are killed
HJ_USER_LOCAL=${HPCDASK_LOCAL_DIRECTORY:-}  # the user's own worker scratch setting, if any
HJ_T0=$(date +%s.%N)

hj_say() { echo "hpcdask-job: $*" >&2; }
hj_die() {
    local code=$1
    shift
    echo "hpcdask-job: error: $*" >&2
    exit "$code"
}
hj_elapsed() { awk -v a="$HJ_T0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }

# The image and apptainer exist: checked before anything starts (one line, exit 2 otherwise).
hj_require() {
    [ -n "${HPCDASK_IMAGE:-}" ] ||
        hj_die 2 "HPCDASK_IMAGE is not set; export HPCDASK_IMAGE=/path/to/hpcdask.sif before sbatch/qsub (the job inherits it)"
    [ -e "$HPCDASK_IMAGE" ] ||
        hj_die 2 "image $HPCDASK_IMAGE does not exist (HPCDASK_IMAGE); build it (make sif) or point HPCDASK_IMAGE at it"
    [ -r "$HPCDASK_IMAGE" ] ||
        hj_die 2 "image $HPCDASK_IMAGE is not readable by $(id -un); fix its mode or point HPCDASK_IMAGE at a copy you can read"
    command -v "$HJ_APPTAINER" >/dev/null 2>&1 ||
        hj_die 2 "'$HJ_APPTAINER' not found on PATH of $(hostname); module load apptainer, or set HPCDASK_APPTAINER=/path/to/apptainer"
    local pair name value
    for pair in HPCDASK_STOP_TIMEOUT=60 HPCDASK_KILL_GRACE=4; do  # each with its default
        name=${pair%=*}
        value=${!name:-}
        [[ -z $value || $value =~ ^(0|[1-9][0-9]{0,5})$ ]] ||
            hj_die 2 "$name=$value is not a whole number of seconds; e.g. $pair"
    done
}

# The shared parent of the cluster folders: created private when missing.
hj_shared_dir() {
    local d=${HPCDASK_SHARED_DIR:-$HOME/.hpcdask/clusters}
    (umask 077 && mkdir -p "$d") 2>/dev/null ||
        hj_die 2 "cannot create $d; set HPCDASK_SHARED_DIR to a folder you can write on the shared filesystem"
    echo "$d"
}

# A new cluster folder of this job under the shared folder, made exclusively (mktemp -d: 0700, a
# name no other job or user has): two jobs never share, overwrite or delete each other's files.
hj_new_cluster_dir() {
    local parent
    parent=$(hj_shared_dir) || exit $?
    HJ_DIR=$(mktemp -d "$parent/job-$1.XXXXXX") ||
        hj_die 2 "cannot create a cluster folder in $parent; set HPCDASK_SHARED_DIR to a folder you can write"
    HJ_OWN_DIR=1
    hj_exec_prefix
}

# The named cluster folder DIR (scheduler job + worker jobs). MAKE=1 (the scheduler job): create it
# exclusively when missing, and then it is this job's to remove; an existing one is only used
# (hpcdask scheduler refuses one that holds a live cluster's scheduler file).
hj_cluster_dir() {
    HJ_DIR=$1
    if [ "${2:-0}" = 1 ] && [ ! -e "$HJ_DIR" ]; then
        (umask 077 && mkdir -p "$(dirname "$HJ_DIR")" && mkdir "$HJ_DIR") 2>/dev/null ||
            hj_die 2 "cannot create the cluster folder $HJ_DIR; set HPCDASK_CLUSTER_DIR to a new folder you can write on the shared filesystem"
        HJ_OWN_DIR=1
    fi
    [ -d "$HJ_DIR" ] || hj_die 2 "cluster folder $HJ_DIR does not exist; submit the scheduler job first (sbatch dask-scheduler.sbatch) with the same HPCDASK_CLUSTER_DIR"
    hj_exec_prefix
}

# HJ_EXEC: apptainer exec with the cluster folder, node-local scratch and HPCDASK_BIND bound.
# The roles started on this node keep their scratch in HJ_SCRATCH (in $TMPDIR), which
# hj_cleanup removes even when Slurm's KillWait had to SIGKILL them.
hj_exec_prefix() {
    if [ -z "$HJ_USER_LOCAL" ]; then
        HJ_SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/hpcdask-job.XXXXXX") ||
            hj_die 2 "cannot create a scratch folder in ${TMPDIR:-/tmp}; set HPCDASK_LOCAL_DIRECTORY to a writable node-local folder"
        export HPCDASK_LOCAL_DIRECTORY=$HJ_SCRATCH
    fi
    HJ_EXEC=("$HJ_APPTAINER" exec --bind "$HJ_DIR")
    local b spec
    # $TMPDIR is per job and node-local (the batch system makes it); Apptainer binds /tmp but not it.
    if [ -n "${TMPDIR:-}" ] && [ -d "$TMPDIR" ]; then
        case $TMPDIR in /tmp | /var/tmp) ;; *) HJ_EXEC+=(--bind "$TMPDIR") ;; esac
    fi
    if [ -n "${HPCDASK_BIND:-}" ]; then
        IFS=, read -ra b <<<"$HPCDASK_BIND"
        for spec in "${b[@]}"; do HJ_EXEC+=(--bind "$spec"); done
    fi
    # A .sif is also bound onto the image's placeholder, so every role reads its ID (hpcdask/sif.py).
    [ -f "$HPCDASK_IMAGE" ] && HJ_EXEC+=(--bind "$HPCDASK_IMAGE:/opt/hpcdask/image.sif:ro")
    HJ_EXEC+=("$HPCDASK_IMAGE")
}

# The job's end time in Unix seconds (empty when it has none), for `hpcdask worker --lifetime auto`.
hj_job_end() {
    local end=''
    if [ -n "${SLURM_JOB_ID:-}" ]; then
        # An array task by its own name: the array's ID alone lists every task's end time.
        local id=$SLURM_JOB_ID
        [ -z "${SLURM_ARRAY_TASK_ID:-}" ] || id=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}
        end=$(squeue -h -j "$id" -o %e 2>/dev/null) || end=''
    elif [ -n "${PBS_JOBID:-}" ]; then
        # PBS has no end time: start (now, near enough) + the walltime asked for.
        local wt
        wt=$(qstat -f "$PBS_JOBID" 2>/dev/null | sed -n 's/^ *Resource_List.walltime = //p')
        if [ -n "$wt" ]; then
            IFS=: read -r h m s <<<"$wt"
            echo $(($(date +%s) + 10#$h * 3600 + 10#$m * 60 + 10#$s))
        fi
        return 0
    elif [ -n "${JOB_ID:-}" ] && [ -n "${SGE_TASK_ID:-}" ]; then
        # Grid Engine: no end time either; start (now, near enough) + h_rt.
        local rt
        rt=$(hj_sge_h_rt)
        [ -z "$rt" ] || echo $(($(date +%s) + rt))
        return 0
    fi
    case $end in '' | N/A | NONE | Unknown | UNLIMITED) return 0 ;; esac
    date -d "$end" +%s
}

# argv of one node's workers: `hpcdask worker` retiring before the job's end (FILE, END).
hj_worker_argv() {
    HJ_WORKER_ARGV=("${HJ_EXEC[@]}" hpcdask worker --scheduler-file "$1")
    [ -z "${2:-}" ] || HJ_WORKER_ARGV+=(--lifetime auto --job-end "$2")
    [ "$HJ_WITH_SCHEDULER" != 1 ] || HJ_WORKER_ARGV+=(--with-scheduler)
    hj_gpu_argv
}

# srun of one worker task per node (NODES) of this allocation, in the background.
hj_srun_workers() {
    local file=$1 end=$2 nodes=$3
    hj_worker_argv "$file" "$end"
    # srun (22.05+) does not inherit --cpus-per-task from sbatch: pass it on, so task binding
    # gives each worker the CPUs the job asked for. --no-kill: a node that fails ends its own
    # worker only; the others finish the work (the jobscripts ask sbatch for --no-kill too).
    local cpt=()
    [ -z "${SLURM_CPUS_PER_TASK:-}" ] || cpt=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
    # The workers' scratch: the user's setting, else their own node's $TMPDIR (not HJ_SCRATCH).
    HPCDASK_LOCAL_DIRECTORY=$HJ_USER_LOCAL srun --nodes="$nodes" --ntasks-per-node=1 "${cpt[@]}" \
        --kill-on-bad-exit=0 --no-kill "${HJ_WORKER_ARGV[@]}" &
    HJ_WORKERS=$!
}

# PBS: one worker task per node through pbsdsh (PBS's own launcher: no ssh, no mpirun). pbsdsh
# tasks start with PBS's bare environment, so the job's HPCDASK_* settings go through a file.
hj_pbsdsh_workers() {
    # One file per job: the subjobs of an array (qsub -J) share the cluster folder.
    local file=$1 end=$2 envfile=$HJ_DIR/worker-env-${PBS_JOBID:-job}.sh
    hj_worker_argv "$file" "$end"
    {
        printf 'cd %q\n' "$PWD"
        printf 'export PATH=%q\n' "$PATH"
        local v
        for v in $(compgen -e); do
            case $v in HPCDASK_* | TMPDIR | PBS_JOBFS | APPTAINERENV_* | APPTAINER_BIND) printf 'export %s=%q\n' "$v" "${!v}" ;; esac
        done
        printf 'exec'
        printf ' %q' "${HJ_WORKER_ARGV[@]}"
        printf '\n'
    } >"$envfile"
    # The first vnode index of each distinct host in PBS_NODEFILE (one line per CPU there).
    local idx
    idx=$(awk '!seen[$1]++ { print NR - 1 }' "$PBS_NODEFILE")
    (
        for i in $idx; do pbsdsh -n "$i" -- /bin/bash "$envfile" & done
        wait
    ) &
    HJ_WORKERS=$!
}

# PBS sizing: PBS_NODEFILE has one line per CPU; NCPUS and PBS_VMEM are the job's totals, so
# each node gets its share (HPCDASK_NTHREADS and HPCDASK_MEMORY_LIMIT, when set, still win).
hj_pbs_sizing() {
    HJ_NODES=$(sort -u "$PBS_NODEFILE" | wc -l)
    local cpus nw=${HPCDASK_NWORKERS:-1}
    cpus=$(wc -l <"$PBS_NODEFILE")
    export HPCDASK_NTHREADS=${HPCDASK_NTHREADS:-$((cpus / HJ_NODES / nw > 0 ? cpus / HJ_NODES / nw : 1))}
    # This node's share of the job's memory: hpcdask.memory splits it between the workers,
    # leaving the nannies' and (on the batch node) the scheduler's and client's headroom.
    if [ -n "${PBS_VMEM:-}" ]; then
        export HPCDASK_NODE_MEMORY=$((PBS_VMEM / HJ_NODES))
    fi
}

# Workers on every node of this job, by the batch system's own launcher: FILE END NODES.
# Each marks its node in HJ_MARKS (in the cluster's folder) while it runs: hj_lost_nodes.
hj_launch_workers() {
    HJ_MARKS=$HJ_DIR/.running-${SLURM_JOB_ID:-${PBS_JOBID:-$$}}
    export HPCDASK_WORKER_MARKS=$HJ_MARKS
    if [ -n "${SLURM_JOB_ID:-}" ]; then
        hj_srun_workers "$@"
    else
        hj_pbsdsh_workers "$@"
    fi
}

# Start the scheduler (FILE) in the background and wait until it has published its address in
# FILE. An existing FILE is never removed here: hpcdask scheduler refuses it, naming its owner.
hj_start_scheduler() {
    hj_spawn_scheduler "$1"
    hj_wait_scheduler "$1"
}

# The scheduler (FILE) in the background; HJ_SCHED is its pid.
hj_spawn_scheduler() {
    local file=$1
    HJ_FILE=$file
    local end
    end=$(hj_job_end)  # the credentials expire soon after the job
    "${HJ_EXEC[@]}" hpcdask scheduler --scheduler-file "$file" ${end:+--job-end "$end"} &
    HJ_SCHED=$!
}

# Wait until the scheduler has published its address in FILE.
hj_wait_scheduler() {
    local file=$1
    # Its readiness is the file itself (written once it listens); the loop only also notices
    # a scheduler that failed, so an error shows at once instead of after a timeout.
    local limit=$((SECONDS + 120))
    until grep -qs '"address"' "$file"; do
        if ! kill -0 "$HJ_SCHED" 2>/dev/null; then
            local rc=0
            wait "$HJ_SCHED" || rc=$?
            HJ_SCHED=''
            hj_die "$rc" "the scheduler did not start (exit $rc); the line above says why"
        fi
        [ "$SECONDS" -lt "$limit" ] || hj_die 1 "the scheduler wrote no $file within 120 s"
        sleep 0.1
    done
    hj_say "scheduler up after $(hj_elapsed)s: $file"
}

# Is PID (possibly empty) still running?
hj_alive() { [ -n "$1" ] && kill -0 "$1" 2>/dev/null; }

# Wait until any background role ends; then HJ_ENDED names it (client/waiter/scheduler/workers)
# and HJ_RC is its exit code.
# A signal the job passes on (hj_drain, hj_warned) interrupts the wait: it goes on while a role runs.
hj_wait_any() {
    local name pid
    while :; do
        wait -n 2>/dev/null || true
        for name in waiter client scheduler workers; do
            case $name in
                waiter) pid=$HJ_WAITER ;; client) pid=$HJ_CLIENT ;;
                scheduler) pid=$HJ_SCHED ;; workers) pid=$HJ_WORKERS ;;
            esac
            if [ -n "$pid" ] && ! hj_alive "$pid"; then
                HJ_ENDED=$name
                HJ_RC=0
                wait "$pid" 2>/dev/null || HJ_RC=$?
                case $name in
                    waiter) HJ_WAITER='' ;; client) HJ_CLIENT='' ;;
                    scheduler) HJ_SCHED='' ;; workers) HJ_WORKERS='' ;;
                esac
                return 0
            fi
        done
        hj_alive "$HJ_WAITER" || hj_alive "$HJ_CLIENT" || hj_alive "$HJ_SCHED" ||
            hj_alive "$HJ_WORKERS" || break
    done
    HJ_ENDED=''
}

# A role ended out of turn: say which in one line and stop the job.
hj_fail_ended() {
    case $HJ_ENDED in
        scheduler) hj_die 1 "the scheduler ended (exit $HJ_RC) while the $1; stopping the job" ;;
        workers) hj_die 1 "the workers' step ended (exit $HJ_RC) while the $1; see the worker errors above" ;;
    esac
}

# Readiness: block until N workers are registered (`hpcdask wait`), or a role fails first.
hj_wait_ready() {
    local file=$1 n=$2
    "${HJ_EXEC[@]}" hpcdask wait --scheduler-file "$file" --workers "$n" --timeout "$HJ_READY_TIMEOUT" &
    HJ_WAITER=$!
    while :; do
        hj_wait_any
        case $HJ_ENDED in
            waiter)
                [ "$HJ_RC" -eq 0 ] || hj_die "$HJ_RC" "the workers did not all join (hpcdask wait exit $HJ_RC)"
                hj_say "$n worker(s) ready after $(hj_elapsed)s in the job"
                return 0 ;;
            scheduler | workers) hj_fail_ended "workers were starting" ;;
        esac
    done
}

# The client: `hpcdask run` (no arguments, or run's options), or a user's script + its arguments:
# FILE N ARGS. It waits itself until N workers have joined (N=0: it does not wait), so it starts
# together with the workers instead of after them.
hj_start_client() {
    local file=$1 n=$2
    shift 2
    if [ "${1:-}" = --jupyter ]; then
        hj_start_jupyter "$file"
        return 0
    fi
    local wait=()
    [ "$n" -eq 0 ] || wait=(--wait-workers "$n" --wait-timeout "$HJ_READY_TIMEOUT")
    hj_check_client "$@"
    if [ $# -eq 0 ] || [ "${1#-}" != "$1" ]; then
        "${HJ_EXEC[@]}" hpcdask run --scheduler-file "$file" "${wait[@]}" "$@" &
    else
        "${HJ_EXEC[@]}" hpcdask client --scheduler-file "$file" "${wait[@]}" -- "$@" &
    fi
    HJ_CLIENT=$!
}

# The client's arguments (a script, or run's options): a script that does not exist stops the
# job before anything starts.
hj_check_client() {
    if [ $# -gt 0 ] && [ "${1#-}" = "$1" ] && [ ! -f "$1" ]; then
        hj_die 2 "script $1 does not exist (from $(pwd)); give your Python script's path after the jobscript, e.g. sbatch dask-cluster.sbatch ./my_analysis.py --arg 1"
    fi
}

# Wait for the client; returns its exit code in HJ_RC. Dies if the scheduler or all workers go first.
hj_wait_client() {
    while :; do
        hj_wait_any
        case $HJ_ENDED in
            client) return 0 ;;
            scheduler | workers)
                # Warned, the scheduler told the client and stops: the client's own line follows.
                if [ -n "$HJ_SIGNALLED" ] && hj_alive "$HJ_CLIENT"; then continue; fi
                hj_fail_ended "client was running" ;;
        esac
    done
}

# Wait up to SECS for PID to end; true if it did.
hj_wait_pid() {
    local pid=$1 limit=$((SECONDS + $2))
    while hj_alive "$pid"; do
        [ "$SECONDS" -lt "$limit" ] || return 1
        sleep 0.2
    done
    wait "$pid" 2>/dev/null || true
}

# Orderly end: SIGTERM the scheduler (it retires the workers first), then wait for the workers;
# HPCDASK_STOP_TIMEOUT bounds both together (then hj_cleanup ends what is left).
hj_shutdown() {
    local end=$((SECONDS + HJ_STOP_TIMEOUT))
    if hj_alive "$HJ_SCHED"; then
        kill -TERM "$HJ_SCHED" 2>/dev/null || true
        hj_wait_pid "$HJ_SCHED" "$HJ_STOP_TIMEOUT" || hj_say "the scheduler did not stop within ${HJ_STOP_TIMEOUT}s"
    fi
    HJ_SCHED=''
    if hj_alive "$HJ_WORKERS"; then
        if ! hj_wait_pid "$HJ_WORKERS" $((end > SECONDS ? end - SECONDS : 0)); then
            hj_say "the workers did not stop within ${HJ_STOP_TIMEOUT}s; ending them"
            hj_lost_nodes
        fi
    fi
}

# Name the nodes whose workers did not end: a worker's mark in HJ_MARKS stays when its node
# crashed (or its worker hangs); on Slurm, also the nodes Slurm took out of the job or has
# marked down (with --no-kill the job goes on without them; Slurm notices only after
# SlurmdTimeout, minutes on most sites, so the marks are what names a crashed node in time).
hj_lost_nodes() {
    local lost='' all now down
    [ -z "$HJ_MARKS" ] || lost=$(find "$HJ_MARKS" -mindepth 1 -maxdepth 1 -printf '%f\n' 2>/dev/null | sed 's/\.[0-9]*$//')
    if [ -n "${SLURM_JOB_ID:-}" ]; then
        all=$(scontrol show hostnames "$SLURM_JOB_NODELIST" 2>/dev/null | sort)
        now=$(scontrol show hostnames "$(squeue -h -j "$SLURM_JOB_ID" -o %N 2>/dev/null)" 2>/dev/null | sort)
        down=$(sinfo -h -N -n "$SLURM_JOB_NODELIST" -t down,fail,no_respond -o %N 2>/dev/null)
        [ -z "$all" ] || lost+=$'\n'$(comm -23 <(echo "$all") <(echo "$now"))
        lost+=$'\n'$down
    fi
    lost=$(echo "$lost" | sed '/^$/d' | sort -u | paste -sd, -)
    [ -z "$lost" ] || hj_say "these node(s) did not answer (down, removed from the job, or a worker hangs): $lost; the job ends without their workers"
}

# Trap on any exit: end what still runs (TERM to all at once, KILL after HPCDASK_KILL_GRACE s:
# inside Slurm's KillWait), then remove what this job made, and nothing else.
hj_cleanup() {
    local pids=() p ours=0 claim=''
    # First, so no worker or client finds a cluster that is going away (the scheduler removes
    # it too, but Slurm's KillWait may SIGKILL it before it gets there). Its claim beside it
    # (schedfile.claim_path) goes last, once the credentials are gone.
    if [ -n "$HJ_FILE" ]; then
        claim="$(dirname -- "$HJ_FILE")/.$(basename -- "$HJ_FILE").claim"
        hj_ours "$claim" && ours=1
        if hj_ours "$HJ_FILE"; then
            ours=1
            rm -f -- "$HJ_FILE"
        fi
    fi
    for p in "$HJ_CLIENT" "$HJ_WAITER" "$HJ_SCHED" "$HJ_WORKERS"; do
        hj_alive "$p" && pids+=("$p")
    done
    if [ ${#pids[@]} -gt 0 ]; then
        kill -TERM "${pids[@]}" 2>/dev/null || true
        # Tenths of a second, at least the grace (bash's $SECONDS would cut it by up to 1 s).
        local tenths=0 left
        while :; do
            left=()
            for p in "${pids[@]}"; do hj_alive "$p" && left+=("$p"); done
            if [ ${#left[@]} -eq 0 ] || [ "$tenths" -ge $((HJ_KILL_GRACE * 10)) ]; then break; fi
            sleep 0.1
            tenths=$((tenths + 1))
        done
        if [ ${#left[@]} -gt 0 ]; then
            hj_say "$(hj_roles "${left[@]}") still running ${HJ_KILL_GRACE}s after SIGTERM: killed" \
                "(HPCDASK_KILL_GRACE)"
            kill -KILL "${left[@]}" 2>/dev/null || true
        fi
        wait 2>/dev/null || true
    fi
    [ -z "$HJ_SCRATCH" ] || rm -rf -- "$HJ_SCRATCH"
    [ -z "$HJ_MARKS" ] || rm -rf -- "$HJ_MARKS"
    if [ "$HJ_OWN_DIR" = 1 ] && [ -n "$HJ_DIR" ]; then
        rm -rf -- "$HJ_DIR"
    elif [ "$ours" = 1 ]; then
        # A kept folder (HPCDASK_CLUSTER_DIR) loses only this job's dead cluster's credentials.
        rm -rf -- "$HJ_DIR"/tls "$HJ_DIR"/.tls-*
        rm -f -- "$claim"
    fi
}

# The roles' names of PIDs (client, scheduler, ...), for a line.
hj_roles() {
    local p names=()
    for p in "$@"; do
        case $p in
            "$HJ_CLIENT") names+=(client) ;; "$HJ_WAITER") names+=(waiter) ;;
            "$HJ_SCHED") names+=(scheduler) ;; "$HJ_WORKERS") names+=(workers) ;;
        esac
    done
    echo "${names[*]}"
}

# Was FILE written by this job (its "job" stamp)?
hj_ours() {
    local id=${SLURM_JOB_ID:-${PBS_JOBID:-}}
    [ -n "$id" ] || { [ -z "${SGE_TASK_ID:-}" ] || id=${JOB_ID:-}; }
    [ -n "$id" ] && grep -qs "\"job\": \"$id\"" "$1"
}

# SIGTERM/SIGINT to the job (time limit, scancel/qdel): the cleanup trap does the rest. The
# warning signal (a scheduler or all-in-one job): passed once to the scheduler (hj_warned).
hj_traps() {
    trap hj_cleanup EXIT
    trap 'hj_say "stopped by SIGTERM (time limit or scancel)"; exit 143' TERM
    trap 'hj_say "stopped by SIGINT"; exit 130' INT
    # shellcheck disable=SC2064 # the signal's name now
    trap "hj_warned $HJ_WARNING" "$HJ_WARNING"
}

# The warning (SIG): the scheduler tells its clients that the cluster is ending and stops in order.
hj_warned() {
    [ -z "$HJ_SIGNALLED" ] || return 0
    HJ_SIGNALLED=$1
    hj_say "got SIG$1: the cluster is ending; the scheduler tells the clients and stops"
    if hj_alive "$HJ_SCHED"; then kill -s "$1" "$HJ_SCHED" 2>/dev/null || true; fi
}

# A worker job: SIGTERM (scancel, preemption, the time limit) and the warning signal drain the
# workers (hj_drain); the job waits for them to hand their results over and exits with their code.
hj_drain_traps() {
    trap hj_cleanup EXIT
    trap 'hj_drain TERM' TERM
    # shellcheck disable=SC2064 # the signal's name now
    trap "hj_drain $HJ_WARNING" "$HJ_WARNING"
    trap 'hj_say "stopped by SIGINT"; exit 130' INT
}

# SIG, once, to the workers' step (srun passes it to every task; under scancel without -b the
# tasks have it already, and the second one changes nothing).
hj_drain() {
    [ -z "$HJ_SIGNALLED" ] || return 0
    HJ_SIGNALLED=$1
    hj_say "got SIG$1: draining the workers (they hand their results over, then exit)"
    if hj_alive "$HJ_WORKERS"; then kill -s "$1" "$HJ_WORKERS" 2>/dev/null || true; fi
}

# The all-in-one job: scheduler on this node, NODES x NWORKERS workers, the client here; exits
# with the client's exit code. FILE, NODES, then the client's arguments.
# The workers live as long as the job (no --lifetime: there is no longer-lived scheduler to hand
# their results to); those on this node leave memory to the scheduler and the client
# (HPCDASK_BATCH_HOST: hpcdask.memory's batch-node reserve).
hj_all_in_one() {
    local file=$1 nodes=$2
    shift 2
    local n=$((nodes * ${HPCDASK_NWORKERS:-1}))
    export HPCDASK_BATCH_HOST
    HPCDASK_BATCH_HOST=$(hostname)
    # Scheduler and workers start together: the workers (--with-scheduler) wait for the
    # scheduler's file before they look at their interface, so a setting every role shares (the
    # interface, TLS) fails once, in the scheduler, and the job stops the waiting workers. The client starts once the scheduler
    # is up and waits for the N workers itself (--wait-workers). Jupyter's notebooks connect
    # later, when the user opens them: it starts on a full cluster. Any other client starts
    # with the scheduler and the workers too (it waits for the scheduler's file itself), so its
    # interpreter and its imports are not on the way to the first result after the cluster's.
    hj_check_client "$@"
    hj_spawn_scheduler "$file"
    HJ_WITH_SCHEDULER=1 hj_launch_workers "$file" "" "$nodes"
    if [ "${1:-}" = --jupyter ]; then
        hj_wait_scheduler "$file"
        hj_wait_ready "$file" "$n"
        hj_start_client "$file" 0 "$@"
    else
        hj_start_client "$file" "$n" "$@"
        hj_wait_scheduler "$file"
    fi
    hj_wait_client
    local rc=$HJ_RC
    hj_say "client ended (exit $rc) after $(hj_elapsed)s; stopping the cluster"
    hj_shutdown
    return "$rc"
}

# The recipes (GPUs, Jupyter) and Grid Engine's part live in their own files.
# shellcheck source=hpcdask-recipes.sh
source "$(dirname "${BASH_SOURCE[0]}")/hpcdask-recipes.sh"
# shellcheck source=hpcdask-sge.sh
source "$(dirname "${BASH_SOURCE[0]}")/hpcdask-sge.sh"
