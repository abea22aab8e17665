#!/bin/sh
# Prolog of the test cluster (root, on every node of a job as it is allocated): the job's node-local
# scratch folder, private to the job's user. The TaskProlog exports it as TMPDIR.
set -eu
dir=@LOCAL@/job-$SLURM_JOB_ID
mkdir -m 0700 "$dir"
chown "$SLURM_JOB_UID:$(id -g "$SLURM_JOB_UID" 2>/dev/null || echo "$SLURM_JOB_UID")" "$dir"
