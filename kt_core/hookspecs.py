"""The whole plugin contract of kt-plugins (pluggy project name "kt", entry-point group "kt").

A plugin is a module (or object) with functions marked `@hookimpl`, published through an entry point:

    [project.entry-points.kt]
    my_family = "my_package.kt_plugin"

The built-in model families and the "kt" expert backend register through the same hooks
(`kt_core.architectures.builtin`, `kt_core.placement.backends`). Host frameworks are not plugins of this
contract: each finds its own package in `kt_plugins/` through its own mechanism (a `.pth` boot hook, an
SGLang entry point, a Trainer callback).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

__all__ = ["PROJECT_NAME", "hookimpl", "hookspec"]

PROJECT_NAME = "kt"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def register_architectures(register: Callable[[Any], None]) -> None:
    """Registers model families: call `register(Architecture(...))` once per family.

    See `kt_core.architectures.Architecture` for what a family declares (config model types, where
    the experts modules are, checkpoint names of the expert weights).
    """


@hookspec
def register_expert_backends(register: Callable[[str, type], None]) -> None:
    """Registers expert operators: call `register(name, cls)` once per backend.

    `cls` follows the experts contract of transformers >= 5 (`forward(hidden_states [T, H],
    top_k_index [T, K], top_k_weights [T, K]) -> [T, H]`, fused `gate_up_proj [E, 2I, H]` and
    `down_proj [E, H, I]`) and offers `cls(E, H, I, dtype=..., **kwargs)`, `cls.from_module(hf_experts,
    **kwargs)` and `load_expert_(e, gate=, up=, down=)`, like `kt_core.experts.KTExperts`.
    """
