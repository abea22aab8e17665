"""Build the test image: a sandbox folder laid out like ``apptainer build --sandbox`` makes it.

No Apptainer and no image registry exist where the tests run, so this plays ``apptainer build``
for ``containers/dask.def`` with what there is:

1. ``containers/imagebuild/base.sh``: ``debootstrap --variant=minbase bookworm`` stands in for
   ``From: debian:bookworm-slim@sha256:...``;
2. a copy of it gets the ``%files`` (paths relative to the repository root, as ``apptainer build``
   run from the root takes them), then ``%post`` runs inside it under bubblewrap as
   ``/bin/sh -e -x``, with the host's network, its CA bundle (``PIP_CERT``) and
   ``APPTAINER_LABELS`` / ``APPTAINER_ENVIRONMENT`` like Apptainer gives them;
3. ``/.singularity.d/``: ``runscript``, ``test``, ``env/90-environment.sh``, ``runscript.help``,
   ``labels.json`` (the ``%labels`` and those ``%post`` appended) and ``Singularity`` (the def),
   as Apptainer writes them (``#!/bin/sh`` + the section body, verbatim).

The def is read with the same rules as Apptainer's own parser (``pkg/build/types/parser``): a
section starts at a line whose first word begins with ``%``, bodies are kept verbatim, the header
is ``key: value`` lines. (spython's parser rewrites bodies: it strips indentation, which breaks
heredocs, and folds ``%test`` into ``%post``; tests/unit/test_defparse.py only cross-checks the
header and ``%files`` against it.)

The result is cached outside the repository, keyed by the base and every input (the def and
each ``%files`` source), so a second build is instant. Like ``apptainer build --notest``: run
``%test`` with ``python -m imagebuild.image test IMAGE`` (through ``tests/testcluster/bin/apptainer``).

    python -m imagebuild.image build [--cache DIR]    # prints the sandbox path
    python -m imagebuild.image test IMAGE [--bind SRC:DST]...
"""

from __future__ import annotations

import argparse
import datetime
import fcntl
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFFILE = REPO / "containers" / "dask.def"
BASE_SH = REPO / "containers" / "imagebuild" / "base.sh"
RUNNER = REPO / "tests" / "testcluster" / "bin" / "apptainer"
DEFAULT_CACHE = Path(os.environ.get("HPCDASK_TEST_CACHE", "/var/cache/hpcdask-test"))
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
# Local package indexes the lock may name (--extra-index-url file://..., --find-links): bound
# read-only into the build when the host has them, so pip resolves the lock as on the host.
LOCAL_INDEXES = re.compile(r"^\s*--(?:extra-index-url|index-url|find-links)[ =](?:file://)?(/\S+)", re.MULTILINE)
BUILD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SCRIPT_SECTIONS = ("setup", "post", "environment", "runscript", "test", "startscript", "help")


class BuildError(RuntimeError):
    """A build step failed; the message names the step and what to do."""


class BadInput(BuildError):
    """A bad argument or setting: one line naming it and the fix; exit code 2."""


@dataclass
class Section:
    name: str
    args: str = ""
    body: str = ""


@dataclass
class Definition:
    """An Apptainer definition file, parsed the way Apptainer parses it."""

    raw: str
    header: dict[str, str] = field(default_factory=dict)
    sections: dict[str, Section] = field(default_factory=dict)
    files: list[tuple[str, str]] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)

    def body(self, name: str) -> str:
        return self.sections[name].body if name in self.sections else ""


VALID_SECTIONS = {
    "help", "setup", "files", "labels", "environment", "pre", "post", "runscript", "test",
    "startscript", "arguments",
}


def parse_def(text: str) -> Definition:
    """Split a def file into header, sections, %files and %labels as Apptainer does."""
    d = Definition(raw=text)
    chunks: list[list[str]] = [[]]
    for line in text.splitlines():
        words = line.split()
        if words and words[0].startswith("%"):
            chunks.append([line])
        else:
            chunks[-1].append(line)
    head, *secs = chunks
    for line in head:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        line = line.split("#", 1)[0]
        if ":" not in line:
            raise ValueError(f"def header line without 'key: value': {line!r}")
        key, val = line.split(":", 1)
        d.header[key.strip().lower()] = val.strip()
    for chunk in secs:
        first, rest = chunk[0].strip(), chunk[1:]
        name, _, args = first[1:].partition(" ")
        name = name.lower()
        if name not in VALID_SECTIONS:
            raise ValueError(f"invalid section %{name} in the def file")
        body = "\n".join(rest) + "\n" if rest else ""
        if name == "files":
            for fline in body.strip().splitlines():
                fline = fline.strip()
                if not fline or fline.startswith("#"):
                    continue
                parts = fline.split()
                src = parts[0].strip('"')
                dst = parts[1].strip('"') if len(parts) > 1 else src
                d.files.append((src, dst))
            continue
        if name == "labels":
            for lline in body.strip().splitlines():
                lline = lline.strip()
                if lline and not lline.startswith("#"):
                    key, _, val = lline.partition(" ")
                    d.labels[key.strip()] = val.strip()
        sec = d.sections.setdefault(name, Section(name))
        sec.args = args.strip()
        sec.body += body
    return d


def script(section: Section | None) -> str:
    """The file Apptainer writes for a runtime section: a shebang, a blank line, the body."""
    if section is None:
        return ""
    body = section.body.rstrip("\n")
    if body.lstrip().startswith("#!"):
        return body + "\n"
    shebang = "#!/bin/sh" + (" " + section.args.split("#")[0].strip() if section.args else "")
    return f"{shebang}\n\n{body}\n"


# --- inputs and cache ----------------------------------------------------------------------------

def _walk(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    out = []
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(x for x in dirs if x != "__pycache__" and not x.endswith(".egg-info"))
        out += [Path(root) / f for f in sorted(files) if not f.endswith((".pyc", ".pyo"))]
    return out


def input_files(defn: Definition, def_path: Path, context: Path) -> list[Path]:
    """The def and every file of its %files sources."""
    out = [def_path]
    for src, dst in defn.files:
        p = context / src
        if not p.exists():
            raise BuildError(f"%files source {src} (for {dst}) is missing in {context}")
        out += _walk(p)
    return out


# What both recipes (dask.def, Dockerfile) are made from: the last commit touching these is the
# image's time (SOURCE_DATE_EPOCH).
RECIPE_INPUTS = ("containers", "src", "pyproject.toml")


def source_date_epoch(defn: Definition, def_path: Path, context: Path) -> int:
    """The build's time (reproducible builds' SOURCE_DATE_EPOCH): the environment's when set, else
    the commit time of the last commit touching the recipes' inputs (:data:`RECIPE_INPUTS`), else
    (not a git checkout) the newest mtime of the def and its %files sources. Every time the image
    records is this one."""
    env = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if env:
        if not env.isdigit():
            raise BadInput(f"SOURCE_DATE_EPOCH={env!r} is not a number of seconds since 1970: "
                             "unset it (the inputs' last commit is used) or give e.g. "
                             "SOURCE_DATE_EPOCH=$(git log -1 --format=%ct)")
        return int(env)
    try:
        out = subprocess.run(["git", "-C", str(context), "log", "-1", "--format=%ct", "--",
                              *RECIPE_INPUTS], capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.strip().isdigit():
            return int(out.stdout.strip())
    except (OSError, subprocess.TimeoutExpired):
        pass
    return max(int(f.stat().st_mtime) for f in input_files(defn, def_path, context))


def input_key(defn: Definition, def_path: Path, base: Path, context: Path, epoch: int) -> str:
    """sha256 over the base's name, the build's time, the code that makes the image and its SIF
    (this module and sif.py), the def and every %files source (paths and contents)."""
    h = hashlib.sha256()
    h.update(base.name.encode() + b"\0" + str(epoch).encode() + b"\0")
    for builder in (Path(__file__), Path(__file__).with_name("sif.py")):
        h.update(builder.name.encode() + b"\0" + builder.read_bytes() + b"\0")
    for f in input_files(defn, def_path, context):
        name = str(f.relative_to(context)) if f.is_relative_to(context) else f.name
        h.update(name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def image_key(base: Path, def_path: Path = DEFFILE, context: Path = REPO) -> tuple[str, int]:
    """The cache key of the image ``def_path`` builds on ``base`` and its SOURCE_DATE_EPOCH."""
    defn = parse_def(def_path.read_text())
    epoch = source_date_epoch(defn, def_path, context)
    return input_key(defn, def_path, base, context, epoch)[:16], epoch


def build_base(cache: Path) -> Path:
    t0 = time.monotonic()
    out = subprocess.run(["bash", str(BASE_SH), str(cache)], stdout=subprocess.PIPE, text=True, check=False)
    if out.returncode != 0:
        raise BuildError(f"{BASE_SH} failed (exit {out.returncode}); its output is above")
    base = Path(out.stdout.strip().splitlines()[-1])
    log(f"base {base} ({time.monotonic() - t0:.1f} s)")
    return base


def log(msg: str) -> None:
    print(f"image.py: {msg}", file=sys.stderr, flush=True)


def require_tools() -> None:
    missing = [t for t in ("bwrap", "debootstrap") if shutil.which(t) is None]
    if missing:
        raise BuildError(f"missing {', '.join(missing)}: apt-get install bubblewrap debootstrap")
    if os.geteuid() != 0:
        raise BuildError("building the test image needs root (debootstrap, apt in the rootfs)")


# --- the build ---------------------------------------------------------------------------------

def copy_files(defn: Definition, context: Path, rootfs: Path) -> None:
    """%files: ``cp -fLr SRC ROOTFS/DST``, parents created, like Apptainer."""
    for src, dst in defn.files:
        target = rootfs / dst.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        log(f"%files {src} -> {dst}")
        subprocess.run(["cp", "-fLr", str(context / src), str(target)], check=True)


def bwrap_build(rootfs: Path, argv: list[str], env: dict[str, str], ro_binds: list[tuple[str, str]]) -> None:
    """Run ``argv`` as root inside ``rootfs`` (writable), with the host's network."""
    cmd = ["bwrap", "--bind", str(rootfs), "/", "--dev", "/dev", "--proc", "/proc",
           "--perms", "1777", "--tmpfs", "/tmp", "--die-with-parent", "--cap-add", "ALL", "--clearenv", "--chdir", "/"]
    for f in ("/etc/resolv.conf", "/etc/hosts"):
        if Path(f).exists():
            cmd += ["--ro-bind", f, f]
    for src, dst in ro_binds:
        cmd += ["--ro-bind", src, dst]
    for k, v in env.items():
        cmd += ["--setenv", k, v]
    # Build output goes to stderr: stdout of `image.py build` is the image path alone.
    proc = subprocess.run(cmd + argv, check=False, stdout=sys.stderr)
    if proc.returncode == 2:  # install.sh's exit code for a bad input, named in its last line
        raise BadInput(f"{' '.join(argv[:3])}... refused its input (exit 2): the line above says "
                       "what to change")
    if proc.returncode != 0:
        raise BuildError(f"{' '.join(argv[:3])}... failed in the rootfs (exit {proc.returncode})")


def singularity_d(rootfs: Path, defn: Definition, dynamic_labels: dict[str, str], epoch: int) -> None:
    sd = rootfs / ".singularity.d"
    for sub in ("env", "actions", "libs"):
        (sd / sub).mkdir(parents=True, exist_ok=True)
    env = sd / "env"
    # What Apptainer's docker bootstrap writes for debian:bookworm-slim (its image config's ENV).
    (env / "10-docker2singularity.sh").write_text(
        f"#!/bin/sh\nexport PATH=\"{BUILD_PATH}\"\n")
    (env / "90-environment.sh").write_text(script(defn.sections.get("environment"))
                                           or "#!/bin/sh\n")
    (env / "99-base.sh").write_text(
        '#!/bin/sh\nif [ -z "$LD_LIBRARY_PATH" ]; then\n    LD_LIBRARY_PATH="/.singularity.d/libs"\n'
        'else\n    LD_LIBRARY_PATH="$LD_LIBRARY_PATH:/.singularity.d/libs"\nfi\n'
        'PS1="Apptainer> "\nexport LD_LIBRARY_PATH PS1\n')
    for f in env.iterdir():
        f.chmod(0o755)
    for name, fname in (("runscript", "runscript"), ("test", "test"), ("startscript", "startscript")):
        if defn.body(name).strip():
            (sd / fname).write_text(script(defn.sections[name]))
            (sd / fname).chmod(0o755)
    if defn.body("help").strip():
        (sd / "runscript.help").write_text(defn.body("help").rstrip("\n") + "\n")
    (sd / "Singularity").write_text(defn.raw)
    for action in ("exec", "run", "test"):
        target = {"exec": '"$@"', "run": "/.singularity.d/runscript \"$@\"",
                  "test": "/.singularity.d/test \"$@\""}[action]
        a = sd / "actions" / action
        a.write_text('#!/bin/sh\nfor script in /.singularity.d/env/*.sh; do\n'
                     '    if [ -f "$script" ]; then . "$script"; fi\ndone\n'
                     f"exec {target}\n")
        a.chmod(0o755)
    for link in ("singularity", "runscript"):
        (rootfs / link).unlink(missing_ok=True)
    (rootfs / "singularity").symlink_to(".singularity.d/runscript")
    (rootfs / "environment").unlink(missing_ok=True)
    (rootfs / "environment").symlink_to(".singularity.d/env/90-environment.sh")
    labels = {
        "org.label-schema.build-arch": {"x86_64": "amd64", "aarch64": "arm64"}.get(
            platform.machine(), platform.machine()),
        # Apptainer's format; the time is SOURCE_DATE_EPOCH's, not the builder's clock.
        "org.label-schema.build-date": datetime.datetime.fromtimestamp(epoch, datetime.UTC).strftime(
            "%A_%d_%B_%Y_%H:%M:%S_%Z"),
        "org.label-schema.schema-version": "1.0",
        "org.label-schema.usage": "/.singularity.d/runscript.help",
        "org.label-schema.usage.apptainer.deffile.bootstrap": defn.header.get("bootstrap", ""),
        "org.label-schema.usage.apptainer.deffile.from": defn.header.get("from", ""),
        "org.hpcdask.test-build": "containers/imagebuild/image.py (debootstrap + bubblewrap), not apptainer",
        **defn.labels,
        **dynamic_labels,
    }
    (sd / "labels.json").write_text(json.dumps(labels, indent=4, sort_keys=True) + "\n")
    (sd / "labels.json").chmod(0o644)


def read_labels(path: Path) -> dict[str, str]:
    out = {}
    if path.exists():
        for line in path.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                k, _, v = line.partition(" ")
                out[k] = v.strip()
    return out


# Each is ~1.3 GB and every source edit makes a new one; several checkouts (worktrees) may test
# at once, each with its own sources: HPCDASK_TEST_KEEP_IMAGES keeps more.
KEEP_IMAGES = int(os.environ.get("HPCDASK_TEST_KEEP_IMAGES", "3"))


def prune(cache: Path, keep: int) -> None:
    """Remove all but the ``keep`` newest images of the cache (the base stays)."""
    done = sorted(cache.glob("image-*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    for marker in done[keep:]:
        img = marker.with_suffix("")
        log(f"pruning the older image {img}")
        marker.unlink(missing_ok=True)
        shutil.rmtree(img, ignore_errors=True)


def build(cache: Path = DEFAULT_CACHE, def_path: Path = DEFFILE, context: Path = REPO,
          base_cache: Path | None = None) -> Path:
    """Build (or reuse) the sandbox image of ``def_path`` and return its path. ``base_cache``:
    where the base is found or made (default: ``cache``)."""
    require_tools()
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".image.lock", "w") as lockf:
        fcntl.flock(lockf, fcntl.LOCK_EX)
        defn = parse_def(def_path.read_text())
        base = build_base(base_cache or cache)
        key, epoch = image_key(base, def_path, context)
        dest = cache / f"image-{key}"
        done = cache / f"image-{key}.json"
        if dest.is_dir() and done.exists():
            log(f"reusing {dest}")
            return dest
        t0 = time.monotonic()
        work = Path(tempfile.mkdtemp(prefix=f".image-{key}.", dir=cache))
        try:
            rootfs = work / "rootfs"
            log(f"copying the base into {rootfs}")
            subprocess.run(["cp", "-a", "--reflink=auto", str(base), str(rootfs)], check=True)
            copy_files(defn, context, rootfs)

            sd = rootfs / ".singularity.d"
            (sd / "env").mkdir(parents=True, exist_ok=True)
            labels_file = sd / "labels.build"
            labels_file.touch()
            env = {
                "PATH": BUILD_PATH, "HOME": "/root", "LANG": "C", "TERM": "dumb",
                "APPTAINER_ROOTFS": "/", "SINGULARITY_ROOTFS": "/",
                "APPTAINER_LABELS": "/.singularity.d/labels.build",
                "SINGULARITY_LABELS": "/.singularity.d/labels.build",
                "APPTAINER_ENVIRONMENT": "/.singularity.d/env/91-environment.sh",
                "SINGULARITY_ENVIRONMENT": "/.singularity.d/env/91-environment.sh",
            }
            env["SOURCE_DATE_EPOCH"] = str(epoch)  # reproducible builds: install.sh, fc-cache
            ro_binds = []
            ca = os.environ.get("PIP_CERT") or (str(HOST_CA) if HOST_CA.exists() else "")
            if ca:
                # Not at /etc/ssl/certs/ca-certificates.crt: the ca-certificates package writes there.
                (rootfs / "run").mkdir(exist_ok=True)
                (rootfs / "run" / "host-ca.crt").touch()
                ro_binds.append((ca, "/run/host-ca.crt"))
                env["PIP_CERT"] = "/run/host-ca.crt"
            mounts = []
            for src in sorted(set(LOCAL_INDEXES.findall(
                    "\n".join((context / s).read_text(errors="replace") for s, _ in defn.files
                              if (context / s).is_file() and s.endswith((".lock", ".txt")))))):
                if src.rstrip("/").endswith("/simple"):  # its pages link to ../../files/
                    src = str(Path(src).parent)
                if Path(src).is_dir() and not (rootfs / src.lstrip("/")).exists():
                    (rootfs / src.lstrip("/")).mkdir(parents=True)
                    mounts.append(rootfs / src.lstrip("/"))
                    ro_binds.append((src, src))
            post = defn.sections.get("post")
            if post and post.body.strip():
                log("%post")
                shell = ["/bin/sh", "-e", "-x"] + (post.args.split() if post.args else [])
                bwrap_build(rootfs, shell + ["-c", post.body], env, ro_binds)
            # Remove what the build alone needed.
            if ca:
                (rootfs / "run" / "host-ca.crt").unlink()
            for m in mounts:
                while m != rootfs and m.is_dir() and not any(m.iterdir()):
                    m.rmdir()
                    m = m.parent
            dynamic = read_labels(labels_file)
            labels_file.unlink()
            singularity_d(rootfs, defn, dynamic, epoch)
            seconds = time.monotonic() - t0
            if dest.exists():
                shutil.rmtree(dest)
            rootfs.rename(dest)
            done.write_text(json.dumps({"key": key, "base": str(base), "seconds": round(seconds, 1),
                                        "def": str(def_path), "source_date_epoch": epoch}) + "\n")
            log(f"built {dest} in {seconds:.0f} s")
            prune(cache, keep=KEEP_IMAGES)
            return dest
        finally:
            shutil.rmtree(work, ignore_errors=True)


DEBIAN_IN = REPO / "containers" / "debian.in"
DEBIAN_LOCK = REPO / "containers" / "debian.lock"


def debian_lock(cache: Path = DEFAULT_CACHE, wanted: Path = DEBIAN_IN, out: Path = DEBIAN_LOCK) -> Path:
    """``make debian-lock``: install ``wanted``'s packages into a scratch copy of the base (as
    install.sh does, no recommends) and write every package of the result with its exact
    version to ``out`` (atomically)."""
    require_tools()
    names = [ln.split("#")[0].strip() for ln in wanted.read_text().splitlines()]
    names = [n for n in names if n]
    if not names:
        raise BadInput(f"{wanted} names no package: list the Debian packages the image adds, one per line")
    base = build_base(cache)
    work = Path(tempfile.mkdtemp(prefix=".debian-lock.", dir=cache))
    try:
        rootfs = work / "rootfs"
        subprocess.run(["cp", "-a", "--reflink=auto", str(base), str(rootfs)], check=True)
        script = ("apt-get update >&2 && apt-get install -y --no-install-recommends "
                  + " ".join(names) + " >&2 && dpkg-query -W "
                  "-f='${db:Status-Abbrev}${Package}=${Version}\\n' >/root/debian.lock")
        bwrap_build(rootfs, ["/bin/sh", "-e", "-c", script],
                    {"PATH": BUILD_PATH, "HOME": "/root", "LANG": "C", "DEBIAN_FRONTEND": "noninteractive"}, [])
        pins = sorted(ln[2:].strip() for ln in (rootfs / "root/debian.lock").read_text().splitlines()
                      if ln.startswith("ii"))
        mirror = dict(ln.split("=", 1) for ln in base.with_name(base.name + ".done").read_text().split()
                      if "=" in ln).get("mirror", "?")
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(
            "# Every Debian package of the hpcdask image with its exact version: the base's (debian:\n"
            "# bookworm-slim) and those containers/debian.in asks for, with their dependencies.\n"
            f"# Made by `make debian-lock` on {time.strftime('%Y-%m-%d', time.gmtime())} from {mirror};\n"
            "# containers/install.sh installs exactly these and refuses an image that differs.\n"
            + "".join(f"{p}\n" for p in pins))
        os.replace(tmp, out)
        log(f"wrote {out}: {len(pins)} packages")
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_test(image: Path, binds: list[str] = (), cleanenv: bool = True) -> int:
    """``apptainer test IMAGE`` through the bubblewrap runner; returns its exit code."""
    cmd = [str(RUNNER), "test"] + (["--cleanenv"] if cleanenv else [])
    for b in binds:
        cmd += ["--bind", b]
    return subprocess.run(cmd + [str(image)], check=False).returncode


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build or reuse the sandbox image; print its path")
    b.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="cache folder (outside the repo)")
    b.add_argument("--def", dest="def_path", type=Path, default=DEFFILE)
    sub.add_parser("epoch", help="print the SOURCE_DATE_EPOCH the builds use (make sif, make docker)")
    dl = sub.add_parser("debian-lock", help="write containers/debian.lock from containers/debian.in")
    dl.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="cache folder (outside the repo)")
    t = sub.add_parser("test", help="run the image's %%test through tests/testcluster/bin/apptainer")
    t.add_argument("image", type=Path)
    t.add_argument("--bind", "-B", action="append", default=[])
    args = ap.parse_args(argv)
    try:
        if args.cmd == "debian-lock":
            debian_lock(args.cache)
            return 0
        if args.cmd == "epoch":
            print(source_date_epoch(parse_def(DEFFILE.read_text()), DEFFILE, REPO))
            return 0
        if args.cmd == "build":
            print(build(args.cache, args.def_path))
            return 0
        return run_test(args.image, args.bind)
    except BadInput as e:
        log(f"error: {e}")
        return 2
    except BuildError as e:
        log(f"error: {e}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
