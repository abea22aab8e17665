#!/bin/sh
# TaskProlog of the test cluster: slurmd runs it before every task and applies each
# "export NAME=value" line it prints to the task's environment.
# Puts tests/cluster/bin (the apptainer-compatible runner) first on PATH, whatever the submitter's PATH.
bin=${0%/slurm/*}/bin
case ":$PATH:" in
    ":$bin:"*) ;;
    *) echo "export PATH=$bin:$PATH" ;;
esac
