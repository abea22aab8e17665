"""Run a command of this checkout as an ordinary user (nobody, 65534), from wherever the
checkout sits.

The checkout may be out of other users' reach: ``d=$(mktemp -d) && git clone . "$d"`` makes
it a 0700 folder of root's. So the command runs in a mount namespace of its own, where the
checkout is shown read-only at a folder every user may enter (bind-checkout.sh). Paths into
the checkout in ARGV are rewritten to that folder. The checkout's ``src/`` goes first on
PYTHONPATH, because the editable install's .pth names the original path. The namespace, and
the mounts with it, end with the command, so there is nothing to unmount.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
_BIND = 'sh "$1/tests/testcluster/bind-checkout.sh" "$1" "$2" && shift 2 && exec "$@"'


def run_as_nobody(argv, env: dict[str, str], **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(ARGV, env=ENV, **KWARGS)`` as nobody, the checkout reachable."""
    with tempfile.TemporaryDirectory(prefix="checkout-for-nobody-") as seen:
        os.chmod(seen, 0o755)
        repo = str(REPO)
        args = [seen + a[len(repo):] if a == repo or a.startswith(repo + "/") else a
                for a in map(str, argv)]
        path = [f"{seen}/src", *filter(None, [env.get("PYTHONPATH")])]
        return subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", _BIND, "sh",
             repo, seen, *NOBODY, *args],
            env={**env, "PYTHONPATH": os.pathsep.join(path)}, **kwargs)
