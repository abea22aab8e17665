"""The bench's setup: the test image (dask.sif), the bare venv of the image's Python, the Slurm
test cluster.

Each is found (or made) on first use and pinned for the run; what cannot be had raises Skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import rig
from common import RUNNER, Skip, env_clean, log

# Images the bench runs from, hard links of containers/imagebuild/image.py's cache (outside the repo).
BENCH_CACHE = Path(os.environ.get("HPCDASK_BENCH_CACHE", "/var/cache/hpcdask-bench"))

_VERSION = "import sys, sysconfig; print(sys.version.replace(chr(10), ' '), sysconfig.get_config_var('BUILD_GNU_TYPE'))"


class Setup:
    def __init__(self, args, tmp: Path):
        self.args, self.tmp = args, tmp
        self._image: str | Exception | None = None
        self._sandbox: str | None = None
        self.image_info: dict = {}
        self.cluster_state: str | None = None  # None: not tried; "up"/"started"/error text
        self._rig = None
        self.bare_info: dict = {}

    def bare(self) -> dict:
        """The image's own interpreter and site-packages run straight on the host, no runtime.

        {"prefix": the hpcdask command, "env": its environment}: the image's
        /usr/bin/python3.11 (the same CPython build, its own stdlib) with the image venv's
        site-packages on PYTHONPATH and the image's Dask config, i.e. what the image's
        %environment sets, minus the container (namespaces, mounts, the runner's start).
        """
        if self.bare_info.get("prefix"):
            return self.bare_info
        self.image()
        image = Path(self._sandbox)
        exe = image / "usr" / "bin" / "python3.11"
        site = image / "opt" / "hpcdask" / "venv" / "lib" / "python3.11" / "site-packages"
        if not (exe.exists() and (site / "hpcdask").is_dir()):
            raise Skip(f"{image} has no usr/bin/python3.11 or no hpcdask in its venv")
        env = {**env_clean(), "PYTHONNOUSERSITE": "1", "PYTHONPATH": str(site),
               "DASK_ROOT_CONFIG": str(image / "opt" / "hpcdask" / "etc" / "dask"),
               "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}
        env.pop("VIRTUAL_ENV", None)
        bare_v = subprocess.run([str(exe), "-c", _VERSION], capture_output=True, text=True,
                                env=env, timeout=60).stdout.strip()
        image_v = subprocess.run([str(RUNNER), "exec", self.image(), "python", "-c", _VERSION],
                                 capture_output=True, text=True, timeout=120,
                                 env=env_clean()).stdout.strip()
        if not bare_v or bare_v != image_v:
            raise Skip(f"the image's Python run bare ({bare_v or 'failed'}) is not the one the "
                       f"runner starts ({image_v or 'failed'})")
        self.bare_info = {"prefix": [str(exe), "-m", "hpcdask"], "env": env,
                          "python": bare_v, "image_python": image_v,
                          "how": f"{exe} -m hpcdask, PYTHONPATH={site}"}
        return self.bare_info

    def image(self) -> str:
        """The test image as a SIF file (HPCDASK_IMAGE=.../dask-<key>.sif, as the rig and the
        jobscript tests use it), pinned for this run; raises Skip.

        The sandbox of the current sources if containers/imagebuild/image.py has it cached (else it is
        built, up to --image-timeout; with --quick the newest cached image is used instead and
        recorded as stale), assembled into a SIF by containers/imagebuild/sif.py. The sandbox is only that
        build step (and the bare side's files: ``bare``). Both are hard-linked into BENCH_CACHE
        first, so another build pruning the shared cache cannot remove them mid-run.
        """
        if isinstance(self._image, Exception):
            raise self._image
        if self._image:
            return self._image
        try:
            self._sandbox = self._find_image()
            self._image = self._find_sif(Path(self._sandbox))
            self.image_info.update(path=self._image, sandbox=self._sandbox)
            return self._image
        except subprocess.TimeoutExpired:
            self._image = Skip(f"image build took longer than {self.args.image_timeout}s")
            raise self._image from None
        except Skip as e:
            self._image = e
            raise
        except Exception as e:
            self._image = Skip(f"image: {type(e).__name__}: {e}")
            raise self._image from None

    def _find_image(self) -> str:
        if self.args.image:
            self.image_info = {"source": "--image"}
            path = Path(self.args.image)
            if not (path / "opt" / "hpcdask").is_dir():
                raise Skip(f"{path} is not an hpcdask image sandbox (the SIF is assembled from it)")
            return str(path)
        if not shutil.which("bwrap"):
            raise Skip("bubblewrap (bwrap) is not installed: no image runner "
                       "(bash tests/setup-host.sh installs it)")
        from imagebuild import image as imagepy

        t0 = time.perf_counter()
        cache = imagepy.DEFAULT_CACHE
        base = imagepy.build_base(cache)
        key, _ = imagepy.image_key(base)
        mine = BENCH_CACHE / f"image-{key}"
        shared = cache / f"image-{key}"
        info = {"key": key, "current_sources": True}
        if mine.is_dir():
            info["source"] = f"bench cache {BENCH_CACHE}"
        else:
            if not (shared.is_dir() and (cache / f"image-{key}.json").exists()):
                if self.args.quick:
                    done = sorted(cache.glob("image-*.json"), key=lambda p: p.stat().st_mtime)
                    done = [d for d in done if d.with_suffix("").is_dir()]
                    if not done:
                        raise Skip("no test image cached and --quick does not build one "
                                   "(make image, or run the full bench once)")
                    shared = done[-1].with_suffix("")
                    mine = BENCH_CACHE / shared.name
                    info.update(key=shared.name[len("image-"):], current_sources=False)
                    log(f"image: the current sources' image is not cached; --quick uses the "
                        f"newest cached one, {shared.name} (stale)")
                else:
                    log("image: python -m imagebuild.image build (not cached: builds)")
                    proc = subprocess.run([sys.executable, "-m", "imagebuild.image", "build"],
                                          capture_output=True, text=True,
                                          timeout=self.args.image_timeout,
                                          stdin=subprocess.DEVNULL)
                    if proc.returncode != 0:
                        raise Skip(f"image build failed (exit {proc.returncode}): "
                                   f"{' / '.join(proc.stderr.strip().splitlines()[-3:])}")
                    shared = Path(proc.stdout.strip().splitlines()[-1])
                    mine = BENCH_CACHE / shared.name
            if not mine.is_dir():
                BENCH_CACHE.mkdir(parents=True, exist_ok=True)
                for old in BENCH_CACHE.glob("image-*"):
                    shutil.rmtree(old, ignore_errors=True)
                part = BENCH_CACHE / f".{mine.name}.partial"
                shutil.rmtree(part, ignore_errors=True)
                subprocess.run(["cp", "-al", str(shared), str(part)], check=True)
                part.rename(mine)
            info["source"] = f"{shared} (hard-linked into {BENCH_CACHE})"
        info["lookup_or_build_s"] = round(time.perf_counter() - t0, 1)
        self.image_info = info
        return str(mine)

    def _find_sif(self, sandbox: Path) -> str:
        """The SIF of ``sandbox``: containers/imagebuild/sif.py's cached dask-<key>.sif, else assembled
        here (mksquashfs + siftool, as sif.py does), hard-linked into BENCH_CACHE."""
        from imagebuild import sif as sifpy

        key = sandbox.name.removeprefix("image-")
        mine = BENCH_CACHE / f"dask-{key}.sif"
        if mine.is_file():
            return str(mine)
        t0 = time.perf_counter()
        shared = sifpy.DEFAULT_CACHE / f"dask-{key}.sif"
        if not shared.is_file():
            log(f"image: assembling {shared.name} from {sandbox} (containers/imagebuild/sif.py)")
            try:
                sifpy.require_tools()
                deffile = (sandbox / ".singularity.d" / "Singularity").read_bytes()
                objs = {"inspect-metadata.json": sifpy.go_json(sifpy.inspect_metadata(sandbox)),
                        "oci-config.json": sifpy.go_json(sifpy.BOOKWORM_SLIM_CONFIG)}
                sifpy.assemble(sandbox, deffile, shared, objs)
            except (sifpy.BuildError, subprocess.CalledProcessError, OSError) as e:
                raise Skip(f"SIF assembly failed: {e}") from None
        BENCH_CACHE.mkdir(parents=True, exist_ok=True)
        for old in BENCH_CACHE.glob("dask-*.sif"):
            old.unlink(missing_ok=True)
        sifpy.place(shared, mine)
        self.image_info.update(sif_source=str(shared), sif_mib=round(mine.stat().st_size / 2**20),
                               sif_s=round(time.perf_counter() - t0, 1))
        return str(mine)

    def rig(self):
        """The strict Slurm test cluster (rig.py: the tests' SlurmCluster handle), brought up
        with this run's SIF as the users' HPCDASK_IMAGE if it is down; raises Skip."""
        if self._rig is not None:
            return self._rig
        if self.cluster_state not in (None, "up", "started"):
            raise Skip(self.cluster_state)
        try:
            if os.geteuid() != 0:
                raise Skip("needs root (network namespaces, slurmd)")
            if not shutil.which("slurmctld"):
                raise Skip("Slurm is not installed (make cluster-deps)")
            image = self.image()
            self.cluster_state = "starting"
            log(f"cluster: instance {os.environ.get('HPCDASK_CLUSTER_INSTANCE', '0')}, "
                f"tests/testcluster/cluster.sh up unless it is up")
            self._rig, started = rig.connect(image)
            self.cluster_state = "started" if started else "up"
            return self._rig
        except Skip as e:
            self.cluster_state = str(e)
            raise
        except Exception as e:
            self.cluster_state = f"cluster setup failed: {type(e).__name__}: {str(e)[-400:]}"
            raise Skip(self.cluster_state) from None

    def teardown(self) -> None:
        if self._rig is not None:  # the run's folders in hpcuser's home
            shutil.rmtree(self._rig.workdir, ignore_errors=True)
        if self.cluster_state in ("started", "starting"):
            log("cluster: tests/testcluster/cluster.sh down (this run started it)")
            rig.down()
            self.cluster_state = "stopped again"
