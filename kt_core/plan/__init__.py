"""Projected LoRA fine-tuning speed and memory of a MoE model on a machine (`python -m kt_core.plan`).

Uses the streaming planner's own cost model (kt_core.streaming.planner) with speeds measured on the GPU
test machine, scaled to other machines (kt_core/plan/machines.py says how).
"""

from kt_core.plan.machines import MACHINES, Machine
from kt_core.plan.models import MODELS, ModelShape
from kt_core.plan.projection import Projection, project

__all__ = ["MACHINES", "MODELS", "Machine", "ModelShape", "Projection", "project"]
