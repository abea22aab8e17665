#!/bin/sh
# TaskProlog of the test cluster: slurmd runs it before every task and applies each
# "export NAME=value" line it prints to the task's environment.
# Puts tests/cluster/bin (the apptainer-compatible runner) first on PATH, whatever the submitter's PATH.
bin=$(cd "$(dirname "$0")/../bin" 2>/dev/null && pwd) || exit 0
case ":$PATH:" in
    ":$bin:"*) ;;
    *) echo "export PATH=$bin:$PATH" ;;
esac
