"""The one door to the shell: every subprocess hpcdask runs goes through :func:`run`."""

from __future__ import annotations

import logging
import shlex
import subprocess
from collections.abc import Sequence

logger = logging.getLogger(__name__)


class CommandError(RuntimeError):
    """A command failed; carries its exit code and output."""

    def __init__(self, cmd: Sequence[str], returncode: int, stdout: str, stderr: str):
        self.cmd, self.returncode, self.stdout, self.stderr = list(cmd), returncode, stdout, stderr
        tail = (stderr or stdout).strip().splitlines()[-1:] or ["(no output)"]
        super().__init__(f"`{shlex.join(cmd)}` exited with {returncode}: {tail[0]}")


def run(cmd: Sequence[str], *, check: bool = True, timeout: float | None = 60,
        env: dict[str, str] | None = None, input: str | None = None) -> subprocess.CompletedProcess:
    """Run ``cmd`` (no shell), log it, and raise :class:`CommandError` on a non-zero exit."""
    logger.debug("running %s", shlex.join(cmd))
    try:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout,
                              env=env, input=input)
    except FileNotFoundError:
        raise CommandError(cmd, 127, "", f"{cmd[0]}: command not found") from None
    except subprocess.TimeoutExpired as e:
        raise CommandError(cmd, -1, str(e.stdout or ""), f"timed out after {timeout}s") from None
    if check and proc.returncode != 0:
        raise CommandError(cmd, proc.returncode, proc.stdout, proc.stderr)
    return proc
