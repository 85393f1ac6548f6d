"""Hugging Face Trainer integration: routed experts and their LoRA on the CPU, stock PEFT for the rest.

KTCallback    Trainer callback: converts the model at `on_init_end`, logs speed
kt_prepare    the same conversion, for models to convert before the Trainer moves them to the GPU
"""

from kt_plugins.hf_trainer.callback import KTCallback
from kt_plugins.hf_trainer.convert import kt_prepare

__all__ = ["KTCallback", "kt_prepare"]
