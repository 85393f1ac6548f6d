"""`ExpertTimer`: seconds the CPU experts operator computed, and the input tokens the model trained on.

The figure behind `kt_cpu_expert_share` (KTCallback, the LLaMA-Factory plugin): the operator's own wall seconds
(`kt_core.kernels.operator_seconds`: every call of experts_forward / experts_backward, so a checkpointed layer's
recomputation counts, as the CPU computes it) over the step's wall time. The same meaning as with streaming, where
the runtime times its CPU calls the same way. Timing the expert layers from the outside instead (hooks on the
module and its autograd node) depended on the model: with gradient checkpointing, a layer whose first backward
node is not the experts' recomputes them outside the experts' backward window and the figure dropped that pass
(DeepSeek-V3 at full width: 74% of the step logged for an operator busy ~99% of it); it also counted the host
copies around the operator.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from kt_core import kernels

__all__ = ["ExpertTimer", "speed_logs"]


def _in_backward() -> bool:
    """Whether the caller runs inside an autograd node (a checkpoint recomputation)."""
    return torch._C._current_autograd_node() is not None


class ExpertTimer:
    """The CPU experts operator's seconds, and the input tokens, of a model's training steps.

    Args:
        model: a model whose routed experts are KTExperts; its input embeddings, when it has them, count
            the training tokens.
    """

    def __init__(self, model: nn.Module):
        self.tokens = 0
        self._step_s = 0.0
        self._last: float | None = None
        self._operator_s = kernels.operator_seconds()
        self._handles = []
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if embeddings is not None:
            self._handles.append(embeddings.register_forward_pre_hook(self._count_tokens))

    def _count_tokens(self, module, args) -> None:
        if module.training and args and isinstance(args[0], torch.Tensor) and not _in_backward():
            self.tokens += args[0].numel()

    def take(self) -> tuple[float, int]:
        """Returns (operator seconds, tokens) since the last call and starts counting again."""
        now = kernels.operator_seconds()
        out = (now - self._operator_s, self.tokens)
        self.tokens, self._operator_s = 0, now
        return out

    def start_steps(self) -> None:
        """Starts the step clock (at the start of training); what was counted before is dropped."""
        self.take()
        self._step_s, self._last = 0.0, time.perf_counter()

    def end_step(self) -> None:
        """Adds the wall time since the previous step ended (or training started) to the step clock."""
        now = time.perf_counter()
        if self._last is not None:
            self._step_s += now - self._last
        self._last = now

    def stop_steps(self) -> None:
        """Stops the step clock (at the end of training)."""
        self._last = None

    def report(self, cpu_expert_s: float | None = None) -> dict[str, float] | None:
        """`kt_tokens_per_s` and `kt_cpu_expert_share` over the steps since the last report (None: no step).

        The share is the operator's seconds over step wall time, or `cpu_expert_s` over it when the caller
        counts them itself (streaming: see `speed_logs`).
        """
        if self._step_s <= 0.0:
            return None
        expert_s, tokens = self.take()
        if cpu_expert_s is not None:
            expert_s = cpu_expert_s
        step_s, self._step_s = self._step_s, 0.0
        return {
            "kt_tokens_per_s": round(tokens / step_s, 2),
            "kt_cpu_expert_share": round(min(expert_s / step_s, 1.0), 4),
        }

    def remove(self) -> None:
        """Removes the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def speed_logs(timer: ExpertTimer, streaming=None) -> dict[str, float] | None:
    """What the training plugins log (KTCallback, `use_kt`), over the steps since their last log; None: no step.

    `kt_tokens_per_s`, and `kt_cpu_expert_share`: the fraction of step wall time the CPU experts operator
    computed (every pass it runs, recomputations included). Without streaming, the operator's seconds
    (`kernels.operator_seconds`); with streaming (`streaming`, the StreamingRuntime), its CPU calls as the runtime
    times them; the per-step split is added as `kt_stream_cpu_ms`, `kt_stream_pcie_ms`, `kt_stream_gpu_ms` (means
    per step) and `kt_stream_cpu_slot_share` (the CPU's share of the routed slots).
    """
    totals = streaming.take_totals() if streaming is not None else None
    cpu_s = None if streaming is None else (totals["cpu_s"] if totals else 0.0)
    speed = timer.report(cpu_expert_s=cpu_s)
    if speed is None or not totals:
        return speed
    per_step = 1e3 / totals["steps"]
    speed.update(
        kt_stream_cpu_ms=round(totals["cpu_s"] * per_step, 1),
        kt_stream_pcie_ms=round(totals["pcie_s"] * per_step, 1),
        kt_stream_gpu_ms=round(totals["gpu_s"] * per_step, 1),
        kt_stream_cpu_slot_share=round(totals["cpu_slot_share"], 4),
    )
    return speed
