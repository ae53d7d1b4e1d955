"""Finding, loading and calling plugins.

Plugins come from the ``immune.plugins`` entry-point group (the built-in
modules are registered there too, exactly like third-party ones) and from
``*.py`` files in the configured plugin directories. An entry point may name a
module or a class; a class is instantiated once per hive, with no arguments.

Loading is forgiving: a plugin that cannot be imported, registered or
configured is recorded as failed with its reason, and the others carry on.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import inspect
import logging
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pluggy

from immune import hookspecs
from immune.safe import printable

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "immune.plugins"


@dataclass
class PluginInfo:
    """What the hive knows about one plugin."""

    name: str
    origin: str
    state: str = "loaded"  # loaded, disabled, failed, running, stopped
    error: str | None = None
    obj: Any = field(default=None, repr=False)
    topics: list[str] = field(default_factory=list)
    description: str = ""
    version: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "origin": self.origin,
            "state": self.state,
            "error": self.error,
            "topics": list(self.topics),
            "description": self.description,
            "version": self.version,
        }


class PluginManager:
    """Loads plugins and calls their hooks one plugin at a time.

    Args:
        disabled: names of plugins not to load (recorded as ``disabled``).
        plugin_dirs: directories whose ``*.py`` files are loaded as plugins.
    """

    def __init__(
        self, *, disabled: Iterable[str] = (), plugin_dirs: Iterable[str] = ()
    ) -> None:
        self.pm = pluggy.PluginManager("immune")
        self.pm.add_hookspecs(hookspecs)
        self.disabled = set(disabled)
        self.plugin_dirs = [Path(d) for d in plugin_dirs]
        self.plugins: dict[str, PluginInfo] = {}

    # -- loading -----------------------------------------------------------

    def load_all(self) -> None:
        """Load every plugin from entry points, then from plugin directories."""
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = ep.dist.name if ep.dist else "?"
            self._load(ep.name, f"entry point {ep.value} ({dist})", ep.load)
        for directory in self.plugin_dirs:
            if not directory.is_dir():
                logger.warning(
                    "Plugin directory %s does not exist; skipped.", directory
                )
                continue
            for path in sorted(directory.glob("*.py")):
                if path.name.startswith("_"):
                    continue
                self._load(path.stem, f"file {path}", lambda p=path: _import_file(p))

    def register(self, obj: Any, name: str, origin: str = "registered") -> PluginInfo:
        """Register an already-imported plugin object (used by tests and embedders)."""
        return self._load(name, origin, lambda: obj)

    def _load(self, name: str, origin: str, load: Any) -> PluginInfo:
        if name in self.plugins:
            previous = self.plugins[name]
            msg = f"name already taken by the plugin from {previous.origin}"
            return self._record(PluginInfo(name, origin, "failed", msg))
        if name in self.disabled:
            logger.info("Plugin %s is disabled by configuration.", name)
            return self._record(PluginInfo(name, origin, "disabled"))
        try:
            obj = load()
            if inspect.isclass(obj):
                obj = obj()
            self.pm.register(obj, name=name)
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - one plugin, even sys.exit()
            logger.error("Plugin %s (%s) failed to load: %s", name, origin, exc)
            return self._record(PluginInfo(name, origin, "failed", _short(exc)))
        info = self._record(PluginInfo(name, origin, obj=obj))
        problem = self._hook_problems(obj)
        if problem:
            # A misspelt or undecorated hook would otherwise never be called.
            self.fail(info, "load", NameError(problem))
            return info
        try:
            describe = self.call_one(info, "immune_describe") or {}
        except (Exception, SystemExit) as exc:  # noqa: BLE001
            self.fail(info, "immune_describe", exc)
            return info
        info.description = str(describe.get("description", ""))
        info.version = str(describe.get("version", ""))
        logger.debug("Loaded plugin %s from %s.", name, origin)
        return info

    def _hook_problems(self, obj: Any) -> str | None:
        names = [
            n for n in dir(obj) if n.startswith("immune_") and callable(getattr(obj, n))
        ]
        unknown = [n for n in names if not hasattr(hookspecs, n)]
        if unknown:
            return f"no such hook: {', '.join(unknown)}"
        registered = {
            impl.function.__name__
            for caller in self.pm.get_hookcallers(obj) or []
            for impl in caller.get_hookimpls()
            if impl.plugin is obj
        }
        bare = [n for n in names if n not in registered]
        if bare:
            return f"{', '.join(bare)} lack the @hookimpl decorator"
        return None

    def _record(self, info: PluginInfo) -> PluginInfo:
        self.plugins.setdefault(info.name, info)
        return info

    # -- calling -----------------------------------------------------------

    def active(self) -> Iterator[PluginInfo]:
        """Plugins that loaded and have not failed, in load order."""
        return (
            p for p in list(self.plugins.values()) if p.state in ("loaded", "running")
        )

    def call_one(self, info: PluginInfo, hook: str, **kwargs: Any) -> Any:
        """Call one plugin's implementation of ``hook``, if it has one.

        The implementation gets only the arguments it names. Exceptions
        propagate; :meth:`fail` records them.
        """
        for impl in getattr(self.pm.hook, hook).get_hookimpls():
            if impl.plugin is info.obj:
                return impl.function(**{k: kwargs[k] for k in impl.argnames})
        return None

    def fail(self, info: PluginInfo, stage: str, exc: BaseException) -> None:
        """Disable a plugin after its hook raised, keeping the reason."""
        info.state = "failed"
        info.error = f"{stage}: {_short(exc)}"
        logger.error(
            "Plugin %s failed in %s and is disabled: %s",
            info.name,
            stage,
            printable(exc),
            exc_info=exc,
        )
        if self.pm.is_registered(info.obj):
            self.pm.unregister(info.obj)

    def list(self) -> list[PluginInfo]:
        return list(self.plugins.values())


def _import_file(path: Path) -> Any:
    module_name = f"immune_plugin_dir.{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    return module


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
