"""The one autograd bridge of an expert layer: a CPU part, and a GPU part when a share is attached.

Forward: the slots routed to experts that the GPU share computes in this call go to the share; every other
slot goes to the CPU operator (ids set to -1 where the GPU computes). With no share, or when the share holds
none of the routed experts, the CPU computes everything. When the share holds every expert of the layer
(`covers_all`), the call never leaves the device. The two partial outputs add up.

Backward: the same split. dx and the routing-weight gradients of both sides add; each expert-LoRA factor
receives one gradient, the sum of both sides', on the factors' device. Each side computes with a copy of the
factors on its own device (the GPU side's in its compute dtype) made at every forward call and kept on the
autograd context for the backward, so an in-place update of the factors, whoever makes it, is always seen: no
cache, nothing that can go stale.

Factors in host memory (the default): on the device path, under `backward()` (what every trainer calls), the
factor gradients are not returned through autograd (that would wait for the device in every layer): their
device-to-host copy is queued on the stream and one callback at the end of the backward pass adds them to the
factors' `.grad`, as autograd would. Where the pass does not accumulate into the factors (`torch.autograd.grad`,
`backward(inputs=...)` without them) they are returned through autograd, waiting for the device once per layer.
Factors on the GPU (`ExpertLoRA.place_`, done by streaming when they fit): the GPU side's gradients return
through autograd with no wait, and the CPU side's travel to the device.

Legend: T = tokens, K = experts per token, E = experts, H = hidden, I = expert intermediate, r = LoRA rank.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import torch

from kt_core import kernels
from kt_core.experts.split import split_slots
from kt_core.experts.staging import stage_to_host, to_device, upload_factors

if TYPE_CHECKING:
    from kt_core.experts.layer import KTExperts

__all__ = ["ExpertsFunction"]


def phase(*, forward: bool) -> str:
    """'fwd', 'recompute' (a checkpointed layer's forward inside the backward) or 'bwd'."""
    if not forward:
        return "bwd"
    return "recompute" if torch._C._current_graph_task_id() != -1 else "fwd"


class ExpertsFunction(torch.autograd.Function):
    """(module, x [T, H], ids [T, K], w [T, K], *lora factors) -> [T, H] in x's dtype and device."""

    @staticmethod
    def forward(ctx, module: KTExperts, x, ids, w, *lora):
        needs_grad = any(ctx.needs_input_grad[1:])
        ctx.module, ctx.w_dtype = module, w.dtype
        if module.gpu_share is None:
            return _cpu_forward(ctx, module, x, ids, w, lora, needs_grad)
        return _split_forward(ctx, module, x, ids, w, lora, needs_grad)

    @staticmethod
    def backward(ctx, dy):
        dy = dy.contiguous()
        if ctx.split:
            return _split_backward(ctx, dy)
        return _cpu_backward(ctx, dy)


def _grads(ctx, dx, dw, x, lora_grads):
    return (
        None,
        dx.to(x.dtype) if ctx.needs_input_grad[1] else None,
        None,
        dw.to(ctx.w_dtype) if ctx.needs_input_grad[3] else None,
        *(lora_grads or ()),
    )


# ---- CPU only --------------------------------------------------------------------------------------------


def _cpu_forward(ctx, module, x, ids, w, lora, needs_grad):
    ctx.split = False
    x_host, ids_host, w_host = stage_to_host(x, ids, w)
    rows = module.rows_of(ids_host.to(torch.int64), strict=True)  # [T, K]
    w_host = w_host.to(torch.float32)
    y, cache = kernels.experts_forward(
        module, x_host, rows, w_host, lora=_host(lora), save_for_backward=needs_grad, pin_output=x.is_cuda
    )
    if needs_grad:
        ctx.x_dtype = x.dtype
        ctx.save_for_backward(x_host, rows, w_host, cache, *lora)
    return to_device(y, x.device).to(x.dtype)


def _cpu_backward(ctx, dy):
    x_host, rows, w_host, cache, *lora = ctx.saved_tensors
    (dy_host,) = stage_to_host(dy)
    dx, dw, lora_grads = kernels.experts_backward(
        ctx.module, x_host, rows, w_host, dy_host.to(x_host.dtype), cache=cache, lora=_host(lora)
    )
    dx = to_device(dx, dy.device)
    return (
        None,
        dx.to(ctx.x_dtype) if ctx.needs_input_grad[1] else None,
        None,
        to_device(dw.to(ctx.w_dtype), dy.device) if ctx.needs_input_grad[3] else None,
        *(to_device(g, f.device) for f, g in zip(lora, lora_grads or (), strict=True)),
    )


# ---- CPU and GPU -----------------------------------------------------------------------------------------


def _host_split(module, call, ids_host, device):
    """CPU ids [T, K] (-1 on GPU slots) and the GPU parts for this call's GPU side."""
    if call.weight_sets is not None:
        return split_slots(ids_host, call.weight_sets, module.total_experts, device)
    on_gpu = torch.isin(ids_host, torch.tensor(call.experts, dtype=ids_host.dtype))
    return torch.where(on_gpu, -1, ids_host), None


def _empty_cache(module, lora, slots: int, dtype: torch.dtype) -> torch.Tensor:
    """A placeholder of the CPU cache's shape (untouched, so unbacked, host pages), or an empty tensor."""
    if module.kernel != kernels.TORCH_KERNEL:
        return torch.empty(slots * kernels.cache_row_floats(module, lora, dtype), dtype=torch.float32)
    return torch.empty(0)


def _split_forward(ctx, module, x, ids, w, lora, needs_grad):
    ctx.split = True
    share = module.gpu_share
    step_phase = phase(forward=True)
    call = share.begin(ids, step_phase)
    uses_our_lora = call.covers_all or bool(call.weight_sets)  # a share that routes itself brings its own
    dtype = getattr(share, "compute_dtype", None) or module.gate_up_proj.dtype  # fp8 weights: the share's GEMM dtype

    def device_factors():
        return upload_factors(lora, dtype, share.device) if uses_our_lora else None

    cache = None
    if call.covers_all:
        lora_dev = device_factors()
        y = call.forward(x, ids, w, None, lora_dev, keep=needs_grad and step_phase == "recompute")
        call.end()
        cpu_ids = torch.full(ids.shape, -1, dtype=torch.int64)
    else:
        x_host, ids_host, w_host = stage_to_host(x, ids, w)
        ids_host, w_host = ids_host.to(torch.int64), w_host.to(torch.float32)
        cpu_ids, parts = _host_split(module, call, ids_host, x.device)
        future = None
        if bool((cpu_ids >= 0).any()):
            rows, lora_host = module.rows_of(cpu_ids), _host(lora)
            future = call.submit_cpu(
                lambda: kernels.experts_forward(
                    module, x_host, rows, w_host, lora=lora_host, save_for_backward=needs_grad,
                    pin_output=x.is_cuda,
                ),
                slots=int((cpu_ids >= 0).sum()),
            )  # fmt: skip
        # After the routing reached the host: the host waits for the compute stream, whose uploads would wait
        # behind the layer's slot copy (host-to-device copies share one engine).
        lora_dev = device_factors()
        y = call.forward(x, ids, w, parts, lora_dev, keep=False) if parts or call.weight_sets is None else None
        call.end()
        if future is not None:
            y_cpu, cache = future.result()
            y_cpu = to_device(y_cpu, x.device).float()
            y = y_cpu if y is None else y + y_cpu
        if y is None:
            y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    if needs_grad:
        if cache is None:
            cache = _empty_cache(module, lora, ids.numel(), x.dtype)
        ctx.lora_dev = lora_dev
        # Gradient checkpointing compares the metadata of what is saved here with the recomputation's, whose
        # path may differ: both paths save the same tensors (the CPU cache always has its full shape), and
        # cpu_ids tell the backward whose split it is.
        ctx.save_for_backward(x, ids, w, cpu_ids, cache, *lora)
    return y.to(x.dtype)


def _split_backward(ctx, dy):
    module = ctx.module
    x, ids, w, fwd_cpu_ids, cache, *lora = ctx.saved_tensors
    call = module.gpu_share.begin(ids, "bwd")
    if call.covers_all:
        dx, dw, gpu_grads = call.backward(x, ids, w, dy, None, ctx.lora_dev)
        call.end()
        if not gpu_grads:
            return _grads(ctx, dx, dw, x, [None] * len(lora))
        factors, needs = module.lora.factors(), ctx.needs_input_grad[4:]
        if lora[0].device.type == "cpu" and _engine_accumulates(factors, needs):  # to `.grad` when the pass ends
            _deferred.add(factors, gpu_grads, needs, dy.device)
            return _grads(ctx, dx, dw, x, [None] * len(lora))
        return _grads(ctx, dx, dw, x, _lora_grads(lora, gpu_grads))  # returned now
    x_host, ids_host, w_host, dy_host = stage_to_host(x, ids, w, dy)
    ids_host, w_host = ids_host.to(torch.int64), w_host.to(torch.float32)
    cpu_ids, parts = _host_split(module, call, ids_host, x.device)
    if cache.numel() == 0 or not torch.equal(cpu_ids, fwd_cpu_ids):
        cache = None  # the split moved since the forward: the CPU recomputes what it needs
    cpu_mask = cpu_ids >= 0
    future = None
    if bool(cpu_mask.any()):
        rows, lora_host = module.rows_of(cpu_ids), _host(lora)
        future = call.submit_cpu(
            lambda: kernels.experts_backward(
                module, x_host, rows, w_host, dy_host.to(x_host.dtype), cache=cache, lora=lora_host
            ),
            slots=int(cpu_mask.sum()),
        )
    dx = torch.zeros(x.shape, dtype=torch.float32, device=x.device)  # [T, H]
    dw = torch.zeros(ids.shape, dtype=torch.float32, device=x.device)  # [T, K]
    gpu_grads = None
    if parts or call.weight_sets is None:
        dx, dw, gpu_grads = call.backward(x, ids, w, dy, parts, ctx.lora_dev)
    call.end()
    lora_grads = _lora_grads(lora, gpu_grads)
    if future is not None:
        dx_cpu, dw_cpu, cpu_lora = future.result()
        dx += to_device(dx_cpu, x.device).float()
        dw += to_device(torch.where(cpu_mask, dw_cpu, 0.0), x.device)
        for total, g in zip(lora_grads or (), cpu_lora or (), strict=True):
            total.add_(to_device(g, total.device))
    return _grads(ctx, dx, dw, x, lora_grads)


def _host(lora) -> tuple[torch.Tensor, ...] | None:
    """The factors as the CPU operator reads them: themselves in host memory, else host copies (one wait)."""
    if not lora or lora[0].device.type == "cpu":
        return tuple(lora) or None
    return tuple(stage_to_host(*(f.detach() for f in lora)))


def _lora_grads(lora, gpu_grads) -> list[torch.Tensor] | None:
    """The factors' gradients ([E, ...], on the factors' device) with the GPU side's parts added in."""
    lora_grads = [torch.zeros_like(f) for f in lora] if lora else None
    for experts, grads in gpu_grads or ():
        on_host = lora_grads[0].device.type == "cpu"
        idx = to_device(torch.tensor(experts), lora_grads[0].device)  # no host wait
        for total, g in zip(lora_grads, _to_host_fp32(grads) if on_host else grads, strict=True):
            total.index_add_(0, idx, g.to(total.dtype))
    return lora_grads


def _engine_accumulates(factors, needs) -> bool:
    """Whether this backward pass accumulates into every needed factor's `.grad` (`backward()`), rather than
    returning gradients (`torch.autograd.grad`) or leaving the factors out (`backward(inputs=...)`)."""
    try:
        return all(
            torch._C._will_engine_execute_node(torch.autograd.graph.get_gradient_edge(f).node)
            for f, need in zip(factors, needs, strict=True)
            if need
        )
    except RuntimeError as exc:  # the engine refuses to answer for leaves exactly when autograd.grad runs
        if "autograd.grad" not in str(exc):
            raise
        return False


def _to_host_fp32(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """Device tensors -> host fp32 tensors with one device-to-host copy (one wait on this stream)."""
    if grads[0].device.type == "cpu":
        return [g.float() for g in grads]
    (flat,) = stage_to_host(torch.cat([g.reshape(-1).float() for g in grads]))
    out, at = [], 0
    for g in grads:
        out.append(flat[at : at + g.numel()].view(g.shape))
        at += g.numel()
    return out


class _DeferredLoraGrads:
    """Device-side factor gradients on their way to the host, added to `.grad` when the backward pass ends."""

    def __init__(self):
        self._lock = threading.Lock()
        self._pending: list[tuple] = []
        self._queued = False

    def add(self, factors, gpu_grads, needs, device: torch.device) -> None:
        for f, need in zip(factors, needs, strict=True):
            if need and not f.is_leaf:
                raise RuntimeError("expert LoRA factors must be leaf parameters")
        for experts, grads in gpu_grads:
            flat = torch.cat([g.reshape(-1).float() for g in grads])  # device fp32
            host = torch.empty(flat.numel(), dtype=torch.float32, pin_memory=device.type == "cuda")
            host.copy_(flat, non_blocking=True)
            event = None
            if device.type == "cuda":
                event = torch.cuda.Event()
                event.record()
            with self._lock:
                self._pending.append((event, host, [g.shape for g in grads], factors, list(experts), list(needs)))
        with self._lock:
            if not self._queued:
                torch.autograd.Variable._execution_engine.queue_callback(self._flush)
                self._queued = True

    def _flush(self) -> None:
        with self._lock:
            pending, self._pending, self._queued = self._pending, [], False
        for event, host, shapes, factors, experts, needs in pending:
            if event is not None:
                event.synchronize()
            at = 0
            for f, shape, need in zip(factors, shapes, needs, strict=True):
                g = host[at : at + shape.numel()].view(shape)
                at += shape.numel()
                if not need:
                    continue
                if experts == list(range(f.shape[0])):
                    g = g.to(f.dtype, copy=True)
                else:
                    g = torch.zeros_like(f).index_add_(0, torch.tensor(experts), g.to(f.dtype))
                if f.grad is None:
                    f.grad = g
                else:
                    f.grad.add_(g)


_deferred = _DeferredLoraGrads()
