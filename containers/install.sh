#!/usr/bin/env bash
# The one install script of the hpcdask image, run by both recipes:
#   containers/dask.def   %post:  HPCDASK_RECIPE=apptainer bash /opt/hpcdask/build/install.sh
#   containers/Dockerfile RUN:    HPCDASK_RECIPE=docker    bash /opt/hpcdask/build/install.sh
# on Debian bookworm(-slim), as root, with the build inputs in $HPCDASK_BUILD (default /opt/hpcdask/build):
#   requirements.lock       exact pins + hashes of the whole runtime (setuptools included)
#   debian.lock             every Debian package of the image with its exact version
#   pyproject.toml src/             hpcdask itself
#
# Environment:
#   HPCDASK_RECIPE   apptainer | docker, recorded in /opt/hpcdask/image.json
#   HPCDASK_BUILD    folder holding the inputs above (removed at the end)
#   PIP_CERT         CA bundle for pip, when the registry is reached through a re-signing proxy;
#                    pip reads it itself, like every other PIP_* variable.
#   SOURCE_DATE_EPOCH  the "built" time of image.json; fontconfig's caches honour it too. The
#                    builders set it from the inputs' last commit (reproducible builds: every
#                    .pyc is hash-based, build logs and caches are removed, file times are set
#                    by mksquashfs / podman --timestamp).
set -euo pipefail

step() { echo "+++ install.sh: $*"; }

recipe=${HPCDASK_RECIPE:?set HPCDASK_RECIPE to apptainer or docker}
build=${HPCDASK_BUILD:-/opt/hpcdask/build}
prefix=/opt/hpcdask
venv=$prefix/venv
lock=$build/requirements.lock
debs=$build/debian.lock

case $recipe in apptainer | docker) ;; *) echo "HPCDASK_RECIPE must be apptainer or docker, not '$recipe'" >&2; exit 2 ;; esac
for f in "$lock" "$debs" "$build/pyproject.toml" "$build/src/hpcdask"; do
    [ -e "$f" ] || { echo "install.sh: missing build input $f" >&2; exit 2; }
done

mapfile -t pins < <(grep -vE '^[[:space:]]*(#|$)' "$debs" | LC_ALL=C sort)
step "Debian packages exactly as debian.lock pins them: ${#pins[@]} packages (python3, tini, graphviz, libmpich12, ... and the base's)"
export DEBIAN_FRONTEND=noninteractive
apt-get update
# Every package at its pinned version, the base's too: upgraded or downgraded to the pin.
if ! apt-get install -y --no-install-recommends --allow-downgrades "${pins[@]}" 2>"$build/apt.err"; then
    cat "$build/apt.err" >&2
    gone=$(grep -oE "Version '[^']+' for '[^']+' was not found" "$build/apt.err" | head -n1 || true)
    if [ -n "$gone" ]; then
        v=$(sed -E "s/^Version '([^']+)'.*/\1/" <<<"$gone"); p=$(sed -E "s/.* for '([^']+)'.*/\1/" <<<"$gone")
        echo "install.sh: containers/debian.lock pins $p=$v, which the Debian archive no longer serves: refresh the lock with \`make debian-lock\` and rebuild (or build from snapshot.debian.org)" >&2
        exit 2
    fi
    echo "install.sh: apt-get install of the pinned Debian packages failed (above)" >&2
    exit 1
fi
cat "$build/apt.err" >&2
# The image holds exactly the lock: nothing more (a package the base brings and the lock lacks).
extra=$(comm -23 <(dpkg-query -W -f='${db:Status-Abbrev}${Package}=${Version}\n' | sed -n 's/^ii *//p' | LC_ALL=C sort) \
                 <(printf '%s\n' "${pins[@]}"))
if [ -n "$extra" ]; then
    echo "install.sh: the image holds Debian packages containers/debian.lock does not pin: $(echo $extra): refresh the lock with \`make debian-lock\`" >&2
    exit 2
fi
python3 --version
# From here on no Python run of the build writes a .pyc: the bytecode step below writes every one,
# hash-based. (Not before: Debian's packages compile their own modules while they install.)
export PYTHONDONTWRITEBYTECODE=1
# MPICH's ABI under its upstream name: mpi4py's wheel links libmpi.so.12 (the MPICH ABI soname,
# as MPICH, Intel MPI, Cray MPICH and MVAPICH ship it); Debian names the same library
# libmpich.so.12. The ranks are started by the host's srun --mpi=pmi2, which MPICH's PMI
# client talks to: no MPI launcher is needed in the image (hpcdask mpi, README "dask-mpi").
libmpich=$(dpkg -L libmpich12 | grep '/libmpich\.so\.12$')
ln -sf libmpich.so.12 "$(dirname "$libmpich")/libmpi.so.12"
# Ask pip for the CA bundle only once ca-certificates has made it (or when PIP_CERT names another one).
if [ -n "${PIP_CERT:-}" ] && [ ! -r "$PIP_CERT" ]; then
    echo "install.sh: PIP_CERT=$PIP_CERT is not readable" >&2
    exit 2
fi

step "venv $venv"
python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip --no-cache-dir --disable-pip-version-check --no-input)

step "runtime from the lock (--require-hashes --no-deps): $(grep -cE '^[A-Za-z0-9]' "$lock") packages"
"${pip[@]}" install --no-compile --require-hashes --no-deps -r "$lock"

step "hpcdask itself (--no-deps --no-build-isolation --no-index)"
# Built from a copy: the build writes build/ and *.egg-info/ next to the sources. A fixed path,
# not mktemp's: pip records it (direct_url.json, `pip freeze`), and rebuilds must not differ.
src=/tmp/hpcdask-src
rm -rf "$src" && mkdir "$src"
cp -r "$build/pyproject.toml" "$build/src" "$src/"
"${pip[@]}" install --no-compile --no-deps --no-build-isolation --no-index "$src"
rm -rf "$src"

step "consistency: pip check"
"${pip[@]}" check

step "image identity $prefix/image.json, $prefix/requirements.lock and $prefix/debian.lock"
install -m 0644 "$lock" "$prefix/requirements.lock"
install -m 0644 "$debs" "$prefix/debian.lock"
lock_sha256=$(sha256sum "$prefix/requirements.lock" | cut -d' ' -f1)
debian_sha256=$(sha256sum "$prefix/debian.lock" | cut -d' ' -f1)
if [ -n "${SOURCE_DATE_EPOCH:-}" ]; then
    built=$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y-%m-%dT%H:%M:%SZ)
else
    built=$(date -u +%Y-%m-%dT%H:%M:%SZ)
fi
printf '{"lock_sha256": "%s", "debian_lock_sha256": "%s", "debian_packages": %d, "recipe": "%s", "built": "%s"}\n' \
    "$lock_sha256" "$debian_sha256" "${#pins[@]}" "$recipe" "$built" >"$prefix/image.json"
cat "$prefix/image.json"

step "Dask configuration $prefix/etc/dask (DASK_ROOT_CONFIG)"
mkdir -p "$prefix/etc/dask"
cat >"$prefix/etc/dask/image.yaml" <<'EOF'
# Dask defaults of the hpcdask image. DASK_ROOT_CONFIG points here instead of /etc/dask, so the
# configuration belongs to the image; ~/.config/dask and DASK_* variables still override it.
# Scratch (spill, worker folders): null means Python's tempfile.gettempdir(), i.e. ${TMPDIR:-/tmp},
# never the read-only image nor the working directory. Set it to node-local disk where there is one.
temporary-directory: null
EOF
# Every Client in the image proves its identity to the scheduler (hpcdask/proof.py).
install -m 0644 "$build/src/hpcdask/etc/hpcdask-client.yaml" "$prefix/etc/dask/hpcdask-client.yaml"

step "bytecode: every .pyc of the image hash-based (unchecked), compiled in one deterministic pass"
# Timestamp-based .pyc record their source's mtime: pip's the install time (so two builds
# differ), Debian's the package's, which no longer matches once the builder sets every file time
# to SOURCE_DATE_EPOCH (Python would then recompile those modules in memory at every start of the
# read-only image). An unchecked-hash .pyc records neither and is not checked against its source:
# the image never changes. PYTHONHASHSEED=0 and sorted paths make the marshalled code the same on
# every build.
PYTHONHASHSEED=0 "$venv/bin/python" - "$venv" <<'EOF'
import glob, importlib.util, os, py_compile, sys, sysconfig
mode, tag = py_compile.PycInvalidationMode.UNCHECKED_HASH, sys.implementation.cache_tag
done = failed = 0
def compile_one(src, opt):
    global done, failed
    cfile = importlib.util.cache_from_source(src, optimization="" if opt < 1 else opt)
    try:
        py_compile.compile(src, cfile=cfile, doraise=True, invalidation_mode=mode, optimize=opt)
        done += 1
    except (py_compile.PyCompileError, SyntaxError, UnicodeDecodeError, ValueError):
        failed += 1  # as pip: a file that does not compile (a template, py2 code) gets no .pyc
# The venv: every module (pip ran with --no-compile).
for src in sorted(glob.glob(f"{sys.argv[1]}/lib/python*/site-packages/**/*.py", recursive=True)):
    compile_one(src, -1)
# Debian's Python: the .pyc its packages' postinst wrote (py3compile), rewritten in place.
for root in (sysconfig.get_path("stdlib"), "/usr/lib/python3/dist-packages"):
    for pyc in sorted(glob.glob(f"{root}/**/__pycache__/*.{tag}*.pyc", recursive=True)):
        parts = os.path.basename(pyc).split(".")
        src = os.path.join(os.path.dirname(os.path.dirname(pyc)), parts[0] + ".py")
        if os.path.isfile(src):
            compile_one(src, int(parts[2][4:]) if parts[2].startswith("opt-") else -1)
print(f"compiled {done} modules (unchecked-hash); {failed} not compilable")
EOF

step "clean up: apt lists and caches, build logs, build inputs"
apt-get clean
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /root/.cache "$build"
# What records when the image was built, not what it holds (reproducible builds): ldconfig's
# auxiliary cache (ld.so.cache stays) and the package managers' logs.
rm -f /var/cache/ldconfig/aux-cache /var/log/*.log
rm -rf /var/log/apt/*

step "done: $("$venv/bin/python" -c 'import dask, distributed, sklearn; print("dask", dask.__version__, "distributed", distributed.__version__, "scikit-learn", sklearn.__version__)')"
