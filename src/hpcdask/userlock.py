"""The user's layer over the image: ``hpcdask.lock``, resolved by pip against the image's lock.

``hpcdask image lock -r requirements.txt`` runs with the image's own Python (``apptainer exec
$HPCDASK_IMAGE hpcdask image lock ...``), so pip resolves for the image's Python and platform,
with the image's venv (exactly the base lock) as the installed environment and the base lock's
pins as constraints: a requirement can add packages but never move one the image pins. Only
the additions are written, with their sha256 hashes; the base's pins stay the base's.

pip's own resolver is used (``pip install --dry-run --report``, pip >= 22.2) rather than
pip-compile: it is already in the image (no new package in the base lock), it reads pip's own
settings (``PIP_INDEX_URL``, ``PIP_FIND_LINKS``, ``PIP_NO_INDEX``, ``pip.conf``) so a site mirror
or an offline wheelhouse works, and it sees the installed environment, which pip-compile does not.
The hashes are those of the files pip fetches (``pip download --no-deps``), so the lock holds
what was resolved, from wherever pip found it. Local packages are built without build
isolation, with the image's own setuptools (in the base lock), so they build offline too.

The lock's header records the base lock's and the requirements file's sha256: a lock whose base
or requirements changed since is stale (:func:`stale`) and ``hpcdask image build`` re-locks.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from hpcdask.errors import BadInput, HpcdaskError
from hpcdask.versions import canonical, read_lock

BASE_LOCK = "/opt/hpcdask/requirements.lock"  # the image's lock (containers/dask.def)
LOCK_NAME = "hpcdask.lock"
_HEADER = re.compile(r"^# (base-lock-sha256|requirements-sha256|requirements|python|platform): (\S+)$")
_LOCAL = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)\s+# local: (\S+)$")


class LockError(HpcdaskError, RuntimeError):
    """pip failed for a reason that is not the user's input (exit code 1)."""


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def base_lock_path() -> Path:
    """The image's lock: $HPCDASK_BASE_LOCK, else the image's own file."""
    return Path(os.environ.get("HPCDASK_BASE_LOCK", BASE_LOCK))


@dataclass
class UserLock:
    """What ``hpcdask.lock`` holds: its header, the pinned additions with their hashes, and the
    local packages (built into wheels at image build time, so no hash)."""

    base_lock_sha256: str
    requirements_sha256: str
    requirements: str = "requirements.txt"
    python: str = ""
    platform: str = ""
    pins: dict[str, tuple[str, list[str]]] = field(default_factory=dict)  # name -> (version, hashes)
    local: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> (version, path)

    def text(self) -> str:
        out = ["# hpcdask.lock: the project's packages over the image's lock; written by",
               f"#   hpcdask image lock -r {self.requirements}",
               "# Do not edit: change the requirements and lock again.",
               f"# base-lock-sha256: {self.base_lock_sha256}",
               f"# requirements-sha256: {self.requirements_sha256}",
               f"# requirements: {self.requirements}",
               f"# python: {self.python}",
               f"# platform: {self.platform}"]
        for name, (version, hashes) in sorted(self.pins.items()):
            out.append(f"{name}=={version}" + "".join(f" \\\n    --hash=sha256:{h}" for h in hashes))
        for name, (version, path) in sorted(self.local.items()):
            out.append(f"{name}=={version}  # local: {path}")
        return "\n".join(out) + "\n"


def parse(path: Path) -> UserLock:
    """Read an ``hpcdask.lock``; BadInput when it is not one (no header)."""
    text = Path(path).read_text()
    header = {}
    for line in text.splitlines():
        m = _HEADER.match(line)
        if m:
            header[m.group(1)] = m.group(2)
    if "base-lock-sha256" not in header or "requirements-sha256" not in header:
        raise BadInput(f"{path} is not an hpcdask.lock (no base-lock-sha256/requirements-sha256 "
                       "header); remove it and run: hpcdask image lock -r requirements.txt")
    lock = UserLock(header["base-lock-sha256"], header["requirements-sha256"],
                    header.get("requirements", "requirements.txt"), header.get("python", ""),
                    header.get("platform", ""))
    joined = re.sub(r"\\\n\s*", " ", text)
    for line in joined.splitlines():
        line = line.strip()
        m = _LOCAL.match(line)
        if m:
            lock.local[canonical(m.group(1))] = (m.group(2), m.group(3))
            continue
        if line.startswith("#") or "==" not in line:
            continue
        spec, *hashes = line.split(" --hash=sha256:")
        name, _, version = spec.strip().partition("==")
        lock.pins[canonical(name)] = (version.strip(), [h.strip() for h in hashes])
    return lock


def stale(lock_path: Path, requirements: Path, base_lock: Path) -> str | None:
    """Why ``lock_path`` is out of date (missing, other base, other requirements), or None."""
    if not Path(lock_path).is_file():
        return f"{lock_path} is missing"
    lock = parse(lock_path)
    if lock.base_lock_sha256 != sha256(base_lock):
        return f"{lock_path} was locked against another base image lock"
    if lock.requirements_sha256 != sha256(requirements):
        return f"{requirements} changed since {lock_path} was written"
    return None


def _pip(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False,
                          stdin=subprocess.DEVNULL)


def _pip_error(stderr: str, requirements: Path, base: dict[str, str]) -> HpcdaskError:
    """pip's resolver messages as one line: a conflict with the image's pins, an unknown
    package, or pip's last error line."""
    wanted = re.findall(r"The user requested (?!\(constraint\))(\S+)", stderr)
    pinned = re.findall(r"The user requested \(constraint\) (\S+)", stderr)
    m = re.search(r"Cannot install (.+?) because", stderr)
    if m and not pinned:  # pip names the requirement only; the pin is the base lock's
        wanted = [m.group(1).split(",")[0].strip()]
        name = canonical(re.split(r"[<>=!~ \[;]", wanted[0])[0])
        pinned = [f"{name}=={base[name]}"] if name in base else []
    if wanted and pinned:
        return BadInput(f"{requirements} asks for {wanted[0]} but the image pins {pinned[0]}; "
                        f"loosen that line in {requirements} (or build a new base image)")
    m = re.search(r"No matching distribution found for (\S+)", stderr)
    if m:
        return BadInput(f"no distribution found for {m.group(1)} (from {requirements}) with pip's "
                        "settings (PIP_INDEX_URL, PIP_FIND_LINKS, PIP_NO_INDEX, pip.conf); check "
                        "the name, or put its wheel into your PIP_FIND_LINKS folder")
    m = re.search(r"(?:Invalid requirement|does not appear to be a Python project|"
                  r"is not a valid editable requirement).*", stderr)
    if m:
        return BadInput(f"{requirements}: {m.group(0).strip()}")
    errors = [ln.removeprefix("ERROR: ").strip() for ln in stderr.splitlines() if ln.startswith("ERROR")]
    return LockError(f"pip could not resolve {requirements}: "
                     f"{errors[-1] if errors else stderr.strip()[-300:]}")


def _local_paths(requirements: Path) -> set[str]:
    """Requirement lines that are local folders in pip's syntax (``./mypkg``, ``../x``, ``/abs``)."""
    out = set()
    for line in requirements.read_text().splitlines():
        line = line.split(" #")[0].strip()
        if line.startswith(("-e ", "--editable ")):
            raise BadInput(f"{requirements}: editable {line.split()[-1]} cannot go into an image; "
                           f"write it as a plain path ({line.split()[-1]})")
        if line.startswith((".", "/")):
            out.add(line)
    return out


def resolve(requirements: Path, base_lock: Path | None = None) -> UserLock:
    """Resolve ``requirements`` against ``base_lock`` (constraints) with this Python's pip."""
    requirements = Path(requirements)
    if not requirements.is_file():
        raise BadInput(f"{requirements} does not exist; give the project's requirements: "
                       "hpcdask image lock -r requirements.txt")
    base_lock = base_lock or base_lock_path()
    if not base_lock.is_file():
        raise BadInput(f"the image's lock {base_lock} is missing; run inside the image: "
                       "apptainer exec $HPCDASK_IMAGE hpcdask image lock -r requirements.txt")
    base = read_lock(base_lock)
    folder = requirements.resolve().parent
    locals_ = _local_paths(requirements)
    with tempfile.TemporaryDirectory(prefix="hpcdask-lock-") as tmp:
        constraints = Path(tmp, "constraints.txt")
        constraints.write_text("".join(f"{n}=={v}\n" for n, v in sorted(base.items())))
        report = Path(tmp, "report.json")
        proc = _pip("install", "--dry-run", "--no-build-isolation", "--report", str(report),
                    "-c", str(constraints), "-r", str(requirements.resolve()), cwd=folder)
        if proc.returncode != 0:
            raise _pip_error(proc.stderr, requirements, base)
        items = json.loads(report.read_text()).get("install", [])
        lock = UserLock(sha256(base_lock), sha256(requirements), requirements.name,
                        platform.python_version(), f"{sys.platform}-{platform.machine()}")
        remote = []
        for item in items:
            name = canonical(item["metadata"]["name"])
            version = item["metadata"]["version"]
            if name in base:
                continue  # pinned by the image (installed elsewhere than here): the base's
            info = item.get("download_info", {})
            if "dir_info" in info:
                url = info.get("url", "")
                path = next((p for p in locals_ if Path(folder, p).resolve().as_uri() == url), url)
                lock.local[name] = (version, path)
            else:
                remote.append(f"{name}=={version}")
        if remote:
            wheels = Path(tmp, "files")
            proc = _pip("download", "--no-deps", "--quiet", "-d", str(wheels), *remote, cwd=folder)
            if proc.returncode != 0:
                raise _pip_error(proc.stderr, requirements, base)
            for spec in remote:
                name, _, version = spec.partition("==")
                lock.pins[name] = (version, [])
            for f in sorted(wheels.iterdir()):
                stem = canonical(f.name.split("-")[0])
                for name in lock.pins:
                    if canonical(name).replace("-", "_") == stem.replace("-", "_"):
                        lock.pins[name][1].append(sha256(f))
    return lock


def write(requirements: Path, output: Path | None = None, base_lock: Path | None = None) -> Path:
    """Resolve and write ``hpcdask.lock`` beside the requirements (atomically: nothing is written
    when resolving fails)."""
    lock = resolve(requirements, base_lock)
    output = output or Path(requirements).resolve().parent / LOCK_NAME
    tmp = output.with_name(f".{output.name}.tmp")
    tmp.write_text(lock.text())
    tmp.replace(output)
    return output
