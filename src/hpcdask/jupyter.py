"""JupyterLab next to a running cluster, from the image (``hpcdask jupyter``).

The lab listens on this node's loopback only, behind a random token kept in the cluster's
private folder (0600, never printed or put on a command line); you reach it through an SSH
tunnel. Its kernels get ``HPCDASK_SCHEDULER_FILE``, so ``hpcdask.client()`` in a notebook
returns a Client connected with the cluster's TLS credentials (identity checked), and after
that ``distributed.get_client()`` returns the same Client.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from pathlib import Path

import dask.utils

from hpcdask import batch, config, netif, schedfile, security
from hpcdask.files import atomic_write

logger = logging.getLogger("hpcdask")

TOKEN_FILE = "jupyter-token"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tunnel_lines(port: int, token_file: Path) -> list[str]:
    node = socket.gethostname()
    login = batch.job().submit_host or "LOGIN"
    return [f"jupyter: on your machine: ssh -N -L {port}:127.0.0.1:{port} -J {login} {node}",
            f"jupyter: then open http://localhost:{port}/lab?token=TOKEN with TOKEN from: "
            f"ssh {login} cat {token_file}"]


def serve(scheduler_file: Path, port: int | None, root_dir: Path | None) -> None:
    """Run JupyterLab (in this process) until it is shut down or the job ends."""
    from jupyterlab.labapp import LabApp

    path = Path(scheduler_file).expanduser().absolute()
    info = schedfile.wait(path, dask.utils.parse_timedelta(config.get("scheduler-file-timeout")))
    if info["address"].startswith("tls://"):
        security.load(path.parent)  # private and intact, or one line naming the fix
    port = config.get("jupyter-port", port) or _free_port()
    netif.check_port_free("127.0.0.1", port, "--port")
    token_file = path.parent / TOKEN_FILE
    token = secrets.token_urlsafe(32)
    atomic_write(token_file, token + "\n", mode=0o600)
    # Kernels inherit this process's environment; the token reaches the server by the
    # environment too, never argv (visible to every user of the node in ps).
    os.environ["HPCDASK_SCHEDULER_FILE"] = str(path)
    os.environ["JUPYTER_TOKEN"] = token
    for line in tunnel_lines(port, token_file):
        logger.info(line)
    argv = ["--no-browser", "--ip=127.0.0.1", f"--port={port}", "--ServerApp.port_retries=0",
            f"--ServerApp.root_dir={root_dir or Path.cwd()}",
            # Compute nodes have no internet: no news, update checks or PyPI extension search.
            "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
            "--LabApp.extension_manager=readonly"]
    if os.geteuid() == 0:  # test machines and containers; never needed as a cluster's user
        argv.append("--allow-root")
    try:
        LabApp.launch_instance(argv=argv)
    finally:
        token_file.unlink(missing_ok=True)
