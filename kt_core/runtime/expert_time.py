"""`ExpertTimer`: wall time spent in a model's routed experts, and the input tokens it trained on.

The figure behind `kt_cpu_expert_share` (KTCallback, the LLaMA-Factory plugin). Each experts layer counts
one forward and one backward per training step, whether or not gradient checkpointing is on:

- a forward run by the autograd engine is a checkpoint recomputation (non-reentrant checkpointing
  recomputes inside the backward of a node whose saved tensors it restores; reentrant checkpointing inside
  its CheckpointFunction node) and is not counted: the step's first forward was;
- the backward is the time of the experts' own autograd node (prehook to hook). With reentrant
  checkpointing the first forward runs without a graph and the recomputation's node is the one that runs
  backward, so hooks go on every forward's output node: only nodes that run are timed.

Counting the recomputation as well over-reported the share by 1.2-1.7x with gradient checkpointing on.
"""

from __future__ import annotations

import time

import torch
from torch import nn

__all__ = ["ExpertTimer", "speed_logs"]


def _in_backward() -> bool:
    """Whether the caller runs inside an autograd node (a checkpoint recomputation)."""
    return torch._C._current_autograd_node() is not None


class ExpertTimer:
    """Wall time of the KTExperts layers of a model (forward and backward once each), and input tokens.

    Args:
        model: a model whose routed experts are KTExperts; its input embeddings, when it has them, count
            the training tokens.
    """

    def __init__(self, model: nn.Module):
        from kt_core.experts import KTExperts

        self.expert_s = 0.0
        self.tokens = 0
        self._step_s = 0.0
        self._last: float | None = None
        self._handles = []
        self._start: dict[int, float] = {}
        for module in model.modules():
            if isinstance(module, KTExperts):
                self._handles.append(module.register_forward_pre_hook(self._forward_start))
                self._handles.append(module.register_forward_hook(self._forward_end))
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if embeddings is not None:
            self._handles.append(embeddings.register_forward_pre_hook(self._count_tokens))

    def _forward_start(self, module, args) -> None:
        if not _in_backward():
            self._start[id(module)] = time.perf_counter()

    def _forward_end(self, module, args, output) -> None:
        started = self._start.pop(id(module), None)
        if started is not None:
            self.expert_s += time.perf_counter() - started
        node = output.grad_fn if isinstance(output, torch.Tensor) else None
        if node is not None:  # the experts' own backward node: time it when it runs
            begun: list[float] = []
            node.register_prehook(lambda grad_outputs: begun.append(time.perf_counter()))
            node.register_hook(lambda grad_inputs, grad_outputs: self._backward_end(begun))

    def _backward_end(self, begun: list[float]) -> None:
        if begun:
            self.expert_s += time.perf_counter() - begun.pop()

    def _count_tokens(self, module, args) -> None:
        if module.training and args and isinstance(args[0], torch.Tensor) and not _in_backward():
            self.tokens += args[0].numel()

    def take(self) -> tuple[float, int]:
        """Returns (expert seconds, tokens) since the last call and starts counting again."""
        out = (self.expert_s, self.tokens)
        self.expert_s, self.tokens = 0.0, 0
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

        The share is expert seconds over step wall time, forward and backward counted once per layer, or
        `cpu_expert_s` over it when the caller knows the CPU operator's own seconds (streaming: see
        `speed_logs`).
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
    computed. Without streaming that is the time inside the expert layers. With streaming (`streaming`, the
    StreamingRuntime) it is the CPU operator's own seconds as the runtime measures them, since there a layer's
    wall time also covers launching its GPU share and waiting for copies; the per-step split is added as
    `kt_stream_cpu_ms`, `kt_stream_pcie_ms`, `kt_stream_gpu_ms` (means per step) and `kt_stream_cpu_slot_share`
    (the CPU's share of the routed slots).
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
