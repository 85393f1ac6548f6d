"""Several GPUs: the non-expert layers split over devices by contiguous layer ranges.

This is what KTransformers' `multi-gpu` rules do with `transfer_map: {30: "cuda:1"}`: layers 0-29 on
cuda:0, 30-60 on cuda:1, run one after the other. Activations cross devices through forward
pre-hooks that move a module's tensor inputs (hidden states, position embeddings, masks) to the
module's device; a submodule placed away from its parent also moves its outputs back.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch
from torch import nn

__all__ = ["install_device_hooks", "layer_devices_from_transfer_map", "move_to_device", "split_layers"]

logger = logging.getLogger(__name__)


def split_layers(
    layer_weights: Sequence[int], devices: Sequence[str], *, head_weight: int = 0, tail_weight: int = 0
) -> list[str]:
    """Assigns each decoder layer a device so that the devices carry about equal bytes.

    Ranges are contiguous and in device order; the head (embeddings) goes with the first device and
    the tail (final norm, lm_head) with the last, so their bytes count there.

    Args:
        layer_weights: [L] bytes of each layer's tensors that go to a GPU (experts on the CPU excluded).
        devices: the D devices, in pipeline order.
        head_weight: bytes before the first layer.
        tail_weight: bytes after the last layer.

    Returns:
        [L] device of each layer.
    """
    if not devices:
        raise ValueError("split_layers: at least one device is needed")
    total = head_weight + sum(layer_weights) + tail_weight
    if total <= 0 or len(devices) == 1:
        return [devices[0]] * len(layer_weights)
    out = []
    seen = head_weight
    for weight in layer_weights:
        middle = seen + weight / 2  # a layer goes where its middle byte falls
        index = min(len(devices) - 1, int(middle * len(devices) / total))
        out.append(devices[index])
        seen += weight
    return out


def layer_devices_from_transfer_map(num_layers: int, transfer_map: Mapping[int, str], first_device: str) -> list[str]:
    """Expands KTransformers' `transfer_map` ({first layer index: device}) into [L] per-layer devices."""
    steps = sorted((int(k), str(v)) for k, v in transfer_map.items())
    for index, _ in steps:
        if not 0 <= index < num_layers:
            raise ValueError(f"transfer_map: layer {index} is out of range (the model has {num_layers} layers)")
    devices, current, pending = [], first_device, list(steps)
    for layer in range(num_layers):
        while pending and pending[0][0] == layer:
            current = pending.pop(0)[1]
        devices.append(current)
    return devices


def move_to_device(obj, device: torch.device):
    """Moves every tensor in a (nested) tuple / list / dict to `device`; other objects pass through."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True) if obj.device != device else obj
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(move_to_device(o, device) for o in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(move_to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: move_to_device(v, device) for k, v in obj.items()}
    return obj


def _module_device(module: nn.Module, skip: tuple[type, ...]) -> torch.device | None:
    """The device of the module's own tensors, not counting the submodules of type `skip`."""
    stack = [module]
    while stack:
        m = stack.pop()
        if isinstance(m, skip):
            continue
        for t in (*m.parameters(recurse=False), *m.buffers(recurse=False)):
            if t.device.type != "meta":
                return t.device
        stack.extend(reversed(list(m.children())))
    return None


def install_device_hooks(
    model: nn.Module,
    boundaries: Sequence[str],
    *,
    return_outputs: Sequence[str] = (),
    skip: tuple[type, ...] = (),
) -> list:
    """Makes activations follow the weights across devices.

    Args:
        model: the loaded model.
        boundaries: names of modules whose inputs must be moved to their weights' device (decoder
            layers, final norm, lm_head, and any module a rule placed on another device).
        return_outputs: names among `boundaries` whose outputs go back to their parent's device
            (modules placed inside a layer that lives elsewhere).
        skip: module types whose weights do not count (the CPU experts, which take inputs anywhere).

    Returns:
        The hook handles (call `.remove()` to undo).
    """
    handles = []
    for name in boundaries:
        module = model.get_submodule(name)
        device = _module_device(module, skip)
        if device is None:
            continue

        def pre_hook(mod, args, kwargs, _device=device):
            return move_to_device(args, _device), move_to_device(kwargs, _device)

        handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
        if name in return_outputs:
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            parent_device = _module_device(parent, (*skip, type(module)))
            if parent_device is not None and parent_device != device:

                def post_hook(mod, args, output, _device=parent_device):
                    return move_to_device(output, _device)

                handles.append(module.register_forward_hook(post_hook))
    logger.debug("device hooks on %d modules", len(boundaries))
    return handles


def device_boundaries(
    model: nn.Module, *, layers_path: str, placed: Mapping[str, str], experts: Sequence[str] = ()
) -> tuple[list[str], list[str]]:
    """Which modules need device hooks once tensors sit on several devices.

    Args:
        model: the model.
        layers_path: dotted path of the decoder layers' ModuleList.
        placed: {module name: device} from the placement plan.
        experts: names of the CPU experts modules (never hooked: they take inputs on any device).

    Returns:
        (boundaries, return_outputs) for `install_device_hooks`.
    """
    core_path = layers_path.rpartition(".")[0]
    core = model.get_submodule(core_path) if core_path else model
    boundaries = [f"{core_path}.{n}" if core_path else n for n, _ in core.named_children()]
    layers = model.get_submodule(layers_path)
    boundaries = [b for b in boundaries if b != layers_path]
    boundaries += [f"{layers_path}.{i}" for i in range(len(layers))]
    boundaries += [n for n, _ in model.named_children() if n != core_path.partition(".")[0]]
    return_outputs = []
    for name in placed:
        if name in boundaries or name in experts or name in ("", core_path):
            continue
        boundaries.append(name)
        return_outputs.append(name)
    return boundaries, return_outputs
