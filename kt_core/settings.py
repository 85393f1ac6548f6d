"""Validators for every kt-plugins setting, shared by the places where settings enter.

Settings enter in four places: a LLaMA-Factory YAML (kt_plugins/llamafactory/config.py), the `KTCallback`
arguments (kt_plugins/hf_trainer/callback.py), SGLang's `--kt-experts-*` flags (kt_plugins/sglang/options.py)
and `KT_*` environment variables. Each is checked once, there, with the functions below; the error names
the key as the user wrote it (`chunk_size`, `--kt-experts-chunk-size`, `KT_CPU_INFER`), the value, and what
is expected. Errors are `SettingError`, a `ValueError`.

Standard library only (torch is imported inside `require_cuda`), so that any entry point may use it.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Sequence
from typing import Any

__all__ = [
    "CPU_INFER_CAP_FACTOR",
    "SettingError",
    "boolean",
    "choice",
    "cpu_threads",
    "optional_size",
    "parse_size",
    "positive_int",
    "require_cuda",
    "usable_cpus",
]

logger = logging.getLogger(__name__)

# Above this many threads per CPU the process may use, `cpu_threads` runs one thread per CPU instead: the
# pool's workers spin before they sleep, and 10,000 threads on a 2-core machine made every call 255x slower.
CPU_INFER_CAP_FACTOR = 4

_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip
_SIZE_RE = re.compile(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*")
_INT_RE = re.compile(r"\s*[+-]?[0-9]+\s*")
_BOOLEANS = {"true": True, "yes": True, "1": True, "on": True, "false": False, "no": False, "0": False, "off": False}
SIZE_EXPECTED = "a size: bytes (an integer >= 0) or a number with a unit, e.g. '10GiB', '512MiB', '80GB'"


class SettingError(ValueError):
    """A kt-plugins setting with a value it cannot take; the message names the key, the value and what fits."""


def _fail(key: str, value: Any, expected: str) -> SettingError:
    return SettingError(f"{key}: got {value!r}, expected {expected}")


def positive_int(key: str, value: Any, *, what: str = "") -> int:
    """An integer >= 1; integer strings ("4", as command lines give them) are read, bools and floats refused.

    Args:
        key: the setting as the user wrote it (`chunk_size`, `--kt-experts-cpu-threads`, `KT_CPU_INFER`).
        value: the value given.
        what: what the number counts, for the message ("tokens per CPU-experts call").

    Raises:
        SettingError: naming key, value and the expectation.
    """
    expected = "a positive integer" + (f" ({what})" if what else "")
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise _fail(key, value, expected)
    if isinstance(value, str):
        if not _INT_RE.fullmatch(value):
            raise _fail(key, value, expected)
        number = int(value)
    else:
        number = value
    if number < 1:
        raise _fail(key, value, expected)
    return number


def boolean(key: str, value: Any) -> bool:
    """True / False, or their spellings in a command line or environment ("true", "0", "yes", "off", ...).

    Raises:
        SettingError: any other value (a number other than 0 / 1, a word).
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _BOOLEANS:
        return _BOOLEANS[value.strip().lower()]
    raise _fail(key, value, "true or false")


def choice(key: str, value: Any, allowed: Sequence[Any]) -> Any:
    """`value` when it is one of `allowed` (None included when listed).

    Raises:
        SettingError: listing the allowed values.
    """
    if value is None:
        if None in allowed:
            return None
    elif not isinstance(value, bool) and value in allowed:
        return value
    shown = ", ".join("null" if a is None else repr(a) for a in allowed)
    raise _fail(key, value, f"one of {shown}")


def parse_size(value: int | float | str, key: str = "size") -> int:
    """Bytes from 12_000_000_000, 1e9, "80GB", "70GiB", "512 MiB" or "1.5MiB" (units: B, kB/KB ... TB, KiB ... TiB).

    The one size parser of kt-plugins: memory limits, streaming budgets, kept bytes.

    Args:
        value: bytes, or a number with a unit (case-insensitive).
        key: the setting it came from, for the message.

    Returns:
        Bytes, >= 0.

    Raises:
        SettingError: negative, not finite, a bool, or text that is not a size (names key and value).
    """
    if isinstance(value, bool):
        raise _fail(key, value, SIZE_EXPECTED)
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value < 0:
            raise _fail(key, value, SIZE_EXPECTED)
        return int(value)
    if not isinstance(value, str):
        raise _fail(key, value, SIZE_EXPECTED)
    match = _SIZE_RE.fullmatch(value)
    if match is None or match.group(2).lower() not in _SIZE_UNITS:
        raise _fail(key, value, SIZE_EXPECTED)
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def optional_size(value: int | float | str | None, key: str = "size") -> int | None:
    """`parse_size`, with None passed through (a setting left unset)."""
    return None if value is None else parse_size(value, key)


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, as taskset / cgroups set it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_threads(key: str, value: Any) -> int | None:
    """A thread count for the experts operator (`cpu_infer`): a positive integer, None for the default.

    More threads than the CPUs this process may use share cores and slow every call: a one-line warning
    says so. Above CPU_INFER_CAP_FACTOR times the CPUs the value is taken for a setting written for another
    machine and one thread per CPU runs instead (the warning says that too).

    Args:
        key: the setting as the user wrote it.
        value: the value given (None: the pool's default, the CPUs this process may use).

    Returns:
        The thread count to use, or None.

    Raises:
        SettingError: not a positive integer (bools and floats included).
    """
    if value is None:
        return None
    threads = positive_int(key, value, what="CPU threads of the experts operator")
    cpus = usable_cpus()
    if threads > CPU_INFER_CAP_FACTOR * cpus:
        logger.warning(
            "%s=%d is more than %dx the %d CPUs this process may use (os.sched_getaffinity); running %d threads",
            key, threads, CPU_INFER_CAP_FACTOR, cpus, cpus,
        )  # fmt: skip
        return cpus
    if threads > cpus:
        logger.warning(
            "%s=%d is more than the %d CPUs this process may use (os.sched_getaffinity): threads will share "
            "cores and every experts call slows down; %d or fewer is faster",
            key, threads, cpus, cpus,
        )  # fmt: skip
    return threads


def require_cuda(key: str, value: Any, why: str) -> None:
    """Refuses a setting that only means something with a CUDA GPU when this process sees none.

    Args:
        key: the setting as the user wrote it.
        value: its value.
        why: what the setting does on the GPU ("expert streaming computes on the GPU").

    Raises:
        SettingError: no CUDA device is available.
    """
    import torch

    if not torch.cuda.is_available():
        raise SettingError(
            f"{key}: got {value!r}, but this process sees no CUDA GPU (torch.cuda.is_available() is False) and "
            f"{why}; remove {key} to compute every routed expert on the CPU"
        )


def renamed(old_key: str, old_value: Any, new_key: str, new_value: Any) -> Any:
    """The value of a setting given under its former name (`old_key`), with a warning; both at once is an error."""
    if old_value is None:
        return new_value
    if new_value is not None:
        raise SettingError(f"{old_key} and {new_key} both given: {old_key} is the former name of {new_key}; keep one")
    logging.getLogger("kt_core").warning("%s is now called %s (same meaning); please rename it", old_key, new_key)
    return old_value
