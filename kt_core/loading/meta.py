"""Building a transformers model without allocating its weights, and filling it tensor by tensor."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["build_meta_model", "meta_parameters", "set_tensor", "still_on_meta"]


@contextlib.contextmanager
def meta_parameters() -> Iterator[None]:
    """Creates every parameter on the meta device while buffers stay real.

    Buffers are computed at construction (rotary inverse frequencies) and are not all saved in
    checkpoints, so they must keep their values; parameters are loaded from the checkpoint.
    """
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def build_meta_model(config, dtype: torch.dtype) -> nn.Module:
    """Instantiates the causal-LM class of `config` with parameters on the meta device.

    Args:
        config: a transformers PretrainedConfig.
        dtype: parameter dtype (modules transformers keeps in fp32 stay fp32).
    """
    from transformers import AutoModelForCausalLM

    with meta_parameters(), _without_zero3_init():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


@contextlib.contextmanager
def _without_zero3_init() -> Iterator[None]:
    """transformers builds a model under DeepSpeed's `zero.Init` while a ZeRO-3 config is active (TrainingArguments
    made before the model, as LLaMA-Factory does): it would partition the meta parameters at construction, and the
    experts with them. Here the model is built whole; DeepSpeed partitions the non-expert parameters when its engine
    is built, after the experts have left them (kt_core.distributed.deepspeed). transformers' own `set_zero3_state`
    (the flag of a `zero.Init` already running) makes `from_config` skip its own."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        yield
        return
    import transformers
    from transformers import modeling_utils

    running_init = getattr(modeling_utils, "set_zero3_state", None)
    if running_init is None:
        raise RuntimeError(
            f"DeepSpeed ZeRO-3 is active and transformers {transformers.__version__} has no "
            "modeling_utils.set_zero3_state: the model cannot be built outside zero.Init, which would partition "
            "the routed experts. Use a transformers release kt-plugins is tested with (pyproject.toml)."
        )
    with running_init():
        yield


def set_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Puts `tensor` in place of the parameter or buffer `name` (e.g. `model.norm.weight`)."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._parameters:
        old = module._parameters[attr]
        requires_grad = old.requires_grad if old is not None else tensor.is_floating_point()
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=requires_grad)
    elif attr in module._buffers:
        module._buffers[attr] = tensor
    else:
        raise KeyError(f"{type(module).__name__} at {module_name!r} has no parameter or buffer {attr!r}")


def still_on_meta(model: nn.Module) -> list[str]:
    """Names of parameters and buffers that were never loaded."""
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    return [name for name, t in named if t.device.type == "meta"]
