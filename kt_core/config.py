"""The process-wide runtime settings of kt_core: one `RuntimeConfig`, the one reader of the `KT_*` variables.

    RuntimeConfig.from_env()   the settings the KT_* environment variables give (unset: the defaults below)
    current()                  the settings in force: the environment's, with what configure() set on top
    configure(**changes)       sets some knobs for this process; they win over the environment from then on

Every value is checked where it enters, with kt_core.settings: an error names the variable (or the keyword of
configure()), the value, and what is expected. The environment is read again at each use, so a variable set
later in the process still counts (unless configure() set that knob); reading it costs a dict lookup per
variable while nothing changed.

When a knob takes effect:
    cpu_infer              when the shared thread pool is built (the first experts call): configure() refuses a
                           different size afterwards (a layer's own `KTExperts(cpu_infer=...)` rebuilds the pool)
    plugins                when the plugins are loaded (the first architecture lookup): configure() refuses it
                           afterwards
    kernel, pack_cache     for the layers built afterwards
    amx_emulate            for the kernel variants listed and the layers built afterwards
    stream_triton          from the next streamed step
    phase_times            from the next experts call (kt_core.kernels.record_phase_times() also switches it)
    backward_weight_cache  from the next backward of a layer that has not kept its copy yet

phase_times, backward_weight_cache and amx_emulate are read by the compiled module: configure() hands them to
kt_core._C at once; a variable set later reaches it at the next read of the config (a kernel listed or chosen,
a layer built).
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kt_core.settings import SettingError, boolean, cpu_threads, usable_cpus

__all__ = [
    "ALLOW_LIST_ENV",
    "AMX_EMULATE_ENV",
    "BACKWARD_WEIGHT_CACHE_ENV",
    "CPU_INFER_ENV",
    "KERNEL_ENV",
    "PACK_CACHE_ENV",
    "PHASE_TIMES_ENV",
    "STREAM_TRITON_ENV",
    "RuntimeConfig",
    "configure",
    "current",
]

CPU_INFER_ENV = "KT_CPU_INFER"
KERNEL_ENV = "KT_KERNEL"
PACK_CACHE_ENV = "KT_PACK_CACHE"
STREAM_TRITON_ENV = "KT_STREAM_TRITON"
ALLOW_LIST_ENV = "KT_PLUGINS"
PHASE_TIMES_ENV = "KT_PHASE_TIMES"
BACKWARD_WEIGHT_CACHE_ENV = "KT_BACKWARD_WEIGHT_CACHE"
AMX_EMULATE_ENV = "KT_AMX_EMULATE"


def _text(key: str, value: Any, expected: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise SettingError(f"{key}: got {value!r}, expected {expected}")
    return value


def _kernel(key: str, value: Any) -> str | None:
    # Whether this CPU runs it is checked where the kernel is resolved (kt_core.kernels.resolve_kernel).
    expected = "'auto' or a kernel name (kt_core.available_kernels(), kt_core.kernels.quantized_kernels())"
    return None if value is None else _text(key, value, expected)


def _folder(key: str, value: Any) -> Path | None:
    if value is None:
        return None
    return Path(_text(key, os.fspath(value) if isinstance(value, os.PathLike) else value, "a folder path"))


def _names(key: str, value: Any) -> frozenset[str] | None:
    expected = "entry-point names, comma-separated in one string or as a list"
    if value is None:
        return None
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, Iterable):
        raise SettingError(f"{key}: got {value!r}, expected {expected}")
    # Blank names (from "a,,b" or a trailing comma) are skipped, as the variable always read them.
    return frozenset(_text(key, name, expected).strip() for name in value if not isinstance(name, str) or name.strip())


def _optional_boolean(key: str, value: Any) -> bool | None:
    return None if value is None else boolean(key, value)


def _knob(variable: str, read: Callable[[str, Any], Any], *, blank_is_unset: bool = True) -> dict[str, Any]:
    """A field's metadata: its variable, and the check that reads a value (variable or keyword, value -> knob)."""
    return {"variable": variable, "read": read, "blank_is_unset": blank_is_unset}


@dataclass(frozen=True)
class RuntimeConfig:
    """The process-wide knobs of kt_core, each with the `KT_*` variable it is read from.

    Attributes:
        cpu_infer: threads of the shared CPU pool, the caller included (KT_CPU_INFER); None: the CPUs this
            process may use. Checked as any `cpu_infer` (kt_core.settings.cpu_threads).
        kernel: the kernel variant every layer runs, whatever it asks for (KT_KERNEL); None: each layer's
            `kernel=` ("auto" by default).
        pack_cache: folder of the packed-weights cache (KT_PACK_CACHE) for layers without their own
            `pack_cache`; None: off.
        stream_triton: the streamed device path's fused steps as Triton kernels on CUDA (KT_STREAM_TRITON);
            False: plain torch ops.
        plugins: entry-point names of the third-party `kt` plugins to load (KT_PLUGINS, comma-separated);
            None: all of them. kt-plugins' own plugins always load.
        phase_times: book the wall time of every phase of the packed kernels (KT_PHASE_TIMES).
        backward_weight_cache: keep a column-packed copy of the bf16 weights for the backward
            (KT_BACKWARD_WEIGHT_CACHE); None: when it takes under a quarter of the free memory.
        amx_emulate: offer the AMX variants on CPUs without AMX, on a scalar model of the tile instructions
            (KT_AMX_EMULATE): for tests, never for speed.
    """

    cpu_infer: int | None = field(default=None, metadata=_knob(CPU_INFER_ENV, cpu_threads))
    kernel: str | None = field(default=None, metadata=_knob(KERNEL_ENV, _kernel))
    pack_cache: Path | None = field(default=None, metadata=_knob(PACK_CACHE_ENV, _folder))
    stream_triton: bool = field(default=True, metadata=_knob(STREAM_TRITON_ENV, boolean))
    # KT_PLUGINS="" is an empty allow-list: no third-party plugin.
    plugins: frozenset[str] | None = field(default=None, metadata=_knob(ALLOW_LIST_ENV, _names, blank_is_unset=False))
    phase_times: bool = field(default=False, metadata=_knob(PHASE_TIMES_ENV, boolean))
    backward_weight_cache: bool | None = field(
        default=None, metadata=_knob(BACKWARD_WEIGHT_CACHE_ENV, _optional_boolean)
    )
    amx_emulate: bool = field(default=False, metadata=_knob(AMX_EMULATE_ENV, boolean))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> RuntimeConfig:
        """The settings the KT_* variables of `environ` (default: os.environ) give; an empty value counts as unset.

        Raises:
            SettingError: a variable with a value it cannot take (names the variable, the value, what fits).
        """
        environ = os.environ if environ is None else environ
        values = {}
        for knob in dataclasses.fields(cls):
            variable = knob.metadata["variable"]
            raw = environ.get(variable)
            if raw is None or (raw == "" and knob.metadata["blank_is_unset"]):
                continue
            values[knob.name] = knob.metadata["read"](variable, raw)
        return cls(**values)


_KNOBS = {knob.name: knob for knob in dataclasses.fields(RuntimeConfig)}
_VARIABLES = tuple(knob.metadata["variable"] for knob in _KNOBS.values())

_lock = threading.Lock()
_changes: dict[str, Any] = {}  # knobs set by configure(): they win over the environment
_cached: tuple[tuple[str | None, ...], dict[str, Any], RuntimeConfig] | None = None
_handed: dict[str, Any] | None = None  # the native knobs as kt_core._C last got them


def current() -> RuntimeConfig:
    """The settings in force: RuntimeConfig.from_env() with the knobs set by configure() on top.

    Raises:
        SettingError: a KT_* variable with a value it cannot take.
    """
    global _cached
    raw = tuple(os.environ.get(variable) for variable in _VARIABLES)
    with _lock:
        if _cached is None or _cached[0] != raw or _cached[1] != _changes:
            config = dataclasses.replace(RuntimeConfig.from_env(), **_changes)
            _hand_to_native(config)
            _cached = (raw, _changes, config)
        return _cached[2]


def configure(**changes: Any) -> RuntimeConfig:
    """Sets knobs of the process's RuntimeConfig (checked as from_env checks the variables); returns the result.

    The keywords are RuntimeConfig's fields, with typed values (4, True, a path) or the strings their variables
    take; None, where a knob has it as its default, gives that default back. A knob set here keeps its value
    whatever its variable says. See the module docstring for when each knob takes effect.

    Raises:
        TypeError: a keyword that is not a knob.
        SettingError: a value the knob cannot take, or cpu_infer / plugins once they can no longer change.
    """
    global _changes
    unknown = sorted(set(changes) - set(_KNOBS))
    if unknown:
        raise TypeError(f"configure: unknown knob(s) {', '.join(unknown)}; known: {', '.join(_KNOBS)}")
    checked = {name: _KNOBS[name].metadata["read"](name, value) for name, value in changes.items()}
    _refuse_after_first_use(checked)
    with _lock:
        _changes = {**_changes, **checked}
    return current()


def _refuse_after_first_use(checked: dict[str, Any]) -> None:
    # Imported here: both modules read this one.
    from kt_core.plugins import plugins_loaded
    from kt_core.runtime.pool import current_threads

    threads = current_threads()
    if "cpu_infer" in checked and threads is not None and (checked["cpu_infer"] or usable_cpus()) != threads:
        raise SettingError(
            f"cpu_infer: got {checked['cpu_infer']!r}, but the shared thread pool already runs {threads} threads; "
            "configure(cpu_infer=...) before the first experts call, or give the layer KTExperts(cpu_infer=...)"
        )
    if "plugins" in checked and plugins_loaded() and checked["plugins"] != current().plugins:
        raise SettingError(
            f"plugins: got {checked['plugins']!r}, but the kt plugins are loaded already; "
            "configure(plugins=...) before the first architecture lookup (kt_core.get_plugin_manager())"
        )


def _hand_to_native(config: RuntimeConfig) -> None:
    # Only the knobs that changed since the last hand-over (the C++ starts at RuntimeConfig's defaults), so that
    # kernels.record_phase_times() keeps its say until KT_PHASE_TIMES or configure(phase_times=...) changes.
    global _handed
    try:
        from kt_core import _C
    except ImportError:  # a source checkout that was never built: nothing reads them
        return
    setters = {
        "phase_times": _C.set_phase_times,
        "backward_weight_cache": _C.set_backward_weight_cache,
        "amx_emulate": _C.set_amx_emulation,
    }
    if _handed is None:
        _handed = {name: getattr(RuntimeConfig(), name) for name in setters}
    for name, hand in setters.items():
        value = getattr(config, name)
        if _handed[name] != value:
            hand(value)
            _handed[name] = value
