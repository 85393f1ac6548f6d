"""The `sglang.srt.plugins` entry point: hooks that SGLang applies in every one of its processes.

- Always (cheap, no torch import): `--kt-experts` and its options on `ServerArgs.add_cli_args`, so they
  show in `--help`; and a hook on `ServerArgs.from_cli_args` that exports them (options.ENV_VAR) before
  SGLang spawns its schedulers.
- Only where that variable is set (the schedulers of a `--kt-experts` launch): the MoE method swap.
  `FusedMoE.__init__` asks `kt_ep_wrapper.create_kt_config_from_server_args` whether KTransformers is on
  and then builds `kt_ep_wrapper.KTEPWrapperMethod(gpu_method, config)`; we answer with our config and
  replace that class with a subclass, so SGLang's own special cases for it (the weight-loader split, the
  routed-scaling factor applied by DeepSeek / GLM models after the experts) apply to ours too.

Tested with sglang 0.5.20 - 0.5.21 (see README: "SGLang").
"""

from __future__ import annotations

import logging
import os

from kt_plugins.sglang.options import ENV_VAR, add_cli_args, options_from_args, options_from_env

__all__ = ["register"]

logger = logging.getLogger(__name__)

_SERVER_ARGS = "sglang.srt.server_args.ServerArgs"
_KT_WRAPPER = "sglang.srt.layers.moe.kt_ep_wrapper"


def register() -> None:
    """Registers kt-plugins' hooks with SGLang's HookRegistry (SGLang applies them right after)."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(f"{_SERVER_ARGS}.add_cli_args", _after_add_cli_args, HookType.AFTER)
    HookRegistry.register(f"{_SERVER_ARGS}.from_cli_args", _before_from_cli_args, HookType.BEFORE)
    if options_from_env() is None:
        return
    from kt_plugins.sglang.method import KTExpertsMethod

    HookRegistry.register(f"{_KT_WRAPPER}.create_kt_config_from_server_args", _kt_config, HookType.AROUND)
    HookRegistry.register(f"{_KT_WRAPPER}.KTEPWrapperMethod", KTExpertsMethod, HookType.REPLACE)
    logger.info("kt-plugins: routed experts on the CPU (%s=%s)", ENV_VAR, os.environ[ENV_VAR])


def _after_add_cli_args(result, parser, *args, **kwargs):
    add_cli_args(parser)
    return result


def _before_from_cli_args(cls, args, *rest, **kwargs):
    options = options_from_args(args)
    if options is None:
        return None
    if getattr(args, "kt_weight_path", None):
        raise ValueError(
            "--kt-experts and --kt-weight-path both given: --kt-weight-path selects SGLang's own KTransformers "
            "backend (kt_kernel, converted weights); --kt-experts reads the experts from --model-path. Pick one."
        )
    os.environ[ENV_VAR] = options.to_env()
    return None


def _kt_config(original, server_args, layer_idx, *args, **kwargs):
    from kt_plugins.sglang.method import KTExpertsLayerConfig

    options = options_from_env()
    if options is None:
        return original(server_args, layer_idx, *args, **kwargs)
    try:  # sglang >= 0.5.20 keeps the KT fields under exec.moe
        from sglang.srt.runtime_context import get_exec

        kt_weight_path = get_exec().moe.kt_weight_path
    except (ImportError, AttributeError):
        kt_weight_path = getattr(server_args, "kt_weight_path", None)
    if kt_weight_path is not None:
        raise ValueError(
            f"{ENV_VAR} (--kt-experts) and --kt-weight-path are both set: they select two different CPU expert "
            "backends; drop one"
        )
    return KTExpertsLayerConfig(layer_idx=layer_idx, options=options)
