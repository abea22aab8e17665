"""JupyterLab next to a running cluster, from the image (``hpcdask jupyter``).

The lab listens on this node's loopback only, behind a random token kept in the cluster's
private folder (0600, never printed or put on a command line); you reach it through an SSH
tunnel. Its kernels get ``HPCDASK_SCHEDULER_FILE``, so ``hpcdask.client()`` in a notebook
returns a Client connected with the cluster's TLS credentials (identity checked), and after
that ``distributed.get_client()`` returns the same Client.

The scheduler's dashboard comes through the same tunnel, as Pangeo's HPC guide sets it up: when
it listens on this node, jupyter-server-proxy serves it under the lab's own address and token
(``/proxy/127.0.0.1:PORT/status``), allowed for that one host and port only (any other is
refused, 403: no open proxy to the node's other services), and both ``client.dashboard_link`` in
the kernels and dask-labextension's panes point there.

Behind Open OnDemand (``ondemand/``), the lab listens on the node's own address instead
(``--ip``, OnDemand's ``$host``) under its ``/node/HOST/PORT/`` prefix (``--base-url``), with
the token OnDemand generated (``JUPYTER_TOKEN``, at least 16 characters): OnDemand's reverse
proxy is the tunnel, and the same token still guards every route, the dashboard's included.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import socket
import tempfile
from pathlib import Path

import dask.utils

from hpcdask import batch, config, netif, schedfile, security
from hpcdask.errors import BadInput
from hpcdask.files import atomic_write

logger = logging.getLogger("hpcdask")

TOKEN_FILE = "jupyter-token"
MIN_TOKEN = 16  # Open OnDemand's apps make theirs with create_passwd 16 (or longer)


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


def listen_address(ip: str) -> str:
    """The IPv4 address the lab listens on: ``ip``, or the address the host name ``ip``
    resolves to; it must be one of this node's (or loopback)."""
    node = socket.gethostname()
    mine = sorted(a for a in netif.interfaces().values() if a and not a.startswith("127."))
    hint = f"--ip {node}" if mine else "--ip 127.0.0.1"
    try:
        addr = socket.gethostbyname(ip)
    except OSError:
        raise BadInput(f"--ip {ip}: no such address or host name on {node}; give this node's "
                       f"name or one of its addresses ({', '.join(mine) or '127.0.0.1'}), "
                       f"e.g. {hint}") from None
    if not addr.startswith("127.") and addr not in mine:
        raise BadInput(f"--ip {ip} ({addr}) is not an address of {node} (it has "
                       f"{', '.join(mine) or 'loopback only'}); the lab can only listen here, "
                       f"e.g. {hint}")
    return addr


def base_url_of(value: str) -> str:
    """The lab's URL prefix with one slash at each end: ``/`` or ``/node/HOST/PORT/``."""
    if not value.startswith("/") or any(c in value for c in " \t\"'<>?#\\"):
        raise BadInput(f"--base-url {value!r}: give a path that starts with /, as a reverse proxy "
                       f"passes it, e.g. --base-url /node/$host/$port/ (Open OnDemand)")
    return "/" + value.strip("/") + "/" if value.strip("/") else "/"


def lab_token() -> str:
    """``JUPYTER_TOKEN`` when the caller set one (Open OnDemand's password: its connection
    file and the Connect button hold it), else a random one."""
    given = os.environ.get("JUPYTER_TOKEN")
    if given is None:
        return secrets.token_urlsafe(32)
    if len(given) < MIN_TOKEN or any(c.isspace() for c in given):
        raise BadInput(f"JUPYTER_TOKEN has {len(given)} characters (or spaces); give at least "
                       f"{MIN_TOKEN} without spaces (Open OnDemand: password=$(create_passwd "
                       f"{MIN_TOKEN})), or unset it for a random token")
    return given


def dashboard_target(info: dict) -> tuple[str, int] | None:
    """The scheduler's dashboard as this node reaches it: ``(host, port)``, or None when it has
    none or it listens on another node's loopback (then only its own ssh tunnel reaches it)."""
    port = (info.get("services") or {}).get("dashboard")
    stamp = info.get("hpcdask") or {}
    if not port:
        return None
    host = stamp.get("dashboard_host") or "127.0.0.1"
    if host == "127.0.0.1" and stamp.get("host") not in (None, socket.gethostname()):
        return None
    return host, int(port)


class DashboardOnly:
    """jupyter-server-proxy's ``host_allowlist`` for every /proxy route of the lab: the
    scheduler's dashboard (host and port), nothing else; ``DashboardOnly(None, None)`` refuses
    all. The handler's URL arguments are (host, port, path) for ``/proxy/HOST:PORT/``, (port,
    path) for ``/proxy/PORT/`` (localhost)."""

    def __init__(self, host: str | None, port: int | None) -> None:
        self.host, self.port = host, port

    def __call__(self, handler, host: str) -> bool:
        args = getattr(handler, "path_args", None) or ()
        port = args[1] if len(args) == 3 else args[0] if args else None
        hosts = {self.host, "localhost"} if self.host == "127.0.0.1" else {self.host}
        return self.port is not None and host in hosts and str(port) == str(self.port)


_TARGET: tuple[str, int] | None = None  # the dashboard the lab of this process may proxy


class _DashboardProxy:
    """jupyter-server-proxy's handlers with two changes. The lab's ``token`` query argument is
    not passed on to the dashboard (it would reach the scheduler, and jupyter-server-proxy's log
    line naming the upstream URL would print it into the job's output). A message the
    dashboard sends after the browser has left is dropped (jupyter-server-proxy 4.x raises
    WebSocketClosedError there, printed as a traceback)."""

    def get_client_uri(self, protocol, host, port, proxied_path):
        uri = super().get_client_uri(protocol, host, port, proxied_path)
        query = self.request.query
        if query and uri.endswith("?" + query):
            kept = [p for p in query.split("&") if p and p.split("=", 1)[0] != "token"]
            uri = uri[: -len(query) - 1] + ("?" + "&".join(kept) if kept else "")
        return uri

    def write_message(self, message, binary=False):
        from tornado.websocket import WebSocketClosedError

        try:
            return super().write_message(message, binary=binary)
        except WebSocketClosedError:
            return None


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    return [{"module": "hpcdask.jupyter"}]


def _load_jupyter_server_extension(serverapp) -> None:
    """The lab's /proxy routes, jupyter-server-proxy's own handlers with :class:`DashboardOnly`
    and :class:`_DashboardProxy`'s two changes, registered before jupyter-server-proxy's
    (extensions load by name), so they take those routes. Its local ``/proxy/PORT`` routes
    would otherwise reach any port of the node."""
    from jupyter_server.utils import url_path_join
    from jupyter_server_proxy.handlers import LocalProxyHandler, RemoteProxyHandler

    class Remote(_DashboardProxy, RemoteProxyHandler):
        pass

    class Local(_DashboardProxy, LocalProxyHandler):
        pass

    allow = DashboardOnly(*(_TARGET or (None, None)))
    base = serverapp.web_app.settings["base_url"]

    def route(pattern: str, handler, absolute: bool):
        return (url_path_join(base, pattern), handler,
                {"absolute_url": absolute, "host_allowlist": allow, "rewrite_response": ()})

    serverapp.web_app.add_handlers(".*", [
        route(r"/proxy/([^/:@]+):(\d+)(/.*|)", Remote, False),
        route(r"/proxy/absolute/([^/:@]+):(\d+)(/.*|)", Remote, True),
        route(r"/proxy/(\d+)(/.*|)", Local, False),
        route(r"/proxy/absolute/(\d+)(/.*|)", Local, True)])


def _lab_settings(target: tuple[str, int] | None, base_url: str, workdir: Path) -> Path:
    """The image's lab settings plus ours. Compute nodes have no internet, so the lab neither
    asks to fetch Jupyter's news nor checks for updates. With a dashboard, dask-labextension's
    panes get its URL, checked from the browser (which holds the lab's token cookie: the lab
    server's own check would be refused without it), and its cluster manager is hidden (its
    LocalCluster would run on the batch node, outside the cluster)."""
    from jupyterlab.commands import get_app_dir

    settings = workdir / "lab-settings"
    shipped = Path(get_app_dir()) / "settings"
    if shipped.is_dir():
        shutil.copytree(shipped, settings)
    settings.mkdir(exist_ok=True)
    overrides_file = settings / "overrides.json"
    overrides = json.loads(overrides_file.read_text()) if overrides_file.exists() else {}
    notes = "@jupyterlab/apputils-extension:notification"
    overrides[notes] = {**overrides.get(notes, {}), "fetchNews": "false",
                        "checkForUpdates": False}
    if target:
        host, port = target
        overrides["dask-labextension:plugin"] = {
            **overrides.get("dask-labextension:plugin", {}),
            "defaultURL": f"{base_url}proxy/{host}:{port}", "browserDashboardCheck": True,
            "hideClusterManager": True}
    overrides_file.write_text(json.dumps(overrides, indent=2) + "\n")
    return settings


def _lab_app():
    """jupyterlab's LabApp, with hpcdask.jupyter's server extension (the /proxy routes) on."""
    from jupyterlab.labapp import LabApp

    class Lab(LabApp):
        @classmethod
        def get_extension_package(cls) -> str:
            return LabApp.get_extension_package()  # jupyterlab's, not this module's

        @classmethod
        def make_serverapp(cls, **kwargs):
            kwargs["jpserver_extensions"] = {**kwargs.get("jpserver_extensions", {}),
                                             "hpcdask.jupyter": True}
            return super().make_serverapp(**kwargs)

    return Lab


def serve(scheduler_file: Path, port: int | None, root_dir: Path | None, ip: str | None = None,
          base_url: str | None = None) -> None:
    """Run JupyterLab (in this process) until it is shut down or the job ends."""
    global _TARGET

    addr = listen_address(config.get("jupyter-ip", ip))
    base_url = base_url_of(config.get("jupyter-base-url", base_url))
    token = lab_token()
    path = Path(scheduler_file).expanduser().absolute()
    info = schedfile.wait(path, dask.utils.parse_timedelta(config.get("scheduler-file-timeout")))
    if info["address"].startswith("tls://"):
        security.load(path.parent)  # private and intact, or one line naming the fix
    port = config.get("jupyter-port", port) or _free_port()
    netif.check_port_free(addr, port, "--port")
    token_file = path.parent / TOKEN_FILE
    atomic_write(token_file, token + "\n", mode=0o600)
    # Kernels inherit this process's environment; the token reaches the server by the
    # environment too, never argv (visible to every user of the node in ps).
    os.environ["HPCDASK_SCHEDULER_FILE"] = str(path)
    os.environ["JUPYTER_TOKEN"] = token
    local = addr.startswith("127.")
    if local:
        for line in tunnel_lines(port, token_file):
            logger.info(line)
    else:
        logger.info("jupyter: listening on %s:%s under %s for the reverse proxy in front "
                    "(Open OnDemand's /node/); the token is in %s", addr, port, base_url,
                    token_file)
    argv = ["--no-browser", f"--ip={addr}", f"--port={port}", "--ServerApp.port_retries=0",
            f"--ServerApp.base_url={base_url}",
            f"--ServerApp.root_dir={root_dir or Path.cwd()}",
            # Compute nodes have no internet: no news, update checks or PyPI extension search.
            "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
            "--LabApp.extension_manager=readonly"]
    if os.geteuid() == 0:  # test machines and containers; never needed as a cluster's user
        argv.append("--allow-root")
    _TARGET = target = dashboard_target(info)
    workdir = Path(tempfile.mkdtemp(prefix="hpcdask-jupyter-"))  # private scratch: 0700
    try:
        argv.append(f"--LabApp.app_settings_dir={_lab_settings(target, base_url, workdir)}")
        if target:
            # The kernels' Clients: client.dashboard_link and the notebook's widgets.
            link = f"{base_url}proxy/{target[0]}:{target[1]}/status"
            os.environ["DASK_DISTRIBUTED__DASHBOARD__LINK"] = link
            if local:
                logger.info("jupyter: the dashboard, through the lab: http://localhost:%s%s "
                            "(the same tunnel and token)", port, link)
            else:
                logger.info("jupyter: the dashboard, through the lab: %s (behind the same "
                            "proxy, the same token)", link)
        elif (info.get("services") or {}).get("dashboard"):
            logger.info("jupyter: the scheduler's dashboard is on another node's loopback; reach "
                        "it with its own tunnel (the scheduler's log prints the ssh line)")
        _lab_app().launch_instance(argv=argv)
    finally:
        token_file.unlink(missing_ok=True)
        shutil.rmtree(workdir, ignore_errors=True)
