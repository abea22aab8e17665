"""A post-import hook: run a function right after a named module first executes
(:class:`OnImport`; :mod:`hpcdask.compat` patches dask-ml the moment a script imports it)."""

from __future__ import annotations

import contextlib
import importlib.abc
import sys
from typing import Any


class _AfterExec(importlib.abc.Loader):
    """A module's own loader, calling ``after()`` once the module has executed."""

    def __init__(self, loader: Any, after: Any) -> None:
        self._loader, self._after = loader, after

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._loader.exec_module(module)
        self._after()

    def __getattr__(self, name: str) -> Any:  # get_source, get_resource_reader, ...
        return getattr(self._loader, name)


class OnImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when ``name`` is imported, wraps the spec the other finders return
    so that ``callback`` runs right after the module executes (before the importing statement
    binds anything from it). It removes itself then: it fires once.

    A post-import hook, as ``wrapt.register_post_import_hook`` makes; written here because wrapt
    is not in the lock, for one hook.
    """

    def __init__(self, name: str, callback: Any) -> None:
        self.name, self.callback = name, callback

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != self.name:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _AfterExec(spec.loader, self._fire)
        return spec

    def _fire(self) -> None:
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self)
        self.callback()
