#!/bin/sh
# Epilog of the test cluster (root, on every node of a job as it ends): what the job left in its
# node-local $TMPDIR is listed in @STATE@/leftovers/<node>-job-<id>.txt (the tests read it), then
# the folder is removed, as a site's epilog or job_container/tmpfs does.
dir=@LOCAL@/job-$SLURM_JOB_ID
if [ -d "$dir" ]; then
    left=$(find "$dir" -mindepth 1 -maxdepth 3 2>/dev/null | head -n 50)
    [ -z "$left" ] || printf '%s\n' "$left" >"@STATE@/leftovers/$SLURMD_NODENAME-job-$SLURM_JOB_ID.txt"
    rm -rf "$dir"
fi
exit 0
