"""One registry helper for kt_core's two registries: model families and expert backends.

A `Registry` maps lowercase unique names to entries under one lock, and on its first lookup asks every
`kt` plugin to register through one hook (`register_architectures`, `register_expert_backends`), once
per process. What differs per registry (Architecture's model-type index, a backend's class aliases)
stays in its own module: `kt_core.architectures.registry`, `kt_core.placement.backends`.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["Registry"]

T = TypeVar("T")

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


class Registry(Generic[T]):
    """Name -> entry, filled by `add` and, on the first lookup, by the plugins' hook.

    Args:
        kind: what an entry is ("Architecture", "Expert backend"); starts every error message.
        hook: name of the `kt` hookspec whose implementations register entries (kt_core/hookspecs.py).
        plugin_register: the `register` callback handed to the hook's implementations.
        describe: optional entry -> text added to the duplicate-name error (e.g. a class's dotted path).
    """

    def __init__(
        self,
        kind: str,
        hook: str,
        plugin_register: Callable[..., object],
        describe: Callable[[T], str] | None = None,
    ) -> None:
        self.kind = kind
        self.hook = hook
        self.lock = threading.RLock()  # reentrant: a registry's own checks run under it and call back in
        self._plugin_register = plugin_register
        self._describe = describe
        self._entries: dict[str, T] = {}
        self._collected = False

    def add(self, name: str, entry: T, *, replace: bool = False) -> T:
        """Adds `entry` under `name`.

        Raises:
            ValueError: the name is not lowercase, or is taken and `replace` is False.
        """
        if not _NAME_RE.match(name):
            raise ValueError(f"{self.kind} name {name!r} must be lowercase: letters, digits, underscores")
        with self.lock:
            current = self._entries.get(name)
            if current is not None and not replace:
                shown = f" ({self._describe(current)})" if self._describe is not None else ""
                raise ValueError(f"{self.kind} {name!r} is already registered{shown}")
            self._entries[name] = entry
        return entry

    def remove(self, name: str) -> T:
        """Removes and returns the entry of `name`.

        Raises:
            KeyError: nothing is registered under `name`.
        """
        with self.lock:
            if name not in self._entries:
                raise KeyError(f"{self.kind} {name!r} is not registered")
            return self._entries.pop(name)

    def get(self, name: str) -> T | None:
        """The entry of `name`, or None; does not collect the plugins' registrations."""
        with self.lock:
            return self._entries.get(name)

    def entries(self) -> dict[str, T]:
        """Returns {name: entry} sorted by name, after collecting the plugins' registrations."""
        self.collect()
        with self.lock:
            return dict(sorted(self._entries.items()))

    def collect(self) -> None:
        """Calls the plugins' hook once per process (again after `reset_for_tests`)."""
        with self.lock:
            if self._collected:
                return
            # Set before the hook runs: a plugin that looks something up while registering must not recurse.
            self._collected = True
        from kt_core.plugins import get_plugin_manager

        getattr(get_plugin_manager().hook, self.hook)(register=self._plugin_register)

    def reset_for_tests(self) -> None:
        """Makes the next lookup collect the plugins' registrations again."""
        with self.lock:
            self._collected = False
