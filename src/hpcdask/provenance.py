"""provenance.json: what a run ran on, so a later run can be checked against it.

Every ``hpcdask run`` (and so every all-in-one job, whose client is ``hpcdask run``) and every
``hpcdask client`` writes one next to its results: the image (path, the identity fields
``versions.identity()`` carries beyond Python and packages, ``image.json``), every role's
``versions.report()`` plus the Dask configuration that differs from the defaults, the job,
nodes and addresses, the TLS certificate's fingerprint (never the key), start and end
times and the exit status. ``hpcdask versions --against FILE`` compares a cluster (or this
environment) with the record.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import dask.config
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from hpcdask import batch, config, versions
from hpcdask.errors import BadInput, HpcdaskError
from hpcdask.files import atomic_write
from hpcdask.connect import cluster_info

logger = logging.getLogger("hpcdask")

KIND = "hpcdask-provenance"
FORMAT = 1
FILE = "provenance.json"


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out.update(_flatten(v, key) if isinstance(v, dict) and v else {key: v})
    return out


def _norm(key: str) -> str:
    return key.replace("_", "-")


def config_changes() -> dict[str, Any]:
    """Dask configuration keys (dotted) whose value differs from the defaults (Dask's own
    plus hpcdask.yaml), from any source: YAML files, DASK_* variables, dask.config.set."""
    defaults = {_norm(k): v for k, v in _flatten(dask.config.merge(*dask.config.defaults)).items()}
    now = {_norm(k): v for k, v in _flatten(dask.config.config).items()}
    return {k: _jsonable(v) for k, v in sorted(now.items())
            if k not in defaults or defaults[k] != v}


def _jsonable(v: Any) -> Any:
    try:
        json.dumps(v)
        return v
    except (TypeError, ValueError):
        return repr(v)


def role_record() -> dict[str, Any]:
    """One role's entry: versions.report() plus its Dask configuration changes."""
    return {**versions.report(), "dask_config": config_changes()}


def cert_fingerprint(cert: str | None) -> str | None:
    """``sha256:HEX`` of a PEM certificate given as a path or as PEM text (Security.temporary)."""
    if not cert:
        return None
    pem = cert.encode() if cert.lstrip().startswith("-----BEGIN") else Path(cert).read_bytes()
    der = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
    return "sha256:" + hashlib.sha256(der).hexdigest()


def image_record() -> dict[str, Any]:
    ident = versions.identity()
    return {
        "path": os.environ.get("APPTAINER_CONTAINER") or config.get("image"),
        # Whatever identifies the image beyond Python and packages (lock label, SIF ID, ...).
        "identity": {k: v for k, v in ident.items() if k not in ("python", "packages")},
        "info": versions.image_info(),
    }


def code_digest(folder: Path) -> dict[str, Any]:
    """The script folder's code: its git commit and whether the tree was dirty when it is a
    git work tree, else a sha256 over its ``*.py`` files (paths and contents, sorted)."""
    import subprocess

    folder = Path(folder)
    try:
        git = ["git", "-C", str(folder)]
        commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True, timeout=30).stdout.strip()
        dirty = bool(subprocess.run([*git, "status", "--porcelain"], capture_output=True,
                                    text=True, check=True, timeout=30).stdout.strip())
        return {"folder": str(folder), "git_commit": commit, "git_dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        pass
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*.py")):
        if any(part.startswith(".") or part == "__pycache__" for part in f.relative_to(folder).parts):
            continue
        h.update(str(f.relative_to(folder)).encode() + b"\0")
        try:
            h.update(f.read_bytes())
        except OSError:
            continue
    return {"folder": str(folder), "py_sha256": h.hexdigest()}


def project_record(folder: Path | None) -> dict[str, Any]:
    """The user's part of the run: the image's project layer (hpcdask.lock's sha256, the local
    packages and their versions) and the code folder's digest."""
    info = (versions.image_info() or {}).get("project", {})
    rec: dict[str, Any] = {"lock_sha256": info.get("lock_sha256"),
                           "local_packages": info.get("local_packages", {})}
    if folder is not None:
        rec["code"] = code_digest(folder)
    return rec


def job_record() -> dict[str, Any]:
    job = batch.job()
    return {"id": job.id, "array_task": job.array_task, "nodelist": job.nodelist,
            "client_host": socket.gethostname()}


class Recorder:
    """``with Recorder(folder, command) as rec: ... rec.cluster(client) ...``.

    Writes ``folder/provenance.json`` (atomically) on exit with the exit status, once the
    cluster was recorded; a run that never reached a cluster writes nothing.
    """

    def __init__(self, folder: Path, command: list[str], code_folder: Path | None = None):
        self.folder = Path(folder)
        self.record: dict[str, Any] = {
            "kind": KIND, "format": FORMAT, "command": command,
            "started": _now(), "image": image_record(), "job": job_record(),
            "project": project_record(code_folder),
        }
        self.recorded = False

    def cluster(self, client) -> None:
        """Every role's identity and configuration, the addresses, the TLS certificate."""
        roles = {"scheduler": client.run_on_scheduler(role_record)}
        for addr, rec in sorted(client.run(role_record).items()):
            roles[f"worker {addr}"] = rec
        roles["client"] = role_record()
        info = cluster_info(client)
        sec = client.security
        self.record.update(
            roles=roles,
            addresses={"scheduler": info["address"],
                       "workers": {a: w["host"] for a, w in sorted(info["workers"].items())}},
            nodes=sorted({r["host"] for r in roles.values()}),
            tls={"certificate_sha256": cert_fingerprint(getattr(sec, "tls_client_cert", None)),
                 "ca_sha256": cert_fingerprint(getattr(sec, "tls_ca_file", None))},
        )
        self.recorded = True

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if not self.recorded:
            return False
        self.record.update(ended=_now(), exit_status=exit_status(exc))
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write(self.folder / FILE,
                         json.dumps(self.record, indent=2, default=str) + "\n", mode=0o644)
        except OSError as e:  # the run's own outcome matters more than its record
            logger.warning("hpcdask: could not write %s (%s); pass --output DIR to a writable "
                           "folder", self.folder / FILE, e.strerror)
        return False


def exit_status(exc: BaseException | None) -> int:
    if exc is None:
        return 0
    if isinstance(exc, SystemExit):
        return exc.code if isinstance(exc.code, int) else 1
    if isinstance(exc, HpcdaskError):
        return exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        return 130
    return 1


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# --- checking against an earlier record ------------------------------------------------------

def load(path: Path) -> dict[str, Any]:
    """An earlier provenance.json, checked to be one (BadInput otherwise)."""
    path = Path(path)
    fix = "give the provenance.json an hpcdask run wrote (next to its metrics.json)"
    try:
        rec = json.loads(path.read_text())
    except OSError as e:
        raise BadInput(f"cannot read {path} ({e.strerror}); {fix}") from None
    except ValueError as e:
        raise BadInput(f"{path} is not JSON ({e.msg} at line {e.lineno}); {fix}") from None
    if not isinstance(rec, dict) or rec.get("kind") != KIND:
        raise BadInput(f"{path} is not an hpcdask provenance record (no \"kind\": \"{KIND}\"); {fix}")
    if rec.get("format") != FORMAT:
        raise BadInput(f"{path} has provenance format {rec.get('format')!r}, this hpcdask reads "
                       f"{FORMAT}; check it with the hpcdask version that wrote it")
    roles = rec.get("roles")
    if (not isinstance(roles, dict) or not roles or not all(
            isinstance(r, dict) and isinstance(r.get("python"), str)
            and isinstance(r.get("packages"), dict) for r in roles.values())):
        raise BadInput(f"{path} has no valid \"roles\" (each with python and packages); {fix}")
    return rec


def reference(rec: dict[str, Any]) -> dict[str, Any]:
    """The identity every role of the earlier run had: its scheduler's (else its first role's)."""
    roles = rec["roles"]
    return roles.get("scheduler") or next(iter(roles.values()))


def code_change(rec: dict[str, Any]) -> tuple[str, bool] | None:
    """How the recorded run's code folder differs from it now, and whether that is a difference
    (True) or only a note (an uncommitted tree then and now: the record cannot tell)."""
    code = (rec.get("project") or {}).get("code")
    if not isinstance(code, dict) or not code.get("folder"):
        return None
    folder = Path(code["folder"])
    if not folder.is_dir():
        return f"the code folder {folder} is gone", True
    now = code_digest(folder)
    if now != code:
        return f"the code in {folder} changed: recorded {_code(code)}, now {_code(now)}", True
    if code.get("git_dirty"):
        return (f"the code in {folder} had uncommitted changes when recorded and has now: the "
                f"record cannot tell them apart (commit before the runs you compare)"), False
    return None


def _code(c: dict[str, Any]) -> str:
    if "git_commit" in c:
        return f"git {c['git_commit'][:12]}{' with uncommitted changes' if c['git_dirty'] else ''}"
    return f"*.py sha256 {str(c.get('py_sha256'))[:12]}"


def against(rec: dict[str, Any], now: dict[str, dict[str, Any]]
            ) -> list[tuple[str, str, dict[str, str]]]:
    """Rows of versions.differences: each item any current role has differently from ``rec``."""
    return versions.differences(reference(rec), now)


def run_folder(default: Path) -> Path:
    """The folder of a new run whose output was not named: ``default`` itself, or, when that
    exists already (an earlier run's results), the first free ``default-2``, ``default-3``, ...
    next to it. Nothing of an earlier run is overwritten or deleted, so a command run again
    (``docker compose up``, ``make run``) just works. Each run claims its folder with an atomic
    mkdir, so runs started together get folders of their own. A folder named with ``--output``
    is used as given instead (and refused when it holds a run: workloads.check_output)."""
    default = Path(default)
    parent, name = default.parent, default.name
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BadInput(f"cannot create the output folder {parent} ({e.strerror}); "
                       f"pick another with --output DIR") from None
    for n in range(1, 100_000):
        folder = parent / (name if n == 1 else f"{name}-{n}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
        except OSError as e:
            raise BadInput(f"cannot create the output folder {folder} ({e.strerror}); "
                           f"pick another with --output DIR") from None
    raise BadInput(f"{parent} holds 99,999 runs named {name}-N; pick another folder with "
                   f"--output DIR")


def command_line() -> list[str]:
    return [Path(sys.argv[0]).name, *sys.argv[1:]]
