"""The bubblewrap runner (tests/testcluster/bin/apptainer) held to Apptainer's behaviour, row by row.

Each row of the tables below names the Apptainer source file, end-to-end test or documentation
page it follows (apptainer/apptainer at 917d665, 2026-08). The rows run against the tiny image
both as a SIF file (squashfuse, or extraction) and as a sandbox folder (conftest.py).

Where the runner does NOT follow Apptainer (and what depends on it):

- SIF mounts: Apptainer mounts the squashfs inside the container's own mount namespace, so
  nothing outlives it; the runner mounts with the host's squashfuse in the caller's namespace and
  unmounts on exit and on TERM/INT/HUP/QUIT/USR1/USR2, but a SIGKILLed runner leaves the mount
  (and squashfuse) behind until the job's processes are killed. Nothing in hpcdask depends on it.
- Bind points missing in the image: Apptainer's underlay creates them in the container's own
  root; the runner puts a tmpfs over the deepest image folder on the way and binds that folder's
  entries back read-only (the same view; a tmpfs, not a bind of the image's folder).
- /etc/hosts, /etc/resolv.conf, /etc/localtime: bound only over a file the image has (for
  /etc/localtime, the target of its symlink); Apptainer's underlay creates them. The dask image
  has all three; the tiny test image gets an empty /etc/hosts for that reason.
- /etc/passwd and /etc/group: Apptainer always binds generated copies with the caller appended;
  the runner only when the image has no entry for the caller's uid/gid. Nothing depends on it.
- --env-file is evaluated by the container host's /bin/sh with `set -a`, not by Apptainer's
  embedded interpreter (mvdan.cc/sh): the same for plain `K=V`/`export K=V`/quoted lines.
- Not reproduced at all: --containall/--contain, overlays and --writable, instances, --fakeroot,
  --nv/--rocm, --no-env, --app, OCI mode, shell/build/pull (each fails loudly, exit 1 or 255).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from testcluster.nobody import run_as_nobody

REPO = Path(__file__).resolve().parents[3]
RUNNER = REPO / "tests" / "testcluster" / "bin" / "apptainer"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
IMAGE_PATH = f"/opt/tiny/bin:{DEFAULT_PATH}"  # what the tiny image's %environment makes

SRC = "apptainer/apptainer "
CREATE = SRC + "internal/pkg/util/env/create.go"
ACTION = SRC + "internal/pkg/util/fs/files/action_script.sh"
INJECT = SRC + "internal/pkg/runtime/engine/apptainer/process_linux.go: injectEnvHandler"
RUNTIMEVARS = SRC + "internal/pkg/util/fs/files/runtime_vars.sh"
LAUNCHER = SRC + "internal/pkg/runtime/launch/launcher_linux.go"
E2E_ENV = SRC + "e2e/env/env.go"
CLI = SRC + "cmd/internal/cli/apptainer.go"
INSPECT = SRC + "cmd/internal/cli/inspect.go"
ENV_DOC = "https://apptainer.org/docs/user/main/environment_and_metadata.html"
BIND_DOC = "https://apptainer.org/docs/user/main/bind_paths_and_mounts.html"
FUSE_DOC = "https://apptainer.org/docs/user/main/fakeroot.html (unprivileged SIF: squashfuse or extraction)"


def runner(*args: str, env: dict[str, str], cwd: Path | None = None, timeout: float = 120):
    return subprocess.run([str(RUNNER), *args], capture_output=True, text=True, check=False,
                          env=env, cwd=cwd, timeout=timeout)


@pytest.fixture(params=["sif", "sandbox"])
def image(request, tiny_sif, sandbox) -> Path:
    return tiny_sif if request.param == "sif" else sandbox


@pytest.fixture
def scratch(tmp_path) -> Path:
    """An empty folder for TMPDIR: the runner's temporary mounts and sandboxes go there."""
    d = tmp_path / "scratch"
    d.mkdir()
    return d


@pytest.fixture
def base_env(tmp_path) -> dict[str, str]:
    """A small, known host environment (the test's own would leak into every row)."""
    home = tmp_path / "home"
    home.mkdir()
    return {"PATH": os.environ["PATH"], "HOME": str(home), "TERM": "xterm", "USER": "tester",
            "LANG": "en_US.UTF-8"}


# --- environment -----------------------------------------------------------------------------

@dataclass
class EnvRow:
    id: str
    cite: str
    script: str                      # run as /bin/sh -c SCRIPT in the container
    expect: str                      # its exact stdout (without the trailing newline)
    env: dict[str, str] = field(default_factory=dict)
    opts: tuple[str, ...] = ()
    stderr: str = ""                 # a line stderr must contain (INFO:/WARNING:)


ENV_ROWS = [
    EnvRow("host-var-passes", f"{CREATE}: SetContainerEnv; {ENV_DOC} (Environment from the host)",
           'echo "$HOST_ONLY"', "from-host", {"HOST_ONLY": "from-host"}),
    EnvRow("multi-line-host-var", f"{E2E_ENV}: TestMultiLine", 'printf %s "$MULTI"', "Hello\nWorld",
           {"MULTI": "Hello\nWorld"}),
    EnvRow("invalid-name-dropped", f"{E2E_ENV}: TestInvalidKey", "env | grep -c BASH_FUNC || true", "0",
           {"BASH_FUNC_ml%%": "() { echo x; }"}),
    EnvRow("image-beats-host", f"{ACTION}: env scripts after clear_env; restore_env restores only unset",
           'echo "$OVERRIDDEN"', "image", {"OVERRIDDEN": "host"}),
    EnvRow("unset-in-image-is-undone", f"{ACTION}: restore_env (apptainer issues #2563, #2890)",
           'echo "${UNSET_BY_IMAGE-unset}"', "host", {"UNSET_BY_IMAGE": "host"}),
    EnvRow("empty-in-image-unsets", f"{ACTION}: restore_env ('empty variables are also unset')",
           'echo "${EMPTIED-unset}"', "unset", {"EMPTIED": "host"}),
    EnvRow("apptainerenv-beats-image", f"{CREATE}: overridesForContainerEnv; {INJECT}; {ENV_DOC}",
           'echo "$OVERRIDDEN"', "apptainerenv", {"APPTAINERENV_OVERRIDDEN": "apptainerenv"}),
    EnvRow("apptainerenv-beats-host", f"{E2E_ENV}: TestImageOverrideHost", 'echo "$FOO"', "foo",
           {"FOO": "bar", "APPTAINERENV_FOO": "foo"}),
    EnvRow("env-option-beats-apptainerenv",
           f"{LAUNCHER}: setEnvVars; {E2E_ENV}: TestImageCgoEnabledOverrideEnvOptionPrecedence",
           'echo "$OVERRIDDEN"', "cli", {"APPTAINERENV_OVERRIDDEN": "apptainerenv"},
           ("--env", "OVERRIDDEN=cli")),
    EnvRow("env-option-empty", f"{E2E_ENV}: TestImageCgoEnabledOverrideEmpty",
           'echo "[${OVERRIDDEN-unset}]"', "[]", {}, ("--env", "OVERRIDDEN=")),
    EnvRow("singularityenv-works", f"{CREATE}: ApptainerEnvPrefixes, warnDeprecatedEnvUsage",
           'echo "$LEGACY"', "old", {"SINGULARITYENV_LEGACY": "old"},
           stderr="INFO:    Environment variable SINGULARITYENV_LEGACY is set, but APPTAINERENV_LEGACY is preferred"),
    EnvRow("apptainerenv-beats-singularityenv", f"{CREATE}: warnDeprecatedEnvUsage", 'echo "$X"', "new",
           {"SINGULARITYENV_X": "old", "APPTAINERENV_X": "new"},
           stderr="WARNING: SINGULARITYENV_X and APPTAINERENV_X have different values, using the latter"),
    EnvRow("apptainer-vars-not-forwarded", f"{CREATE}: SetContainerEnv ('Not forwarding')",
           'echo "${APPTAINER_FOO-unset}"', "unset", {"APPTAINER_FOO": "1"}),
    EnvRow("home-not-overridable", f"{CREATE}: alwaysOmitKeys (HOME not permitted)",
           'test "$HOME" != /elsewhere && echo kept', "kept", {"APPTAINERENV_HOME": "/elsewhere"},
           stderr="WARNING: Overriding HOME environment variable with APPTAINERENV_HOME is not permitted"),
    EnvRow("host-path-not-passed", f"{CREATE}: alwaysOmitKeys PATH, DefaultPath; {E2E_ENV}: CustomPath",
           'echo "$PATH"', IMAGE_PATH, {"PATH_EXTRA": "x"}),
    EnvRow("prepend-path", f"{RUNTIMEVARS}; {E2E_ENV}: PrependToCustomPath", 'echo "$PATH"',
           f"/foo:{IMAGE_PATH}", {"APPTAINERENV_PREPEND_PATH": "/foo"}),
    EnvRow("append-path", f"{RUNTIMEVARS}; {E2E_ENV}: AppendToCustomPath", 'echo "$PATH"',
           f"{IMAGE_PATH}:/foo", {"APPTAINERENV_APPEND_PATH": "/foo"}),
    EnvRow("overwrite-path", f"{RUNTIMEVARS}; {E2E_ENV}: OverwriteCustomPath", 'echo "$PATH"',
           "/usr/bin:/bin", {"APPTAINERENV_PATH": "/usr/bin:/bin"}),
    EnvRow("env-option-path", f"{E2E_ENV}: apptainerEnvOption DefaultPathOverride", 'echo "$PATH"',
           "/usr/bin:/bin", {}, ("--env", "PATH=/usr/bin:/bin")),
    EnvRow("host-ld-library-path-dropped", f"{CREATE}: alwaysOmitKeys LD_LIBRARY_PATH; "
           f"{E2E_ENV}: TestDefaultLdLibraryPath", 'echo "$LD_LIBRARY_PATH"', "/.singularity.d/libs",
           {"LD_LIBRARY_PATH": "/host/lib"}),
    EnvRow("custom-ld-library-path", f"{INJECT} (+ :/.singularity.d/libs); {E2E_ENV}: TestCustomLdLibraryPath",
           'echo "$LD_LIBRARY_PATH"', "/foo:/.singularity.d/libs", {}, ("--env", "LD_LIBRARY_PATH=/foo")),
    EnvRow("cleanenv-drops-host", f"{CREATE}: mustAddToProcessEnv; {ENV_DOC} (--cleanenv)",
           'echo "${HOST_ONLY-unset} ${USER-unset} $LANG $TERM $https_proxy $FROM_IMAGE"',
           "unset unset C xterm http://proxy:3128 yes",
           {"HOST_ONLY": "x", "https_proxy": "http://proxy:3128"}, ("--cleanenv",)),
    EnvRow("cleanenv-keeps-overrides", f"{CREATE}: overridesForContainerEnv runs with --cleanenv too",
           'echo "$KEEP"', "yes", {"APPTAINERENV_KEEP": "yes"}, ("-e",)),
    EnvRow("apptainer-name", f"{ENV_DOC} (APPTAINER_NAME); {LAUNCHER}", 'echo "$APPTAINER_NAME"',
           "{name}"),
    EnvRow("apptainer-container", f"{ENV_DOC} (APPTAINER_CONTAINER); {LAUNCHER}: SetProcessEnvWithPrefixes",
           'echo "$APPTAINER_CONTAINER"', "{path}"),
    EnvRow("apptainer-command", f"{ACTION}: __apptainer_cmd__", 'echo "$APPTAINER_COMMAND"', "exec"),
]


@pytest.mark.parametrize("row", ENV_ROWS, ids=[r.id for r in ENV_ROWS])
def test_environment(row: EnvRow, image, base_env):
    expect = row.expect.format(name=image.name, path=image.resolve())
    r = runner("exec", *row.opts, str(image), "/bin/sh", "-c", row.script,
               env={**base_env, **row.env})
    assert r.returncode == 0, f"{row.cite}\n{r.stderr}"
    assert r.stdout.removesuffix("\n") == expect, row.cite
    assert row.stderr in r.stderr, row.cite


def test_env_file_is_evaluated_and_loses_to_env_option(image, base_env, tmp_path):
    """--env-file is read by a shell; --env wins over it, with Apptainer's warning.
    (launcher_linux.go setEnvVars; e2e/env/env.go apptainerEnvFile
    DefaultPathOverrideEnvOptionPrecedence)"""
    f = tmp_path / "vars.env"
    f.write_text('# a comment\nexport QUOTED="a b"\nOVERRIDDEN=file\nFROMFILE=$QUOTED!\n')
    r = runner("exec", "--env-file", str(f), "--env", "OVERRIDDEN=cli", str(image),
               "/bin/sh", "-c", 'echo "$QUOTED|$OVERRIDDEN|$FROMFILE"', env=base_env)
    assert (r.returncode, r.stdout) == (0, "a b|cli|a b!\n"), r.stderr
    assert "WARNING: Ignored environment file variable OVERRIDDEN: override from --env" in r.stderr


# --- binds -----------------------------------------------------------------------------------

def test_default_binds(image, base_env, tmp_path):
    """$HOME, $PWD (also the working directory), /tmp, /var/tmp, /proc, /sys, /dev,
    /etc/hosts, /etc/resolv.conf, /etc/localtime are the host's ({BIND_DOC}: System-defined
    bind paths; apptainer etc/conf/apptainer.conf: mount home/tmp/proc/sys/dev/hostfs)."""
    home = Path(base_env["HOME"])
    (home / "in-home").write_text("h")
    work = tmp_path / "work"
    work.mkdir()
    (work / "in-pwd").write_text("w")
    var_tmp = Path(f"/var/tmp/conformance-{os.getpid()}")
    tmp = Path(f"/tmp/conformance-{os.getpid()}")
    script = (f'pwd; cat "$HOME/in-home" in-pwd; echo; echo v > {var_tmp}; echo t > {tmp};'
              ' readlink /proc/self/ns/net; test -c /dev/null && echo dev;'
              ' test -d /sys/kernel && echo sys;'
              ' for f in /etc/hosts /etc/resolv.conf /etc/localtime; do cksum < $f; done')
    try:
        r = runner("exec", str(image), "/bin/sh", "-c", script, env=base_env, cwd=work)
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        assert lines[:2] == [str(work), "hw"]
        assert var_tmp.read_text() == "v\n" and tmp.read_text() == "t\n"
        assert lines[2:5] == [os.readlink("/proc/self/ns/net"), "dev", "sys"]
        host = [subprocess.run(f"cksum < {f}", shell=True, capture_output=True, text=True).stdout.strip()
                for f in ("/etc/hosts", "/etc/resolv.conf", "/etc/localtime")]
        assert lines[5:] == host
    finally:
        var_tmp.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)


def test_no_home(image, base_env):
    """--no-home: $HOME is not mounted ({BIND_DOC}: --no-home)."""
    check = f'grep -c " {base_env["HOME"]} " /proc/self/mountinfo || true'
    with_home = runner("exec", str(image), "/bin/sh", "-c", check, env=base_env, cwd="/")
    without = runner("exec", "--no-home", str(image), "/bin/sh", "-c", check, env=base_env, cwd="/")
    assert (with_home.stdout.strip(), without.stdout.strip()) == ("1", "0"), without.stderr


@pytest.mark.parametrize("how", ["--bind", "-B", "APPTAINER_BIND", "APPTAINER_BINDPATH"])
def test_user_binds(how, image, base_env, tmp_path):
    """-B/--bind src:dst[:ro], comma lists, and the APPTAINER_BIND / APPTAINER_BINDPATH
    variables ({BIND_DOC}: User-defined bind paths)."""
    src = tmp_path / "data"
    src.mkdir()
    (src / "f").write_text("data\n")
    spec = f"{src}:/mnt:ro,{src}:/srv"
    opts, env = ((how, spec), base_env) if how.startswith("-") else ((), {**base_env, how: spec})
    r = runner("exec", *opts, str(image), "/bin/sh", "-c",
               "cat /mnt/f; touch /mnt/x 2>/dev/null || echo ro; echo rw > /srv/g", env=env)
    assert (r.returncode, r.stdout) == (0, "data\nro\n"), r.stderr
    assert (src / "g").read_text() == "rw\n"


def test_missing_bind_source_is_fatal(image, base_env):
    r = runner("exec", "-B", "/no/such/dir:/mnt", str(image), "true", env=base_env)
    assert r.returncode == 255 and r.stderr.startswith("FATAL:")


# --- exit codes and stderr -------------------------------------------------------------------

@dataclass
class ExitRow:
    id: str
    cite: str
    args: tuple[str, ...]            # "{image}" stands for the image
    code: int
    stderr_start: str


EXIT_ROWS = [
    ExitRow("payload-code", f"{ACTION}: exec \"$@\" (the payload's status is the runner's)",
            ("exec", "{image}", "/bin/sh", "-c", "exit 7"), 7, ""),
    ExitRow("missing-command", f"{ACTION}: exec of a missing command (the shell's 127)",
            ("exec", "{image}", "/no/such/command"), 127, ""),
    ExitRow("missing-image", f"{LAUNCHER}: 'could not open image' via sylog.Fatalf (exit 255)",
            ("exec", "/no/such/image.sif", "true"), 255, "FATAL:   could not open image"),
    ExitRow("bad-flag", f"{CLI}: flag error -> 'Error for command' + usage, os.Exit(1)",
            ("exec", "--no-such-flag", "{image}", "true"), 1, 'Error for command "exec": unknown flag'),
    ExitRow("run-runscript", f"{ACTION}: run -> /.singularity.d/runscript",
            ("run", "{image}", "a"), 3, ""),
]


@pytest.mark.parametrize("row", EXIT_ROWS, ids=[r.id for r in EXIT_ROWS])
def test_exit_codes(row: ExitRow, image, base_env):
    r = runner(*[a.format(image=image) for a in row.args], env=base_env)
    assert r.returncode == row.code, f"{row.cite}\n{r.stderr}"
    assert r.stderr.startswith(row.stderr_start), row.cite


def test_not_a_sif_file(base_env, tmp_path):
    bad = tmp_path / "bad.sif"
    bad.write_bytes(b"#!/bin/sh\n" + b"\0" * 200)
    r = runner("exec", str(bad), "true", env=base_env)
    assert r.returncode == 255 and "image format not recognized" in r.stderr


def test_one_line_errors_survive_apptainers_info_lines(tiny_sif, base_env, scratch):
    """Apptainer's own INFO/WARNING lines (here those of --unsquash: 'Converting SIF file to
    temporary sandbox...', 'Cleaning up image...', launcher_linux.go prepareImage and
    engine/apptainer/cleanup_linux.go) come on stderr around the payload's; a payload's one-line
    error and its exit code 2 pass through untouched."""
    r = runner("exec", "--unsquash", str(tiny_sif), "/bin/sh", "-c",
               'echo "hpcdask: error: bad --size: use small, medium or large" >&2; exit 2',
               env={**base_env, "TMPDIR": str(scratch)})
    assert r.returncode == 2
    lines = r.stderr.splitlines()
    assert lines == ["INFO:    Converting SIF file to temporary sandbox...",
                     "hpcdask: error: bad --size: use small, medium or large",
                     "INFO:    Cleaning up image..."]
    ours = [x for x in lines if not x.startswith(("INFO:", "WARNING:", "VERBOSE:", "DEBUG:"))]
    assert len(ours) == 1


# --- SIF handling ----------------------------------------------------------------------------

def test_sif_mount_is_read_only_and_removed(tiny_sif, base_env, scratch):
    """The SIF's squashfs is mounted read-only and gone afterwards ({FUSE_DOC})."""
    env = {**base_env, "TMPDIR": str(scratch)}
    r = runner("exec", str(tiny_sif), "/bin/sh", "-c", "touch /opt/x 2>&1; grep -c ' / ' /proc/self/mountinfo",
               env=env)
    assert "Read-only file system" in r.stdout, r.stderr
    assert list(scratch.iterdir()) == []
    assert str(scratch) not in Path("/proc/self/mountinfo").read_text()


def test_sif_unmounted_on_sigterm(tiny_sif, base_env, scratch):
    env = {**base_env, "TMPDIR": str(scratch)}
    p = subprocess.Popen([str(RUNNER), "exec", str(tiny_sif), "/bin/sh", "-c",
                          'trap "exit 42" TERM; echo ready; while :; do sleep 0.05; done'],
                         stdout=subprocess.PIPE, text=True, env=env)
    assert p.stdout.readline() == "ready\n"
    assert any(scratch.iterdir())
    p.send_signal(signal.SIGTERM)
    p.stdout.close()
    assert p.wait(timeout=30) == 42
    deadline = time.monotonic() + 10
    while any(scratch.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert list(scratch.iterdir()) == []
    assert str(scratch) not in Path("/proc/self/mountinfo").read_text()


def test_unsquash_reports_the_temporary_sandbox(tiny_sif, base_env, scratch):
    """With --unsquash Apptainer sets APPTAINER_CONTAINER to the extracted sandbox
    (launcher_linux.go prepareImage: SetProcessEnvWithPrefixes(..., "CONTAINER", imageDir))."""
    r = runner("exec", "--unsquash", str(tiny_sif), "/bin/sh", "-c", 'echo "$APPTAINER_CONTAINER"',
               env={**base_env, "TMPDIR": str(scratch)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"{scratch}/rootfs-") and r.stdout.rstrip().endswith("/root")
    assert list(scratch.iterdir()) == []


@pytest.mark.parametrize("flag, expect", [
    ("--labels", "org.example.tiny: yes\norg.example.url: https://example.org/?a=1&b=<2>\n"),
    ("--runscript", '#!/bin/sh\n\necho "runscript: $*"\nexit 3\n'),
    ("--deffile", "Bootstrap: localimage\nFrom: base\n\n%runscript\n    echo runscript\n"),
    ("--helpfile", "tiny: a test image\n"),
])
def test_inspect(flag, expect, image, base_env):
    """inspect prints each attribute, labels as sorted 'key: value' lines (inspect.go); on a SIF
    it reads the inspect-metadata.json object (getInspectMetadataFromSIF)."""
    r = runner("inspect", flag, str(image), env=base_env)
    assert (r.returncode, r.stdout) == (0, expect), r.stderr


def test_inspect_json(image, base_env):
    r = runner("inspect", "--json", "--labels", str(image), env=base_env)
    got = json.loads(r.stdout)
    assert got["type"] == "container"
    assert got["data"]["attributes"]["labels"]["org.example.tiny"] == "yes"


def test_test_action(image, base_env):
    r = runner("test", str(image), env=base_env)
    assert (r.returncode, r.stdout) == (0, "test-script-ran\n"), r.stderr


# --- an ordinary user ------------------------------------------------------------------------

def test_runs_as_an_unprivileged_user(tiny_sif):
    """Unprivileged Apptainer (no setuid) runs a SIF with squashfuse or, when FUSE is not
    usable (here /dev/fuse is root-only), by extraction ({FUSE_DOC}); the payload runs as the
    caller, and what it writes in a bound folder is the caller's."""
    with tempfile.TemporaryDirectory(prefix="conformance-nobody-") as d:
        _run_as_nobody(tiny_sif, Path(d))


def _run_as_nobody(tiny_sif: Path, tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o755)  # pytest's own folders are private to root
    sif = tmp_path / "tiny.sif"
    sif.write_bytes(tiny_sif.read_bytes())
    sif.chmod(0o644)
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o777)
    env = {"PATH": os.environ["PATH"], "HOME": str(out), "TMPDIR": str(out)}
    r = run_as_nobody([RUNNER, "exec", sif, "/bin/sh", "-c", 'id -u; echo hi > "$HOME/f"'],
                      env, capture_output=True, text=True, cwd=out, timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "65534\n"
    assert (out / "f").stat().st_uid == 65534
    assert sorted(p.name for p in out.iterdir()) == ["f"]  # nothing left behind
