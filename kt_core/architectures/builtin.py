"""The built-in model families, registered through the plugin hook like any third-party family."""

from __future__ import annotations

from kt_core.architectures import deepseek_v2, deepseek_v3, glm4_moe, mixtral, qwen2_moe, qwen3_moe
from kt_core.hookspecs import hookimpl

BUILTIN_ARCHITECTURES = (
    deepseek_v2.ARCHITECTURE,
    deepseek_v3.ARCHITECTURE,
    glm4_moe.ARCHITECTURE,
    mixtral.ARCHITECTURE,
    qwen2_moe.ARCHITECTURE,
    qwen3_moe.ARCHITECTURE,
)


@hookimpl
def register_architectures(register):
    """Registers DeepSeek-V2/V3, GLM-4.5-MoE, Mixtral, Qwen2-MoE and Qwen3-MoE."""
    for arch in BUILTIN_ARCHITECTURES:
        register(arch)
