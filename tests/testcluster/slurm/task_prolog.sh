#!/bin/sh
# TaskProlog of the test cluster: slurmd runs it (as the job's user) before every task and applies
# each "export NAME=value" line it prints to the task's environment.
#  - TMPDIR: the job's node-local folder (made by prolog.sh), whatever the submitter's TMPDIR was;
#  - PATH: tests/testcluster/bin (the apptainer-compatible runner) first, as a site's module would.
echo "export TMPDIR=@LOCAL@/job-$SLURM_JOB_ID"
bin=@SRC@/tests/testcluster/bin
case ":$PATH:" in
    ":$bin:"*) ;;
    *) echo "export PATH=$bin:$PATH" ;;
esac
