"""The checks behind ``hpcdask versions`` and ``hpcdask preflight``: each yields its report as
(line, to_stderr) pairs and raises or returns whether everything matched; the CLI only prints."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from hpcdask import batch, config, connect, files, memory, netif, provenance, sif, versions, warm
from hpcdask.errors import BadInput

Lines = Iterator[tuple[str, bool]]  # (line, to stderr)


def lock(path: Path) -> Lines:
    """This environment against a lock file; a "lock mismatch" line per difference."""
    diffs = versions.lock_differences(path)
    for line in diffs:
        yield f"lock mismatch: {line}", True
    if not diffs:
        yield (f"installed set equals {path} ({len(versions.read_lock(path))} packages); "
               f"image {versions.image_label()}"), False


def this_environment(show_all: bool = False) -> Lines:
    ident = versions.identity()
    yield f"python {ident['python']}  image {ident['image']}", False
    for name in versions.KEY_PACKAGES:
        yield f"{name} {ident['packages'].get(name, '-')}", False
    debian = versions.debian_packages()
    if debian:  # the image's Debian layer, pinned like the Python one (containers/debian.lock)
        info = versions.image_info() or {}
        yield (f"debian {len(debian)} packages, debian.lock sha256 "
               f"{str(info.get('debian_lock_sha256', '-'))[:16]}: "
               + ", ".join(f"{n} {debian[n]}" for n in versions.KEY_DEBIAN if n in debian)), False
        if show_all:
            for name, version in debian.items():
                yield f"  {name} {version}", False


def cluster(scheduler_file: Path, tls: bool, show_all: bool) -> Lines:
    """Every role of the cluster against the scheduler; a MISMATCH line and table on stderr."""
    sched = connect.scheduler_identity_of(scheduler_file, tls)
    rows = versions.differences(sched, {"client": versions.report()})
    if not rows:  # the scheduler refuses a differing client, so compare with it first
        with connect.connect(scheduler_file, tls=tls, check=False) as c:
            reports = connect.cluster_reports(c)
        sched = reports.pop("scheduler")
        rows = versions.differences(sched, reports)
    else:
        reports = {"client": versions.report()}
    if show_all or not rows:
        keys = ["python", "image", *versions.KEY_PACKAGES]
        shown = [(k, versions._flat(sched).get(k, "-"),
                  {r: versions._flat(v).get(k, "-") for r, v in reports.items()}) for k in keys]
        yield versions.table(shown), False
    if rows:
        yield f"MISMATCH: {versions.summary(rows)}", True
        yield versions.table(rows), True
    else:
        yield f"all {len(reports) + 1} roles identical ({len(sched['packages'])} packages)", False


def against(path: Path, scheduler_file: Path | None, tls: bool) -> Lines:
    """The cluster (or this environment) against an earlier run's provenance.json."""
    old = provenance.load(path)
    if scheduler_file:
        with connect.connect(scheduler_file, tls=tls, check=False) as c:
            now = connect.cluster_reports(c)
    else:
        now = {"this environment": versions.report()}
    rows = provenance.against(old, now)
    ref = provenance.reference(old)
    code = provenance.code_change(old)
    if rows:
        yield (f"DIFFERENT from {path} (run of {old.get('started', '?')}): "
               f"{versions.summary(rows)}"), True
        yield versions.table(rows, ref_name="recorded"), True
    elif not (code and code[1]):
        yield (f"same as {path}: {len(now)} role(s), python {ref['python']}, image "
               f"{ref.get('image')}, {len(ref['packages'])} packages"), False
    if code:
        yield (f"DIFFERENT code from {path}: {code[0]}" if code[1] else f"note: {code[0]}"), code[1]


def preflight(interface: str | None, scheduler_file: Path | None, memory_limit: str | None,
              nworkers: int | None, local_directory: str | None) -> Iterator[str]:
    """This node's settings, one "ok" line per check; BadInput at the first failure."""
    iface = config.get("interface", interface)
    yield f"ok interface {iface}: {netif.address_of(iface)}"
    if scheduler_file:
        folder = files.private_dir(Path(scheduler_file).expanduser().absolute().parent,
                                   what="scheduler file folder")
        yield f"ok scheduler file folder {folder}: private and writable"
    alloc = batch.allocation()
    n = config.get("nworkers", nworkers)
    threads, mem = memory.worker_sizing(n, None, config.get("memory-limit", memory_limit), alloc,
                                        **memory.reserves(server=warm.enabled(n)))
    if mem > alloc.memory:
        raise BadInput(f"memory limit {mem} B per worker exceeds this node's allocation "
                       f"({alloc.memory} B from {alloc.source}); lower --memory-limit")
    yield f"ok sizing from {alloc.source}: {threads} thread(s), {mem // 2**20} MiB per worker"
    yield f"ok local directory {files.local_directory(local_directory)}: writable"
    yield f"ok image {versions.image_label()}"


def runs_from(image: str) -> None:
    """Refuse (BadInput) unless this process runs in ``image``: a scheduler started here would
    otherwise differ from the workers that run in it (a .sif: the same SIF, by its ID)."""
    if versions.image_info() is None:
        raise BadInput("this process runs outside the image, so the scheduler it starts would "
                       "differ from the workers; run it in the image: apptainer exec "
                       f"{image} python YOUR_SCRIPT.py (or pass require_image=False knowingly)")
    if not Path(image).is_file():
        return
    # The workers see their .sif's ID (bound onto the image's placeholder); so must we.
    try:
        theirs = sif.read_header(image).id
    except (OSError, ValueError) as e:
        raise BadInput(f"image {image}: {e}; point image= / HPCDASK_IMAGE at a .sif or a "
                       "sandbox folder") from None
    if sif.image_id() != theirs:
        raise BadInput(f"this process does not run from {image} (SIF {theirs}; here: "
                       f"{sif.image_id() or 'no SIF visible'}), so its scheduler would refuse "
                       f"the workers; run it as: apptainer exec --bind {image}:{sif.IMAGE_SIF}:ro "
                       f"{image} python YOUR_SCRIPT.py")
