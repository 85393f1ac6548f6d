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

    with meta_parameters():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


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
