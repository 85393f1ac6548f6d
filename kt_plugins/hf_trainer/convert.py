"""`kt_prepare`: the experts conversion of KTCallback, callable before the Trainer is built.

The Trainer moves the model to its device inside `__init__`, before any callback runs: for a model that
does not fit on the GPU, call `kt_prepare(model, device="cuda")` first. The conversion itself is
kt_core's (`kt_core.peft_takeover.take_over_peft_model`).
"""

from __future__ import annotations

from kt_core.peft_takeover import expert_lora_parameters, is_prepared
from kt_core.peft_takeover import take_over_peft_model as kt_prepare

__all__ = ["expert_lora_parameters", "is_prepared", "kt_prepare"]
