#!/bin/sh
# Epilog of the Grid Engine test cluster (root, on the job's host, before sge_execd removes the
# job's $TMPDIR): what the job left there is listed in @STATE@/leftovers/<host>-job-<id>.<task>.txt
# (the tests read it), as tests/testcluster/slurm/epilog.sh does for Slurm.
# Grid Engine gives the epilog the job's $TMPDIR as TMP only (TMPDIR is set in the job alone).
dir=${TMPDIR:-${TMP:-}}
case $dir in /tmp/?*) ;; *) exit 0 ;; esac
if [ -d "$dir" ]; then
    left=$(find "$dir" -mindepth 1 -maxdepth 3 2>/dev/null | head -n 50)
    task=${SGE_TASK_ID:-undefined}
    [ -z "$left" ] || printf '%s\n' "$left" >"@STATE@/leftovers/$(hostname)-job-$JOB_ID.$task.txt"
fi
exit 0
