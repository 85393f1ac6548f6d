"""KTCallback: the Hugging Face Trainer with routed experts (and their LoRA) on the CPU.

    trainer = Trainer(model=peft_model, args=args, train_dataset=ds, callbacks=[KTCallback()])

`on_init_end` runs at the end of `Trainer.__init__`, before `train()` builds the optimizer, so the
optimizer sees the host-side expert-LoRA factors instead of the PEFT wrappers they replace. The Trainer
has already moved the model to its device by then: for a model larger than the GPU, call `kt_prepare`
on it before building the Trainer (the callback then finds it prepared).

Logged with every `logs` entry: `kt_tokens_per_s` (input tokens per second of training-step wall time)
and `kt_cpu_expert_share` (fraction of that time spent inside the experts operator, forward and backward).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import TrainerCallback

from kt_core.experts import KTExperts
from kt_core.placement import PlacementRule
from kt_plugins.hf_trainer.convert import expert_lora_parameters, kt_prepare

__all__ = ["KTCallback"]


class _ExpertTimer:
    """Wall time spent inside the KTExperts modules of a model, and input tokens seen in training."""

    def __init__(self, model: nn.Module):
        self.expert_s = 0.0
        self.tokens = 0
        self._handles = []
        for module in model.modules():
            if isinstance(module, KTExperts):
                self._handles.append(module.register_forward_pre_hook(self._forward_start))
                self._handles.append(module.register_forward_hook(self._forward_end))
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if embeddings is not None:
            self._handles.append(embeddings.register_forward_pre_hook(self._count_tokens))
        self._start: dict[int, float] = {}

    def _forward_start(self, module, args):
        self._start[id(module)] = time.perf_counter()

    def _forward_end(self, module, args, output):
        self.expert_s += time.perf_counter() - self._start.pop(id(module), time.perf_counter())
        node = output.grad_fn if isinstance(output, torch.Tensor) else None
        if node is not None:  # the experts' own backward node: time it as well
            started = []
            node.register_prehook(lambda grad_outputs: started.append(time.perf_counter()))
            node.register_hook(lambda grad_inputs, grad_outputs: self._backward_end(started))

    def _backward_end(self, started: list[float]) -> None:
        if started:
            self.expert_s += time.perf_counter() - started.pop()

    def _count_tokens(self, module, args):
        if module.training and args and isinstance(args[0], torch.Tensor):
            self.tokens += args[0].numel()

    def take(self) -> tuple[float, int]:
        """Returns (expert seconds, tokens) since the last call and starts counting again."""
        out = (self.expert_s, self.tokens)
        self.expert_s, self.tokens = 0.0, 0
        return out

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _model_device(model: nn.Module) -> torch.device:
    """The device of the model's non-expert weights (the experts are in host memory whatever happens)."""
    for module in model.modules():
        if not isinstance(module, KTExperts):
            for p in module.parameters(recurse=False):
                return p.device
    return torch.device("cpu")


class KTCallback(TrainerCallback):
    """Runs the routed experts of the Trainer's model, with their LoRA, on the CPU operator.

    Args:
        rules: placement rules (None: the family's defaults).
        kernel: CPU kernel of the experts ("auto": the best this CPU runs).
        cpu_infer: CPU threads of the experts operator.
        device: where the non-expert tensors go when the callback converts the model; None leaves them
            where the Trainer put them.
        log_speed: add `kt_tokens_per_s` and `kt_cpu_expert_share` to the Trainer's logs.
        gpu_memory_budget: when set ("10GiB"), split each MoE layer between CPU compute and GPU compute on
            PCIe-streamed weights within this much GPU memory for expert weights
            (`kt_core.enable_streaming`); the logs then carry the CPU / PCIe / GPU time split.
        stream_quantize: None, or "int8" to halve the streamed bytes (see `kt_core.enable_streaming`).
        stream_keep_bytes: GPU bytes of a checkpointed layer's expert intermediates kept between its
            recomputation and its backward when streaming ("1GiB"; see `kt_core.enable_streaming`).
        loss: the causal-LM loss of training steps without [tokens x vocab] logits
            (`kt_core.loss.enable_efficient_loss`): "auto" (Liger-Kernel or cut-cross-entropy on CUDA when
            installed, our chunked loss otherwise), "liger", "cce", "chunked", or "off" (transformers' loss).
    """

    def __init__(
        self,
        *,
        rules: str | Path | Sequence[PlacementRule] | None = None,
        kernel: str = "auto",
        cpu_infer: int | None = None,
        device: str | torch.device | None = None,
        log_speed: bool = True,
        gpu_memory_budget: int | str | None = None,
        stream_quantize: str | None = None,
        stream_keep_bytes: int | str = "1GiB",
        loss: str | bool = "auto",
    ):
        from kt_core.loss import normalize_loss_mode

        self.loss_mode = normalize_loss_mode(loss, key="KTCallback(loss)")
        self.efficient_loss = None  # kt_core.loss.EfficientLoss once attached
        self.options = {"rules": rules, "kernel": kernel, "cpu_infer": cpu_infer, "device": device}
        self.log_speed = log_speed
        self.streaming_options = (
            {"gpu_memory_budget": gpu_memory_budget, "quantize": stream_quantize, "keep_bytes": stream_keep_bytes}
            if gpu_memory_budget is not None
            else None
        )
        self._streaming = None
        self._timer: _ExpertTimer | None = None
        self._step_s = 0.0
        self._last = None

    def on_init_end(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("KTCallback: the Trainer passed no model to on_init_end")
        kt_prepare(model, **self.options)
        if self.streaming_options is not None and self._streaming is None:
            from kt_core import enable_streaming

            device = self.options["device"] or _model_device(model)  # stream to where the model computes
            self._streaming = enable_streaming(model, device=device, **self.streaming_options)
        if self.loss_mode != "off" and self.efficient_loss is None:
            from kt_core.loss import enable_efficient_loss

            self.efficient_loss = enable_efficient_loss(model, self.loss_mode)
        if self.log_speed and self._timer is None:
            self._timer = _ExpertTimer(model)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if optimizer is not None and model is not None:
            in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
            missing = [p for p in expert_lora_parameters(model) if id(p) not in in_optimizer]
            if missing:
                raise ValueError(
                    f"KTCallback: the optimizer does not hold {len(missing)} expert-LoRA factors; it was built "
                    "before the experts moved to the CPU operator. Call kt_prepare(model) before creating it."
                )
        if self._timer is not None:
            self._timer.take()
        self._step_s, self._last = 0.0, time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._streaming is not None:
            self._streaming.end_step()
        now = time.perf_counter()
        if self._last is not None:
            self._step_s += now - self._last
        self._last = now

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._timer is None or logs is None or self._step_s <= 0.0:
            return
        expert_s, tokens = self._timer.take()
        speed = {
            "kt_tokens_per_s": round(tokens / self._step_s, 2),
            "kt_cpu_expert_share": round(min(expert_s / self._step_s, 1.0), 4),
        }
        self._step_s = 0.0
        report = self._streaming.last_report if self._streaming is not None else None
        if report:
            speed.update(
                kt_stream_cpu_ms=round(report["cpu_s"] * 1e3, 1),
                kt_stream_pcie_ms=round(report["pcie_s"] * 1e3, 1),
                kt_stream_gpu_ms=round(report["gpu_s"] * 1e3, 1),
                kt_stream_cpu_slot_share=round(report["cpu_slot_share"], 4),
            )
        # Callbacks after this one (the progress printer) see `logs`; the Trainer has already copied it
        # into the history, so update that entry too.
        logs.update(speed)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(speed)

    def on_train_end(self, args, state, control, **kwargs):
        self._last = None
