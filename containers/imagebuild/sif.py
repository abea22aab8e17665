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
3. the launch script ``#!/usr/bin/env run-singularity`` and, for a reproducible build (an
   ``epoch``, SOURCE_DATE_EPOCH), a deterministic header: every file time in the squashfs, the
   header's and the descriptors' times are the epoch, and the ID (``siftool new`` draws a random
   one) is derived from the content: the sha256 of the whole file with the ID field zeroed, as an
   RFC 9562 version-8 UUID. Two builds of the same inputs are byte-identical and share the ID;
   one changed byte anywhere gives another ID, so every role's identity check stays as strict.

Apptainer keeps the labels inside ``inspect-metadata.json`` (and ``/.singularity.d/labels.json``
in the rootfs); it writes no separate ``JSON.Labels`` object, so neither does this.

The SIF is cached beside the sandbox, under the same input key, so a second build is instant.

    python -m imagebuild.sif build [--cache DIR] [--out dask.sif]   # prints the SIF's path
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import platform
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from imagebuild import image as image_builder
from imagebuild.image import DEFAULT_CACHE, DEFFILE, REPO, BadInput, BuildError, log

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


# sylabs/sif pkg/sif: the global header (launch[32] magic[10] version[3] arch[3] id[16] ctime
# mtime dfree dtotal descoff desclen dataoff datalen) and each descriptor (datatype used id
# groupid link offset size storesize ctime mtime uid gid name[128] extra[384]), little-endian,
# packed as Go's binary.Write writes them.
HEADER = struct.Struct("<32s10s3s3s16s8q")
DESCRIPTOR = struct.Struct("<i?IIIqqqqqqq128s384s")
ID_AT = 48
NIL_ID = bytes(16)


def content_id(sif: Path) -> uuid.UUID:
    """The ID a reproducible build gives ``sif``: sha256 of the file with its ID zeroed, as an
    RFC 9562 version-8 UUID (the variant and version bits set, the rest from the hash)."""
    h = hashlib.sha256()
    with open(sif, "rb") as f:
        head = bytearray(f.read(HEADER.size))
        head[ID_AT:ID_AT + 16] = NIL_ID
        h.update(head)
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    b = bytearray(h.digest()[:16])
    b[6] = (b[6] & 0x0F) | 0x80
    b[8] = (b[8] & 0x3F) | 0x80
    return uuid.UUID(bytes=bytes(b))


def make_deterministic(sif: Path, epoch: int) -> uuid.UUID:
    """Set the times siftool took from the clock to ``epoch`` (header and every descriptor, whose
    owner fields become 0 as well) and the ID to :func:`content_id`; return the ID."""
    with open(sif, "r+b") as f:
        head = list(HEADER.unpack(f.read(HEADER.size)))
        if head[1] != b"SIF_MAGIC\0":
            raise BuildError(f"{sif}: not a SIF file")
        head[4], head[5], head[6] = NIL_ID, epoch, epoch
        dtotal, descoff = head[8], head[9]
        f.seek(0)
        f.write(HEADER.pack(*head))
        for i in range(dtotal):
            f.seek(descoff + i * DESCRIPTOR.size)
            d = list(DESCRIPTOR.unpack(f.read(DESCRIPTOR.size)))
            if not d[1]:  # an unused slot: all zero already
                continue
            d[8], d[9], d[10], d[11] = epoch, epoch, 0, 0
            f.seek(descoff + i * DESCRIPTOR.size)
            f.write(DESCRIPTOR.pack(*d))
    ident = content_id(sif)
    with open(sif, "r+b") as f:
        f.seek(ID_AT)
        f.write(ident.bytes)
    return ident


def assemble(rootfs: Path | None, deffile: bytes, out: Path, json_objects: dict[str, bytes],
             squashfs: Path | None = None, mksquashfs_args: tuple[str, ...] = (),
             epoch: int | None = None) -> Path:
    """Write the SIF ``out`` from ``rootfs`` (or an existing ``squashfs`` of it), atomically:
    a temp file renamed into place. ``mksquashfs_args``: as ``apptainer build
    --mksquashfs-args`` (none: mksquashfs's defaults, as Apptainer). ``epoch``: a reproducible
    build with that SOURCE_DATE_EPOCH (every file time, the header's times, a content ID);
    None: siftool's random ID and the clock's times."""
    require_tools()
    arch, arch_code = ARCHES.get(platform.machine(), (platform.machine(), 0))
    if not arch_code:
        raise BuildError(f"no SIF architecture code for {platform.machine()}")
    with tempfile.TemporaryDirectory(prefix=".sif-", dir=out.parent) as tmp:
        t = Path(tmp)
        squash = squashfs or t / "rootfs.squashfs"
        if squashfs is None:
            flags = ["-noappend", *mksquashfs_args] + (["-all-root"] if os.geteuid() != 0 else [])
            env = dict(os.environ)
            if epoch is not None:  # (mksquashfs orders its output deterministically by default)
                flags += ["-all-time", str(epoch), "-mkfs-time", str(epoch)]
                # mksquashfs refuses SOURCE_DATE_EPOCH beside these options, even when equal
                # (a user's `SOURCE_DATE_EPOCH=... make sif`): the options carry it.
                env.pop("SOURCE_DATE_EPOCH", None)
            log(f"mksquashfs {rootfs} ({arch})")
            subprocess.run(["mksquashfs", str(rootfs), str(squash), *flags, "-quiet", "-no-progress"],
                           check=True, stdout=sys.stderr, env=env)
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
        if epoch is not None:
            make_deterministic(sif, epoch)
        sif.chmod(0o755)  # executable: `./dask.sif ARGS` runs it through run-singularity
        os.replace(sif, out)
    return out


def build(cache: Path = DEFAULT_CACHE, def_path: Path = DEFFILE, context: Path = REPO,
          base_cache: Path | None = None) -> Path:
    """Build (or reuse) the SIF of ``def_path`` and return its path in the cache."""
    require_tools()
    sandbox = image_builder.build(cache, def_path, context, base_cache)
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
        epoch = json.loads((cache / f"image-{key}.json").read_text())["source_date_epoch"]
        assemble(sandbox, deffile, dest, objects, epoch=epoch)
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
    """Another, non-reproducible build of the same root filesystem: ``sif``'s objects in a new
    SIF with siftool's random ID (what an Apptainer that ignores SOURCE_DATE_EPOCH gives)."""
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


# --- checking an image against its source -------------------------------------------------------

def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _dump(sif: Path, dest: Path) -> dict[str, bytes | Path]:
    """Every object of ``sif``: the def and JSON objects as bytes (by name), the squashfs
    partition extracted into ``dest/rootfs`` (unsquashfs, owners kept when root)."""
    out: dict[str, bytes | Path] = {}
    for obj in objects(sif):
        kind = obj["type"].split(" ")[0]
        info = subprocess.run(["siftool", "info", obj["id"], str(sif)], capture_output=True,
                              text=True, check=True).stdout
        name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines()
                     if ln.strip().startswith("Name:")), "")
        raw = dest / f"object-{obj['id']}"
        with open(raw, "wb") as fh:
            subprocess.run(["siftool", "dump", obj["id"], str(sif)], stdout=fh, check=True)
        if kind == "FS":
            subprocess.run(["unsquashfs", "-no-progress", "-quiet", "-d", str(dest / "rootfs"),
                            str(raw)], check=True, stdout=subprocess.DEVNULL)
            raw.unlink()
            out["rootfs"] = dest / "rootfs"
        else:
            out[f"{kind} {name}".strip()] = raw.read_bytes()
    return out


def _tree(root: Path) -> dict[str, tuple]:
    """path -> (kind, mode, uid, gid, mtime, content digest or link target) of every entry."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        dirs.sort()
        for name in [*dirs, *sorted(files)]:
            p = Path(dirpath) / name
            st = p.lstat()
            if p.is_symlink():
                what = ("link", os.readlink(p))
            elif p.is_file():
                what = ("file", sha256(p))
            else:
                what = ("dir" if p.is_dir() else "other", "")
            out["/" + str(p.relative_to(root))] = (what[0], oct(st.st_mode & 0o7777), st.st_uid,
                                                   st.st_gid, int(st.st_mtime), what[1])
    return out


def _header(sif: Path) -> tuple:
    with open(sif, "rb") as f:
        return HEADER.unpack(f.read(HEADER.size))


def compare(a: Path, b: Path, limit: int = 40, report: Path | None = None) -> list[str]:
    """How SIF ``b`` differs from ``a``: one line per difference (header fields, objects, files
    of the root filesystem: content, mode, owner, time, only on one side); [] when identical.
    With diffoscope installed, its report on the two root filesystems is written to ``report``."""
    return [] if sha256(a) == sha256(b) else _differences(a, b, limit, report)


def _differences(a: Path, b: Path, limit: int, report: Path | None) -> list[str]:
    lines = []
    ha, hb = _header(a), _header(b)
    for i, field in ((4, "ID"), (5, "created"), (6, "modified")):
        if ha[i] != hb[i]:
            fmt = (lambda v: str(uuid.UUID(bytes=v))) if field == "ID" else str
            lines.append(f"header {field}: {fmt(ha[i])} != {fmt(hb[i])}")
    with tempfile.TemporaryDirectory(prefix=".sif-compare-") as tmp:
        da, db = Path(tmp, "a"), Path(tmp, "b")
        da.mkdir()
        db.mkdir()
        oa, ob = _dump(a, da), _dump(b, db)
        for name in sorted((set(oa) | set(ob)) - {"rootfs"}):
            if oa.get(name) != ob.get(name):
                lines.append(f"object {name}: differs" if name in oa and name in ob
                             else f"object {name}: only in {'the first' if name in oa else 'the second'}")
        ta = _tree(oa["rootfs"]) if "rootfs" in oa else {}
        tb = _tree(ob["rootfs"]) if "rootfs" in ob else {}
        what = ("kind", "mode", "owner", "group", "mtime", "content")
        files = []
        for path in sorted(set(ta) | set(tb)):
            if path not in ta or path not in tb:
                files.append(f"{path}: only in {'the first' if path in ta else 'the second'}")
            elif ta[path] != tb[path]:
                diff = [w for w, x, y in zip(what, ta[path], tb[path]) if x != y]
                files.append(f"{path}: {', '.join(diff)} differ{'s' if len(diff) == 1 else ''}")
        lines += files[:limit]
        if len(files) > limit:
            lines.append(f"... and {len(files) - limit} more files")
        if not files and ta:
            lines.append("root filesystem: the same files, modes, owners, times and contents")
        if files and report and shutil.which("diffoscope"):
            # The field's tool for how two builds differ, on the two root filesystems.
            subprocess.run(["diffoscope", "--text", str(report), str(oa["rootfs"]),
                            str(ob["rootfs"])], stdout=subprocess.DEVNULL, check=False)
            lines.append(f"diffoscope's report: {report}")
    return lines


def check(sif: Path, cache: Path | None = None, base_cache: Path | None = DEFAULT_CACHE,
          def_path: Path = DEFFILE, context: Path = REPO) -> tuple[list[str], str, str]:
    """Rebuild the image of this checkout in a fresh cache (removed afterwards; the base taken
    from ``base_cache``, None: debootstrapped afresh too) and compare ``sif`` with it. Returns
    (the differences, [] when identical; ``sif``'s sha256; the rebuilt SIF's sha256)."""
    if not sif.is_file():
        raise BadInput(f"{sif}: no such file; give the image to check: make sif-check SIF=path/to/dask.sif")
    with open(sif, "rb") as f:
        if f.read(HEADER.size)[32:41] != b"SIF_MAGIC":
            raise BadInput(f"{sif} is not a SIF file; give the .sif to check: make sif-check SIF=path/to/dask.sif")
    fresh = cache is None
    tmp = cache or Path(tempfile.mkdtemp(prefix="hpcdask-sif-check-", dir=DEFAULT_CACHE.parent
                                         if DEFAULT_CACHE.parent.is_dir() else None))
    try:
        rebuilt = build(tmp, def_path, context, base_cache)
        given, made = sha256(sif), sha256(rebuilt)
        diffs = [] if given == made else _differences(
            sif, rebuilt, 40, Path("sif-check.diffoscope.txt").resolve())
        return diffs, given, made
    finally:
        if fresh:
            shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build or reuse the SIF; print its path")
    b.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="cache folder (outside the repo)")
    b.add_argument("--def", dest="def_path", type=Path, default=DEFFILE)
    b.add_argument("--out", type=Path, help="also place the SIF here (e.g. dask.sif)")
    b.add_argument("--context", type=Path, default=REPO, help="the folder %%files paths are relative to")
    b.add_argument("--base-cache", type=Path, help="where the base is found or made (default: --cache)")
    c = sub.add_parser("check", help="rebuild this checkout's image in a fresh cache and say whether "
                                     "SIF is byte-identical (exit 0) or how it differs (exit 1)")
    c.add_argument("sif", type=Path)
    c.add_argument("--cache", type=Path, help="build here instead of a fresh temporary cache")
    c.add_argument("--fresh-base", action="store_true",
                   help=f"debootstrap the base afresh too (default: the one cached in {DEFAULT_CACHE})")
    c.add_argument("--def", dest="def_path", type=Path, default=DEFFILE)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "check":
            t0 = time.monotonic()
            diffs, given, made = check(args.sif, args.cache,
                                       None if args.fresh_base else DEFAULT_CACHE, args.def_path)
            took = f"rebuilt and compared in {time.monotonic() - t0:.0f} s"
            if not diffs:
                print(f"identical (sha256 {made}): {args.sif} is what this checkout builds ({took})")
                return 0
            print(f"differs: {args.sif} (sha256 {given}) is not what this checkout builds "
                  f"(sha256 {made}; {took}):")
            for line in diffs:
                print(f"  {line}")
            return 1
        sif = build(args.cache, args.def_path, args.context, args.base_cache)
        print(place(sif, args.out) if args.out else sif)
        return 0
    except BadInput as e:
        log(f"error: {e}")
        return 2
    except (BuildError, subprocess.CalledProcessError) as e:
        log(f"error: {e}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
