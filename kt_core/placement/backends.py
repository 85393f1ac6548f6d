"""Expert backends: the operators a placement rule can swap in for a transformers experts module.

The built-in backend "kt" is `kt_core.experts.KTExperts` (the CPU operator); plugins add theirs
through the `register_expert_backends` hook. A rule names a backend by its registry name or by the
class's dotted path (`kt_core.experts.KTExperts`).
"""

from __future__ import annotations

import re
import threading

from kt_core.hookspecs import hookimpl

__all__ = [
    "get_expert_backend",
    "list_expert_backends",
    "register_expert_backend",
    "unregister_expert_backend",
]

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_lock = threading.RLock()
_backends: dict[str, type] = {}
_collected = False


def register_expert_backend(name: str, cls: type, *, replace: bool = False) -> type:
    """Adds an expert backend.

    Args:
        name: lowercase registry name.
        cls: the operator class (see `kt_core.hookspecs.register_expert_backends` for its contract).
        replace: allow overriding an existing backend of the same name.

    Raises:
        ValueError: the name is not lowercase or is already registered.
    """
    if not _NAME_RE.match(name):
        raise ValueError(f"Expert backend name {name!r} must be lowercase: letters, digits, underscores")
    with _lock:
        if name in _backends and not replace and _backends[name] is not cls:
            raise ValueError(f"Expert backend {name!r} is already registered ({_dotted(_backends[name])})")
        _backends[name] = cls
    return cls


def unregister_expert_backend(name: str) -> None:
    """Removes a backend (for tests)."""
    with _lock:
        del _backends[name]


def list_expert_backends() -> dict[str, type]:
    """Returns {name: class} of every registered backend, the plugins' included."""
    _collect_plugins()
    with _lock:
        return dict(_backends)


def get_expert_backend(name_or_path: str) -> tuple[str, type] | None:
    """Finds a backend by registry name, dotted class path, `kt_core.<Class>` or bare class name."""
    for name, cls in list_expert_backends().items():
        aliases = {name, _dotted(cls), cls.__name__, f"kt_core.{cls.__name__}"}
        if name_or_path in aliases:
            return name, cls
    return None


def _dotted(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _collect_plugins() -> None:
    global _collected
    with _lock:
        if _collected:
            return
        _collected = True
    from kt_core.plugins import get_plugin_manager

    get_plugin_manager().hook.register_expert_backends(register=register_expert_backend)


@hookimpl
def register_expert_backends(register):
    """Registers "kt", the CPU operator KTExperts."""
    from kt_core.experts import KTExperts

    register("kt", KTExperts)
