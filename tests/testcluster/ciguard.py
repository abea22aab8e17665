"""The CI guard, a pytest plugin: under CI=true a skipped test fails the run, and so does a
whole-suite run in which a required end-to-end test of each kind did not pass.

A kind (image, compose, Slurm) that passed only its cheapest test is no proof that its path
works, so the guard names the tests that must pass. It records outcomes itself (it does not
read the terminal reporter's counts), so it works whatever reporter options are given
(-q, -qq, -rA, --tb=no, -p no:terminal, ...).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest


class CIGuard:
    def __init__(self, root: Path | list[Path], required: dict[str, tuple[str, ...]]) -> None:
        # The whole suite: the one folder, or every folder of the ini's testpaths.
        roots = [root] if isinstance(root, (str, Path)) else list(root)
        self.roots = sorted(Path(r).resolve() for r in roots)
        self.required = required
        self.collected: set[str] = set()
        self.passed: set[str] = set()
        self.failed: set[str] = set()
        self.skipped: list[tuple[str, str]] = []

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        self.collected = {item.nodeid for item in session.items}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.skipped:
            why = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
            self.skipped.append((report.nodeid, str(why)))
        elif report.failed:
            self.failed.add(report.nodeid)
        elif report.when == "call":
            self.passed.add(report.nodeid)

    def whole_run(self, config: pytest.Config) -> bool:
        return (sorted(Path(a).resolve() for a in config.args) == self.roots
                and not config.option.markexpr and not config.option.keyword)

    def problems(self, config: pytest.Config) -> list[str]:
        out = [f"skipped in CI: {nodeid} ({why})" for nodeid, why in self.skipped]
        if self.whole_run(config):
            for kind, nodeids in self.required.items():
                for nodeid in nodeids:
                    if nodeid in self.passed and nodeid not in self.failed:
                        continue
                    state = "was not collected (renamed?)" if nodeid not in self.collected \
                        else "did not pass"
                    out.append(f"the required {kind} test {nodeid} {state}")
        return out

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        if not os.environ.get("CI") or session.config.option.collectonly:
            return
        problems = self.problems(session.config)
        if not problems:
            return
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        for p in problems:
            line = f"CI GUARD: {p}"
            if reporter is not None:
                reporter.write_line(line, red=True, bold=True)
            else:
                print(line, file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
