"""`kt_prepare`: the experts conversion of KTCallback, callable before the Trainer is built.

The Trainer moves the model to its device inside `__init__`, before any callback runs: for a model that
does not fit on the GPU, call `kt_prepare(model, device="cuda")` first. The conversion itself is
kt_core's (`kt_core.peft.take_over_peft_model`): a model from `kt_core.load_model` keeps the placement it
was loaded with.
"""

from __future__ import annotations

from kt_core.peft import expert_lora_parameters, is_prepared
from kt_core.peft import take_over_peft_model as kt_prepare

__all__ = ["expert_lora_parameters", "is_prepared", "kt_prepare"]
