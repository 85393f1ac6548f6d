"""Expert backends: the operators a placement rule can swap in for a transformers experts module.

The built-in backend "kt" is `kt_core.experts.KTExperts` (the CPU operator); plugins add theirs
through the `register_expert_backends` hook. A rule names a backend by its registry name or by the
class's dotted path (`kt_core.experts.KTExperts`).
"""

from __future__ import annotations

import importlib
import re

from kt_core.hookspecs import hookimpl
from kt_core.registry import Registry

__all__ = [
    "get_expert_backend",
    "list_expert_backends",
    "register_expert_backend",
    "unregister_expert_backend",
]


_DOTTED_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")


def _dotted(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_expert_backend(name: str, cls: type, *, replace: bool = False) -> type:
    """Adds an expert backend.

    Args:
        name: lowercase registry name.
        cls: the operator class (see `kt_core.hookspecs.register_expert_backends` for its contract).
        replace: allow overriding an existing backend of the same name.

    Raises:
        ValueError: the name is not lowercase or is already registered to another class.
    """
    if _registry.get(name) is cls:  # the same class again (a plugin re-registering): nothing to do
        return cls
    return _registry.add(name, cls, replace=replace)


_registry: Registry[type] = Registry("Expert backend", "register_expert_backends", register_expert_backend, _dotted)


def unregister_expert_backend(name: str) -> None:
    """Removes a backend (for tests)."""
    _registry.remove(name)


def list_expert_backends() -> dict[str, type]:
    """Returns {name: class} of every registered backend, the plugins' included."""
    return _registry.entries()


def get_expert_backend(name_or_path: str) -> tuple[str, type] | None:
    """Finds a backend by registry name, dotted class path, `kt_core.<Class>` or bare class name.

    A dotted path may also name a module that re-exports the class (`kt_core.experts.KTExperts` for the
    class defined in a submodule of that package), so rule files keep working when code moves.
    """
    backends = list_expert_backends()
    for name, cls in backends.items():
        aliases = {name, _dotted(cls), cls.__name__, f"kt_core.{cls.__name__}"}
        if name_or_path in aliases:
            return name, cls
    exported = _exported_class(name_or_path)
    for name, cls in backends.items():
        if exported is cls:
            return name, cls
    return None


def _exported_class(path: str) -> object | None:
    module_name, _, attr = path.rpartition(".")
    if not module_name or not _DOTTED_RE.match(path):
        return None
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    return getattr(module, attr, None)


@hookimpl
def register_expert_backends(register):
    """Registers "kt", the CPU operator KTExperts."""
    from kt_core.experts import KTExperts

    register("kt", KTExperts)
