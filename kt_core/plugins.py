"""The plugin manager: one `pluggy.PluginManager("kt")` per process, entry points loaded once.

Configuration (kt_core.config):
    plugins (KT_PLUGINS): comma-separated allow-list of entry-point names to load; unset loads all of them.
        The built-in plugins of kt-plugins itself are always loaded. Read once, when the plugins are loaded.
"""

from __future__ import annotations

import importlib
import logging
import threading
from importlib.metadata import entry_points

import pluggy

from kt_core import hookspecs
from kt_core.config import ALLOW_LIST_ENV, current

__all__ = [
    "ALLOW_LIST_ENV",
    "ENTRY_POINT_GROUP",
    "get_plugin_manager",
    "load_plugins",
    "loaded_plugins",
    "plugins_loaded",
]

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "kt"
_OWN_DISTRIBUTION = "kt-plugins"
# Registered even when the package metadata lacks the entry points (a source tree run without install).
_BUILTIN_PLUGINS = {
    "kt_architectures": "kt_core.architectures.builtin",
    "kt_backends": "kt_core.placement.backends",
}

_lock = threading.Lock()
_manager: pluggy.PluginManager | None = None
_loaded: dict[str, str] = {}  # entry-point name -> "module:attr" it came from


def get_plugin_manager() -> pluggy.PluginManager:
    """Returns the process-wide plugin manager with the built-ins and installed plugins loaded."""
    global _manager
    with _lock:
        if _manager is None:
            manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
            manager.add_hookspecs(hookspecs)
            _load_entry_points(manager)
            _manager = manager
        return _manager


def load_plugins() -> pluggy.PluginManager:
    """Loads the plugins if not done yet (idempotent) and returns the manager."""
    return get_plugin_manager()


def loaded_plugins() -> dict[str, str]:
    """Returns {entry-point name: target} of the plugins loaded in this process."""
    get_plugin_manager()
    return dict(_loaded)


def plugins_loaded() -> bool:
    """Whether this process has loaded its plugins (and read the allow-list) already."""
    return _manager is not None


def _load_entry_points(manager: pluggy.PluginManager) -> None:
    allowed = current().plugins
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(ep, "dist", None)
        builtin = dist is not None and dist.name == _OWN_DISTRIBUTION
        if not builtin and allowed is not None and ep.name not in allowed:
            logger.info("kt plugin %r skipped: not in %s", ep.name, ALLOW_LIST_ENV)
            continue
        if manager.has_plugin(ep.name):
            continue
        try:
            plugin = ep.load()
            manager.register(plugin, name=ep.name)
        except Exception:  # a broken third-party plugin must not take the runtime down
            logger.exception("kt plugin %r (%s) failed to load and is skipped", ep.name, ep.value)
            continue
        _loaded[ep.name] = ep.value
    for name, module in _BUILTIN_PLUGINS.items():
        if manager.has_plugin(name):
            continue
        logger.debug("built-in kt plugin %r registered directly (no entry-point metadata)", name)
        manager.register(importlib.import_module(module), name=name)
        _loaded[name] = module


def _reset_for_tests() -> None:
    """Forgets the manager so that the next call rescans the entry points."""
    global _manager
    with _lock:
        _manager = None
        _loaded.clear()
