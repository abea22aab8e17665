"""Build dask.sif without Apptainer: the test image's root filesystem, assembled into a SIF file
the way ``apptainer build`` does it.

The root filesystem is the sandbox ``containers/imagebuild/image.py`` builds (debootstrap base + the
def's own sections); this module only assembles it, following apptainer/apptainer
``internal/pkg/build/assemblers/sif.go`` (``createSIF``) and ``internal/pkg/build/metadata.go``:

1. the root filesystem as squashfs: ``mksquashfs ROOTFS FILE -noappend`` (``-all-root`` when
   not root), as ``SIFAssembler.Assemble`` runs it;
2. the data objects, in Apptainer's order, all in group 1:
   the definition file (``Def.FILE``, no name), then the JSON objects by name
   (``JSON.Generic``): ``inspect-metadata.json`` (what ``apptainer inspect --all`` says of the
   rootfs: labels, def, runscript, test, help, environment) and ``oci-config.json`` (the base
   image's OCI config, written for ``Bootstrap: docker``), then the squashfs as the primary
   system partition (``FS``, ``Squashfs/*System/<arch>``);
3. a new random ID in the header (``siftool new``) and the launch script
   ``#!/usr/bin/env run-singularity``.

Apptainer keeps the labels inside ``inspect-metadata.json`` (and ``/.singularity.d/labels.json``
in the rootfs); it writes no separate ``JSON.Labels`` object, so neither does this.

The SIF is cached beside the sandbox, under the same input key, so a second build is instant.

    python -m imagebuild.sif build [--cache DIR] [--out dask.sif]   # prints the SIF's path
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from imagebuild import image as image_builder
from imagebuild.image import DEFAULT_CACHE, DEFFILE, REPO, BuildError, log

LAUNCH = b"#!/usr/bin/env run-singularity\n"
# siftool's --partarch numbers (sylabs/sif pkg/sif arch codes) and Go's GOARCH names.
ARCHES = {"x86_64": ("amd64", 2), "i686": ("386", 1), "armv7l": ("arm", 3), "aarch64": ("arm64", 4),
          "ppc64": ("ppc64", 5), "ppc64le": ("ppc64le", 6), "s390x": ("s390x", 11),
          "riscv64": ("riscv64", 12)}
# siftool --datatype: 1 Deffile, 4 Partition, 6 GenericJSON; --partfs 1 Squash; --parttype 2 PrimSys
DEFFILE_T, PARTITION_T, JSON_T, SQUASH_FS, PRIMSYS = 1, 4, 6, 1, 2
KEEP_SIFS = int(os.environ.get("HPCDASK_TEST_KEEP_IMAGES", "2"))  # as image.KEEP_IMAGES
# The config of the image `From:` names (debian:bookworm-slim): what Apptainer's OCI
# conveyor packer stores as oci-config.json for `Bootstrap: docker`.
BOOKWORM_SLIM_CONFIG = {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                        "Cmd": ["bash"]}


def require_tools() -> None:
    missing = [t for t in ("mksquashfs", "siftool") if shutil.which(t) is None]
    if missing:
        raise BuildError(f"missing {', '.join(missing)}: apt-get install squashfs-tools siftool")


def go_json(obj) -> bytes:
    """``json.Marshal`` of Go: compact, map keys sorted, <, > and & escaped."""
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    for ch, esc in (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e"),
                    ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(ch, esc)
    return text.encode()


def inspect_metadata(rootfs: Path) -> dict:
    """What ``apptainer inspect --all ROOTFS`` reports (cmd/internal/cli/inspect.go), as the
    build stores it: each file's content with trailing newlines trimmed."""
    sd = rootfs / ".singularity.d"

    def text(p: Path) -> str:
        return p.read_text().rstrip("\n") if p.is_file() else ""

    env = {}
    for pattern in ("10-docker*.sh", "9*-environment.sh"):
        for f in sorted((sd / "env").glob(pattern)):
            env[f"/{f.relative_to(rootfs)}"] = text(f)
    attrs = {
        "environment": env,
        "labels": json.loads((sd / "labels.json").read_text()) if (sd / "labels.json").exists() else {},
        "runscript": text(sd / "runscript"),
        "test": text(sd / "test"),
        "helpfile": text(sd / "runscript.help"),
        "deffile": text(sd / "Singularity"),
        "startscript": text(sd / "startscript"),
    }
    # Go's `omitempty`: empty strings and maps are left out.
    return {"data": {"attributes": {k: v for k, v in attrs.items() if v}}, "type": "container"}


def assemble(rootfs: Path | None, deffile: bytes, out: Path, json_objects: dict[str, bytes],
             squashfs: Path | None = None, mksquashfs_args: tuple[str, ...] = ()) -> Path:
    """Write the SIF ``out`` from ``rootfs`` (or an existing ``squashfs`` of it), atomically:
    a temp file renamed into place. ``mksquashfs_args``: as ``apptainer build
    --mksquashfs-args`` (none: mksquashfs's defaults, as Apptainer)."""
    require_tools()
    arch, arch_code = ARCHES.get(platform.machine(), (platform.machine(), 0))
    if not arch_code:
        raise BuildError(f"no SIF architecture code for {platform.machine()}")
    with tempfile.TemporaryDirectory(prefix=".sif-", dir=out.parent) as tmp:
        t = Path(tmp)
        squash = squashfs or t / "rootfs.squashfs"
        if squashfs is None:
            flags = ["-noappend", *mksquashfs_args] + (["-all-root"] if os.geteuid() != 0 else [])
            log(f"mksquashfs {rootfs} ({arch})")
            subprocess.run(["mksquashfs", str(rootfs), str(squash), *flags, "-quiet", "-no-progress"],
                           check=True, stdout=sys.stderr)
        sif = t / "image.sif"
        (t / "def").write_bytes(deffile)
        steps = [["new", str(sif)],
                 ["add", "--datatype", str(DEFFILE_T), "--groupid", "1", "--filename", "", str(sif),
                  str(t / "def")]]
        for name in sorted(json_objects):
            (t / name).write_bytes(json_objects[name])
            steps.append(["add", "--datatype", str(JSON_T), "--groupid", "1", "--filename", name,
                          str(sif), str(t / name)])
        steps.append(["add", "--datatype", str(PARTITION_T), "--groupid", "1", "--filename", "",
                      "--partfs", str(SQUASH_FS), "--parttype", str(PRIMSYS),
                      "--partarch", str(arch_code), str(sif), str(squash)])
        for step in steps:
            subprocess.run(["siftool", *step], check=True, stdout=subprocess.DEVNULL)
        with open(sif, "r+b") as f:  # siftool new leaves the launch script empty
            f.write(LAUNCH.ljust(32, b"\0"))
        sif.chmod(0o755)  # executable: `./dask.sif ARGS` runs it through run-singularity
        os.replace(sif, out)
    return out


def build(cache: Path = DEFAULT_CACHE, def_path: Path = DEFFILE, context: Path = REPO) -> Path:
    """Build (or reuse) the SIF of ``def_path`` and return its path in the cache."""
    require_tools()
    sandbox = image_builder.build(cache, def_path, context)
    key = sandbox.name.removeprefix("image-")
    dest = cache / f"dask-{key}.sif"
    with open(cache / ".sif.lock", "w") as lockf:
        fcntl.flock(lockf, fcntl.LOCK_EX)
        if dest.is_file():
            log(f"reusing {dest}")
            return dest
        t0 = time.monotonic()
        # The def the rootfs was built from (image.py writes it there, as Apptainer does).
        deffile = (sandbox / ".singularity.d" / "Singularity").read_bytes()
        objects = {"inspect-metadata.json": go_json(inspect_metadata(sandbox)),
                   "oci-config.json": go_json(BOOKWORM_SLIM_CONFIG)}
        assemble(sandbox, deffile, dest, objects)
        log(f"assembled {dest} in {time.monotonic() - t0:.0f} s "
            f"({dest.stat().st_size / 2**20:.0f} MiB)")
        for old in sorted(cache.glob("dask-*.sif"), key=lambda p: p.stat().st_mtime,
                          reverse=True)[KEEP_SIFS:]:
            log(f"pruning the older SIF {old}")
            old.unlink(missing_ok=True)
        return dest


def objects(sif: Path) -> list[dict[str, str]]:
    """``siftool list`` of ``sif`` as rows (id, group, link, position, type)."""
    out = subprocess.run(["siftool", "list", str(sif)], capture_output=True, text=True, check=True)
    rows = [[c.strip() for c in line.split("|")] for line in out.stdout.splitlines()
            if "|" in line and not line.startswith("ID")]
    return [dict(zip(("id", "group", "link", "position", "type"), r)) for r in rows]


def renew(sif: Path, out: Path) -> Path:
    """Another build of the same root filesystem: ``sif``'s objects in a new SIF (a new ID)."""
    with tempfile.TemporaryDirectory(prefix=".renew-", dir=out.parent) as tmp:
        dumped, names = {}, {}
        for obj in objects(sif):
            f = Path(tmp) / obj["id"]
            with open(f, "wb") as fh:
                subprocess.run(["siftool", "dump", obj["id"], str(sif)], stdout=fh, check=True)
            info = subprocess.run(["siftool", "info", obj["id"], str(sif)], capture_output=True,
                                  text=True, check=True).stdout
            name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines()
                         if ln.strip().startswith("Name:")), "")
            dumped[obj["type"].split(" ")[0]] = dumped.get(obj["type"].split(" ")[0], []) + [f]
            names[f] = name
        jsons = {names[f]: f.read_bytes() for f in dumped["JSON.Generic"]}
        return assemble(None, dumped["Def.FILE"][0].read_bytes(), out, jsons,
                        squashfs=dumped["FS"][0])


def place(sif: Path, out: Path) -> Path:
    """``out`` becomes the cached SIF: a hard link when possible (same build, same ID), else a copy."""
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(sif, tmp)
    except OSError:
        shutil.copyfile(sif, tmp)
        tmp.chmod(0o755)
    os.replace(tmp, out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build or reuse the SIF; print its path")
    b.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="cache folder (outside the repo)")
    b.add_argument("--def", dest="def_path", type=Path, default=DEFFILE)
    b.add_argument("--out", type=Path, help="also place the SIF here (e.g. dask.sif)")
    args = ap.parse_args(argv)
    try:
        sif = build(args.cache, args.def_path)
        print(place(sif, args.out) if args.out else sif)
        return 0
    except (BuildError, subprocess.CalledProcessError) as e:
        log(f"error: {e}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
