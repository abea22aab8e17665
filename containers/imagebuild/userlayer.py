"""The project's image without Apptainer: the base SIF plus a layer holding exactly hpcdask.lock,
built as an ordinary user on the login node.

Where a real Apptainer exists, ``hpcdask image build`` writes a ``Bootstrap: localimage``
definition (:func:`definition`) and runs ``apptainer build``. Where it does not (the test cluster,
whose ``apptainer`` is a bubblewrap stand-in without ``build``), this module does what that build
does, and only the user's part of it:

1. the base SIF's squashfs partition is extracted at its offset (``unsquashfs -o``), as the user;
2. ``hpcdask.lock`` is written (``apptainer exec BASE hpcdask image lock``) when it is missing
   or stale, so it is resolved by the image's own Python and pip;
3. the image's own Python installs the lock into the image's venv inside that tree
   (``pip install --require-hashes --no-deps``; local packages built into wheels without build
   isolation, with the image's setuptools), run in bubblewrap with the tree as its root, in a
   user namespace: never root. pip's settings (``PIP_*``, the user's ``pip.conf``) apply;
4. ``/opt/hpcdask/image.json`` gains a ``project`` entry (the user lock's sha256, the local
   packages, the base's SIF ID and lock), the labels gain the same, and the tree becomes a SIF
   (:func:`imagebuild.sif.assemble`: mksquashfs + siftool, on the host).

    python -m imagebuild.userlayer build -r requirements.txt --base dask.sif -o myproject.sif

Exit codes: 2 for bad input (the lock's one-line errors pass through), 1 for a failed build;
nothing is left behind on failure.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from imagebuild.sif import assemble, go_json, inspect_metadata, objects, require_tools, sha256

IMAGE_LOCK = "opt/hpcdask/requirements.lock"
IMAGE_INFO = "opt/hpcdask/image.json"
VENV_PYTHON = "/opt/hpcdask/venv/bin/python"
# gzip as Apptainer's default, at level 4 instead of 9: measured on this image's 1.5 GB tree,
# 2 cores, mksquashfs took 78 s at 9 and 14 s at 4 for 4 % more bytes (10 s and 12 % at 1).
# Reading is as fast (gzip inflates at the same speed whatever the level).
MKSQUASHFS_ARGS = ("-comp", "gzip", "-Xcompression-level", "4")
_HEADER = re.compile(r"^# (base-lock-sha256|requirements-sha256): (\S+)$", re.M)
_LOCAL = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)\s+# local: (\S+)$", re.M)


class BadInput(Exception):
    """One line for the user; exit code 2."""


_T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[userlayer {time.monotonic() - _T0:5.1f}s] {msg}", file=sys.stderr, flush=True)


def sif_id(sif: Path) -> str:
    """The SIF's ID (header bytes 48-64, sylabs/sif), as hpcdask.sif reads it."""
    import uuid

    with open(sif, "rb") as f:
        head = f.read(64)
    if head[32:41] != b"SIF_MAGIC":
        raise BadInput(f"{sif} is not a SIF file; give --base the image's .sif ($HPCDASK_IMAGE)")
    return str(uuid.UUID(bytes=head[48:64]))


def squashfs_offset(sif: Path) -> int:
    for obj in objects(sif):
        if obj["type"].startswith("FS"):
            return int(obj["position"].split("-")[0])
    raise BadInput(f"{sif} has no root filesystem partition; give --base the image's .sif")


def lock_state(lock: Path, requirements: Path, base_lock: Path) -> str | None:
    """Why the lock must be (re)written, or None when it is current."""
    if not lock.is_file():
        return "missing"
    header = dict(_HEADER.findall(lock.read_text()))
    if header.get("base-lock-sha256") != sha256(base_lock):
        return "locked against another base image"
    if header.get("requirements-sha256") != sha256(requirements):
        return f"{requirements.name} changed"
    return None


def relock(base: Path, requirements: Path) -> None:
    """``apptainer exec BASE hpcdask image lock -r REQ`` in the project folder: the image's own
    Python and pip; its one-line errors (exit 2) pass through."""
    runner = os.environ.get("HPCDASK_RUNNER", "apptainer")
    proc = subprocess.run([runner, "exec", str(base), "hpcdask", "image", "lock", "-r",
                           requirements.name], cwd=requirements.parent, stdin=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, check=False)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("hpcdask: ")]
        raise BadInput(lines[-1].removeprefix("hpcdask: error: ") if lines
                       else f"hpcdask image lock failed: {proc.stderr.strip()[-300:]}")


def _sandboxed(tree: Path, binds: list[Path], cwd: Path, argv: list[str]) -> None:
    """``argv`` with ``tree`` as the root, in a user namespace (bubblewrap), the user's binds in;
    the mount points bubblewrap has to make inside the tree are removed afterwards."""
    made = []
    for b in binds:
        first_missing = None
        for p in [b, *b.parents]:
            if not (tree / p.relative_to("/")).exists():
                first_missing = tree / p.relative_to("/")
        if first_missing is not None:
            made.append(first_missing)
    cmd = ["bwrap", "--unshare-user", "--bind", str(tree), "/", "--proc", "/proc", "--dev", "/dev",
           "--tmpfs", "/tmp", "--ro-bind", "/etc/resolv.conf", "/etc/resolv.conf",
           "--ro-bind", "/etc/hosts", "/etc/hosts", "--die-with-parent"]
    for b in binds:
        cmd += ["--bind", str(b), str(b)]
    cmd += ["--chdir", str(cwd), "--setenv", "PATH", "/opt/hpcdask/venv/bin:/usr/bin:/bin",
            "--unsetenv", "PYTHONPATH", "--", *argv]
    try:
        subprocess.run(cmd, check=True, stdin=subprocess.DEVNULL, stdout=sys.stderr)
    finally:
        for m in made:
            shutil.rmtree(m, ignore_errors=True)


def definition(base: Path, lock: Path, local: dict[str, tuple[str, str]]) -> str:
    """The ``Bootstrap: localimage`` definition ``apptainer build`` would use (and this module
    stores as the SIF's definition, for ``apptainer inspect --deffile``)."""
    files = "\n".join(f"    {p} /opt/hpcdask/project/{Path(p).name}" for _, p in local.values())
    locals_ = " ".join(f"/opt/hpcdask/project/{Path(p).name}" for _, p in local.values())
    return (f"Bootstrap: localimage\nFrom: {base}\n\n%files\n    {lock.name} /opt/hpcdask/project.lock\n"
            f"{files}\n\n%post\n    pip=\"{VENV_PYTHON} -m pip --no-cache-dir --disable-pip-version-check\"\n"
            "    grep -v '# local: ' /opt/hpcdask/project.lock > /tmp/pins.txt\n"
            "    $pip install --require-hashes --no-deps -r /tmp/pins.txt\n"
            + (f"    $pip install --no-deps --no-build-isolation --no-index {locals_}\n" if locals_ else "")
            + "    $pip check\n")


def build(requirements: Path, base: Path, out: Path) -> Path:
    require_tools()
    if shutil.which("bwrap") is None:
        raise BadInput("bwrap is missing on this node; install bubblewrap (or build where "
                       "Apptainer is installed)")
    requirements, base, out = requirements.resolve(), base.resolve(), out.resolve()
    if not requirements.is_file():
        raise BadInput(f"{requirements} does not exist; give -r the project's requirements.txt")
    if not base.is_file():
        raise BadInput(f"the base image {base} does not exist; give --base \"$HPCDASK_IMAGE\"")
    base_id = sif_id(base)
    lock = requirements.parent / "hpcdask.lock"
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f".{out.name}-", dir=out.parent) as tmp:
        tree = Path(tmp) / "rootfs"
        try:
            _build_in(tree, Path(tmp), requirements, base, base_id, lock, out)
        finally:  # read-only folders of the image would stop the clean-up
            subprocess.run(["chmod", "-R", "u+rwX", tmp], check=False)
    log(f"built {out} in {time.monotonic() - t0:.1f} s ({out.stat().st_size / 2**20:.0f} MiB, "
        f"base {base.stat().st_size / 2**20:.0f} MiB)")
    return out


def _unsquash(sif: Path, into: Path, only: list[str] | None = None) -> None:
    """The SIF's root filesystem (or only the paths ``only``) extracted into ``into``."""
    proc = subprocess.run(["unsquashfs", "-no-xattrs", "-quiet", "-no-progress", "-o",
                           str(squashfs_offset(sif)), "-d", str(into), str(sif), *(only or [])],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False)
    # As a user, the device nodes of the image's /dev cannot be made; the runner mounts /dev.
    other = [ln for ln in proc.stderr.splitlines()
             if ln.strip() and "device" not in ln and "not superuser" not in ln]
    if proc.returncode != 0 and (other or not into.is_dir()):
        raise subprocess.CalledProcessError(proc.returncode, "unsquashfs", stderr="\n".join(other))


def _build_in(tree: Path, tmp: Path, requirements: Path, base: Path, base_id: str, lock: Path,
              out: Path) -> None:
    project = requirements.parent
    # The lock first, from the base's own lock alone: a conflict or an unknown package is said
    # in seconds, before the whole root filesystem is extracted.
    _unsquash(base, tmp / "head", [IMAGE_LOCK])
    base_lock = tmp / "base.lock"
    shutil.copyfile(tmp / "head" / IMAGE_LOCK, base_lock)
    why = lock_state(lock, requirements, base_lock)
    if why:
        log(f"locking {requirements.name} ({lock.name} {why})")
        relock(base, requirements)
    log(f"extracting {base}")
    _unsquash(base, tree)
    text = lock.read_text()
    local = {m[0]: (m[1], m[2]) for m in _LOCAL.findall(text)}
    pins = re.sub(r"^.*# local: .*$", "", text, flags=re.M)
    (Path(tmp) / "pins.txt").write_text(pins)
    shutil.copyfile(lock, tree / "opt/hpcdask/project.lock")
    shutil.copyfile(Path(tmp) / "pins.txt", tree / "opt/hpcdask/project-pins.txt")
    pip = [VENV_PYTHON, "-m", "pip", "--no-cache-dir", "--disable-pip-version-check", "--no-input"]
    binds = sorted({Path.home(), project} - {Path("/")})
    binds = [b for b in binds if not any(o != b and o in b.parents for o in binds)]
    log(f"installing {lock.name} into the image's venv")
    script = [*pip, "install", "--require-hashes", "--no-deps", "-r",
              "/opt/hpcdask/project-pins.txt"]
    if any(ln.strip() and not ln.startswith("#") for ln in pins.splitlines()):
        _sandboxed(tree, binds, project, script)
    if local:
        _sandboxed(tree, binds, project, [*pip, "install", "--no-deps", "--no-build-isolation",
                                          "--no-index", *(p for _, p in local.values())])
    _sandboxed(tree, binds, project, [*pip, "check"])
    (tree / "opt/hpcdask/project-pins.txt").unlink()
    user_sha = sha256(lock)
    info_path = tree / IMAGE_INFO
    info = json.loads(info_path.read_text())
    info["project"] = {"lock_sha256": user_sha, "base_sif_id": base_id,
                       "base_lock_sha256": sha256(base_lock),
                       "local_packages": {n: v for n, (v, _) in sorted(local.items())}}
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    labels_path = tree / ".singularity.d/labels.json"
    labels = json.loads(labels_path.read_text()) if labels_path.exists() else {}
    labels.update({"org.hpcdask.user-lock-sha256": user_sha,
                   "org.hpcdask.base-sif-id": base_id,
                   "org.hpcdask.base-lock-sha256": sha256(base_lock)})
    labels_path.write_text(json.dumps(labels, indent=2))
    deffile = definition(base, lock, local).encode()
    (tree / ".singularity.d/Singularity").write_bytes(deffile)
    objs = {"inspect-metadata.json": go_json(inspect_metadata(tree))}
    log(f"assembling {out}")
    assemble(tree, deffile, out, objs, mksquashfs_args=MKSQUASHFS_ARGS)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build the project's SIF; print its path")
    b.add_argument("-r", "--requirements", type=Path, default=Path("requirements.txt"))
    b.add_argument("--base", type=Path, required=True, help="the base image's SIF ($HPCDASK_IMAGE)")
    b.add_argument("-o", "--output", type=Path, required=True, help="the SIF to write")
    args = ap.parse_args(argv)
    try:
        print(build(args.requirements, args.base, args.output))
        return 0
    except BadInput as e:
        print(f"hpcdask: error: {e}", file=sys.stderr)
        return 2
    except (subprocess.CalledProcessError, OSError) as e:
        print(f"hpcdask: error: building {args.output} failed: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
