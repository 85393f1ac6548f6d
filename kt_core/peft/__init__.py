"""Expert LoRA declared the PEFT way (`LoraConfig(target_parameters=["mlp.experts.gate_up_proj", ...])`), run
by KTExperts. kt_core never imports peft: its wrappers are recognized by their attributes, its adapters are
read as files.

keys.py       the one grammar of PEFT's LoRA state-dict keys: `...experts.[base_layer.]*lora_{A,B}[.<adapter>].weight`
layout.py     PEFT's expert LoRA factors <-> ours (`kt_core.ExpertLoRA`), in the layouts of PEFT 0.18 and >= 0.19
folder.py     the adapter-folder reader (adapter_config.json, adapter_model.safetensors / .bin; the factor layout
              from the PEFT release recorded as `peft_version`)
wrappers.py   PEFT's ParamWrappers around one experts module: recognized, unwrapped, their LoRA converted
attach.py     that LoRA on a KTExperts: attached, saved and loaded under PEFT's keys, merged, dropped
takeover.py   take_over_peft_model: a whole PEFT model's experts onto KTExperts, in the placement already made
patches.py    every change to PEFT's behaviour, with the PEFT releases each one targets

Public (what the plugins use):
    take_over_peft_model, is_prepared, expert_lora_parameters    the take-over (KTCallback / kt_prepare, use_kt)
    is_peft_param_wrapper                                       whether a module is PEFT's wrapper of a parameter
    AdapterFolder, LoraKey, parse_lora_key                      adapter folders and their keys
    EXPERT_PARAMETERS, expert_factors_from_peft, expert_factors_to_peft    the layout conversion
    peft_layer_warning_filtered, ignore_peft_layer_warning      no "Unsupported layer type" warning for KTExperts
"""

from kt_core.peft.folder import AdapterFolder
from kt_core.peft.keys import LoraKey, parse_lora_key
from kt_core.peft.layout import EXPERT_PARAMETERS, expert_factors_from_peft, expert_factors_to_peft
from kt_core.peft.optimizers import warn_if_shape_dependent
from kt_core.peft.patches import ignore_peft_layer_warning, peft_layer_warning_filtered
from kt_core.peft.takeover import expert_lora_parameters, is_prepared, take_over_peft_model
from kt_core.peft.wrappers import is_peft_param_wrapper

__all__ = [
    "EXPERT_PARAMETERS",
    "AdapterFolder",
    "LoraKey",
    "expert_factors_from_peft",
    "expert_factors_to_peft",
    "expert_lora_parameters",
    "ignore_peft_layer_warning",
    "is_peft_param_wrapper",
    "is_prepared",
    "parse_lora_key",
    "peft_layer_warning_filtered",
    "take_over_peft_model",
    "warn_if_shape_dependent",
]
