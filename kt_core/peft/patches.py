"""Every change kt-plugins makes to PEFT's behaviour, and the PEFT releases each one is written for.

PEFT only knows its own layers; a KTExperts that took an experts module's LoRA over (takeover.py) is not one
of them. Tested: PEFT 0.18.1 (constraints.txt, CI) and 0.21 (the GPU machine); pyproject.toml asks for
peft >= 0.18, the first release with LoRA on parameters (`lora.ParamWrapper`, `target_parameters`).

route_merge_and_unload        PEFT 0.18 and >= 0.19 (0.18.1, 0.21 tested)
    `merge_and_unload()` / `unload()` of the tuner (BaseTuner): the expert LoRA is merged into (or dropped
    from) the KTExperts weights first, then PEFT merges the rest and returns the plain transformers model.
route_adapter_switch          PEFT 0.18 and >= 0.19 (0.18.1, 0.21 tested)
    `disable_adapter_layers()` / `enable_adapter_layers()` of the tuner (what `with model.disable_adapter():`
    calls, as the reference passes of DPO-style trainers do): the expert LoRA is switched off and on with PEFT's.
keep_expert_lora_trainable    PEFT 0.18 and >= 0.19 (0.18.1, 0.21 tested)
    `_mark_only_adapters_as_trainable` of the tuner, run again when an adapter is added or loaded: the targeted
    expert-LoRA factors stay trainable.
route_adapter_state_dict      PEFT >= 0.19 (0.21 tested); on 0.18 it finds nothing to wrap and does nothing
    `<Tuner>._get_adapter_state_dict`, the classmethod with which PEFT >= 0.19 picks an adapter's entries by
    visiting its tuner layers: the KTExperts' entries (already under PEFT's keys) are added to what it picked.
    PEFT 0.18 picks entries by key name, which finds them as they are.
ignore_peft_layer_warning, peft_layer_warning_filtered    PEFT 0.18 and >= 0.19 (0.18.1, 0.21 tested)
    `tuners_utils._get_in_out_features` warns "Unsupported layer type" for any layer that is not linear-like:
    a warnings filter hides it for KTExperts only.

The first three wrap bound methods of one PeftModel's tuner, on that instance; `route_adapter_state_dict`
wraps the classmethod of the tuner's class, once per process, and returns PEFT's answer unchanged for models
without KTExperts. Loading needs no patch: PEFT passes entries it has no layer for through, and the KTExperts'
load hook reads them (attach.py). PEFT is changed nowhere else: the factor layout that differs between 0.18 and
>= 0.19 is read off each wrapper (layout.py), and LLaMA-Factory's plugin adds the experts to the LoraConfig
that LLaMA-Factory passes to `get_peft_model` by swapping LLaMA-Factory's own reference to that function for one
call (kt_plugins/llamafactory/adapter.py); PEFT's function runs unchanged.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterator

from torch import nn

from kt_core.experts import KTExperts
from kt_core.peft.attach import merge_expert_lora_, peft_lora_experts, unload_expert_lora_
from kt_core.peft.keys import parse_lora_key
from kt_core.peft.layout import EXPERT_PARAMETERS

__all__ = [
    "ignore_peft_layer_warning",
    "keep_expert_lora_trainable",
    "peft_layer_warning_filtered",
    "route_adapter_state_dict",
    "route_adapter_switch",
    "route_merge_and_unload",
]


def _tuner(model: nn.Module) -> nn.Module | None:
    """The PeftModel's tuner (`model.base_model`, a LoraModel); None for a model PEFT did not wrap."""
    tuner = getattr(model, "base_model", None)
    return None if tuner is None or tuner is model else tuner


def route_merge_and_unload(model: nn.Module) -> None:
    """Makes PEFT's `merge_and_unload` / `unload` handle the expert LoRA held by KTExperts.

    PeftModel forwards both calls to its tuner; the tuner's bound methods are wrapped on this instance only.
    """
    tuner = _tuner(model)
    if tuner is None or not hasattr(tuner, "merge_and_unload"):
        return
    peft_merge, peft_unload = tuner.merge_and_unload, tuner.unload

    def merge_and_unload(*args, **kwargs):
        names = kwargs.get("adapter_names")
        for experts in peft_lora_experts(tuner):
            if names is None or experts.kt_peft_adapter in names:
                merge_expert_lora_(experts)
            else:
                unload_expert_lora_(experts)
        return peft_merge(*args, **kwargs)

    def unload(*args, **kwargs):
        for experts in peft_lora_experts(tuner):
            unload_expert_lora_(experts)
        return peft_unload(*args, **kwargs)

    merge_and_unload.__doc__ = peft_merge.__doc__
    unload.__doc__ = peft_unload.__doc__
    tuner.merge_and_unload = merge_and_unload
    tuner.unload = unload


def route_adapter_switch(model: nn.Module) -> None:
    """Makes the tuner's `disable_adapter_layers` / `enable_adapter_layers` switch the KTExperts' LoRA too."""
    tuner = _tuner(model)
    if tuner is None or not hasattr(tuner, "disable_adapter_layers"):
        return
    tuner.disable_adapter_layers = _then_switch_expert_lora(tuner, tuner.disable_adapter_layers, on=False)
    tuner.enable_adapter_layers = _then_switch_expert_lora(tuner, tuner.enable_adapter_layers, on=True)


def _then_switch_expert_lora(tuner: nn.Module, peft_switch, *, on: bool):
    """PEFT's switch of its adapter layers, then the same for the KTExperts' LoRA."""

    def switch(*args, **kwargs):
        result = peft_switch(*args, **kwargs)
        for experts in peft_lora_experts(tuner):
            experts.lora_enabled = on
        return result

    switch.__doc__ = peft_switch.__doc__
    return switch


def keep_expert_lora_trainable(model: nn.Module) -> None:
    """Keeps the targeted expert-LoRA factors trainable when PEFT re-marks its adapters as the only trainables."""
    tuner = _tuner(model)
    mark = getattr(tuner, "_mark_only_adapters_as_trainable", None)
    if mark is None:
        return

    def mark_only_adapters_as_trainable(*args, **kwargs):
        result = mark(*args, **kwargs)
        for experts in peft_lora_experts(tuner):
            for param_name in experts.kt_peft_chain:
                for factor in EXPERT_PARAMETERS[param_name]:
                    getattr(experts.lora, factor).requires_grad_(True)
        return result

    tuner._mark_only_adapters_as_trainable = mark_only_adapters_as_trainable


def route_adapter_state_dict(model: nn.Module) -> None:
    """Adds the KTExperts' expert-LoRA entries to the adapter state dict that PEFT >= 0.19 selects for saving.

    PEFT >= 0.19 selects the entries of an adapter structurally (`<Tuner>._get_adapter_state_dict`, a
    classmethod, visiting the tuner layers), so entries of a module that is not a PEFT layer are dropped.
    The classmethod of the model's tuner class is wrapped once per process; for models without KTExperts
    it returns what PEFT returns. Older PEFT selects entries by key name and has no such classmethod.
    """
    tuner = _tuner(model)
    if tuner is None:
        return
    cls = type(tuner)
    original = cls.__dict__.get("_get_adapter_state_dict")
    if not isinstance(original, classmethod) or getattr(original.__func__, "kt_routed", False):
        return
    select = original.__func__

    def _get_adapter_state_dict(klass, model, config, adapter_name, state_dict, unwanted_adapter_names):
        selected = select(klass, model, config, adapter_name, state_dict, unwanted_adapter_names)
        for name, module in model.named_modules():
            if not isinstance(module, KTExperts) or getattr(module, "kt_peft_adapter", None) != adapter_name:
                continue
            prefix = name.removeprefix("_fsdp_wrapped_module.") + "."
            for key, value in state_dict.items():
                if key.startswith(prefix) and _directly_below(key[len(prefix) :]):
                    selected.setdefault(key, value)
        return selected

    _get_adapter_state_dict.kt_routed = True
    _get_adapter_state_dict.__doc__ = select.__doc__
    cls._get_adapter_state_dict = classmethod(_get_adapter_state_dict)


def _directly_below(relative_key: str) -> bool:
    """Whether a key relative to a KTExperts is one of its PEFT LoRA entries (not a child module's)."""
    parsed = parse_lora_key(relative_key)
    return parsed is not None and not parsed.module


def _peft_layer_warning() -> str:
    # PEFT's LoraLayer reads in/out features of the wrapped module through `_get_in_out_features`, which
    # knows only linear-like layers and warns "Unsupported layer type ... proceed at your own risk" for any
    # other (peft/tuners/tuners_utils.py). A ParamWrapper around KTExperts takes its features from the
    # targeted parameter's shape instead, and kt_core then takes its LoRA over: the warning does not apply.
    return re.escape(f"Unsupported layer type '{KTExperts}' encountered")


@contextlib.contextmanager
def peft_layer_warning_filtered() -> Iterator[None]:
    """Within the block, PEFT's "Unsupported layer type" warning is not shown for KTExperts (only for it)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_peft_layer_warning(), category=UserWarning)
        yield


def ignore_peft_layer_warning() -> None:
    """Process-wide: PEFT's "Unsupported layer type" warning is not shown for KTExperts (only for it).

    Installed by kt_core.load_model / convert_model, after which the user's own `get_peft_model` wraps the
    KTExperts parameters; every other layer type keeps PEFT's warning.
    """
    warnings.filterwarnings("ignore", message=_peft_layer_warning(), category=UserWarning)
