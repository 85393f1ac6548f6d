"""Typed wrappers over the compiled operator (kt_core._C): kernel choice, input checks, calls.

The C++ side takes raw pointers; this module is where tensors are checked (device, dtype, contiguity,
shape) so that a bad input raises a clear Python error instead of reaching the kernel.

Legend: T = tokens, K = experts per token, E = experts, H = hidden, I = expert intermediate, r = LoRA rank.
"""

from __future__ import annotations

import functools
import logging
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from kt_core.config import KERNEL_ENV, current
from kt_core.reference import experts_reference
from kt_core.runtime.buffers import host_buffers
from kt_core.runtime.pack_cache import load_or_pack
from kt_core.runtime.pool import get_thread_pool

if TYPE_CHECKING:
    from kt_core.experts import KTExperts

__all__ = [
    "KERNEL_ENV",
    "available_kernels",
    "build_operator",
    "cache_row_floats",
    "check_expert_ids",
    "cpu_features",
    "dtype_name",
    "experts_backward",
    "experts_forward",
    "fp8_kernels",
    "lora_args",
    "new_operator",
    "operator_seconds",
    "phase_times",
    "quantization_error",
    "quantized_kernels",
    "record_phase_times",
    "resolve_kernel",
]

logger = logging.getLogger(__name__)

TORCH_KERNEL = "torch"  # the plain-torch reference, always available
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}
# Expert weights may also be block-quantized fp8 (DeepSeek-V3's release), on the kernels fp8_kernels() lists.
FP8 = torch.float8_e4m3fn
_WEIGHT_DTYPE_NAMES = {**_DTYPE_NAMES, FP8: "float8_e4m3fn"}

try:
    from kt_core import _C
except ImportError as exc:  # a source checkout that was never built
    _C = None
    _IMPORT_ERROR = exc
else:
    _IMPORT_ERROR = None


def not_built_reason() -> str:
    """Why the compiled module is missing, and where a built copy sits when another kt_core on sys.path has one:
    `python -m` puts the working directory first, so a source checkout there shadows the installed package."""
    import kt_core

    here = Path(__file__).resolve().parent
    own = {Path(d).resolve() for d in kt_core.__path__}  # an editable install's build folder is one of them
    built = [
        found
        for entry in sys.path
        if (found := Path(entry or ".").resolve() / "kt_core") not in own and any(found.glob("_C*.so"))
    ]
    reason = f"kt_core._C is not built ({_IMPORT_ERROR}); kt_core was imported from {here}"
    if built:
        reason += (
            f", which shadows a built copy at {built[0]} (a source checkout in the working directory comes first on "
            "sys.path): run from another directory, or install the checkout itself (pip install -e .)"
        )
    return reason


def cpu_features() -> dict[str, bool]:
    """The instruction-set extensions this CPU and OS allow (empty without the compiled module)."""
    return dict(_C.cpu_features()) if _C is not None else {}


def phase_times(reset: bool = False) -> dict[str, tuple[float, int]]:
    """Seconds and calls per phase of the packed kernels' forward / backward since the last reset.

    Recorded only while on (`KT_PHASE_TIMES=1`, or `record_phase_times(True)`); `reset` clears the totals
    after reading them.
    """
    if _C is None:
        return {}
    out = {name: (seconds, calls) for name, seconds, calls in _C.phase_times()}
    if reset:
        _C.reset_phase_times()
    return out


def record_phase_times(on: bool = True) -> None:
    """Turns the per-phase wall-time totals of `phase_times()` on or off (off by default: one branch per phase)."""
    if _C is not None:
        current()  # KT_PHASE_TIMES is handed over first: this call has the last word
        _C.set_phase_times(on)


def _kernel_variants() -> list[tuple[str, bool, str, bool]]:
    current()  # hands the config's amx_emulate (KT_AMX_EMULATE) to the compiled module first
    return _C.kernel_variants() if _C is not None else []


def available_kernels() -> list[str]:
    """Exact kernel variants this CPU runs, best first; "torch" (the reference) is always last."""
    variants = _kernel_variants()
    names = [name for name, runnable, _, quantized in variants if runnable and not quantized]
    return [*names, TORCH_KERNEL]


def quantized_kernels() -> list[str]:
    """Variants this CPU runs that quantize the weights at load (int8): chosen only by name."""
    variants = _kernel_variants()
    return [name for name, runnable, _, quantized in variants if runnable and quantized]


def fp8_kernels() -> list[str]:
    """Kernel variants this CPU runs on fp8 expert weights, best first: the bf16 packed variants (amx_bf16,
    avx512_bf16_packed), which pack the e4m3 bytes with their block scales and convert them to bf16 right before the
    dot products, then the unpacked ones, which convert them to fp32 in registers; "torch" (the reference, on weights
    dequantized per call) is always last. The quantized variants (int8 / int4), which quantize bf16 weights, are
    not among them."""
    current()
    return [*(_C.fp8_kernels() if _C is not None else []), TORCH_KERNEL]


def resolve_kernel(kernel: str = "auto", weight_dtype: torch.dtype | None = None) -> str:
    """Maps "auto" (or the config's kernel: KT_KERNEL) to a concrete variant and checks it runs here, and on
    expert weights of `weight_dtype` (fp8 runs on `fp8_kernels()` only; None: any)."""
    forced = current().kernel
    requested = forced or kernel
    if weight_dtype == FP8:
        return _resolve_fp8_kernel(requested, forced)
    available = available_kernels()
    if requested == "auto":
        if _C is None:
            logger.warning("%s; using the plain-torch experts", not_built_reason())
        return available[0]
    if requested in available or requested in quantized_kernels():
        return requested
    available = available + quantized_kernels()
    known = {name: missing for name, _, missing, _ in _kernel_variants()}
    source = f"{KERNEL_ENV}={requested}" if forced else f"kernel={requested!r}"
    why = f" ({known[requested]})" if requested in known else ""
    raise ValueError(f"{source}: this kernel cannot run here{why}; available: {', '.join(available)}")


def _resolve_fp8_kernel(requested: str, forced: str | None) -> str:
    available = fp8_kernels()
    if requested == "auto":
        return available[0]
    if requested in available:
        return requested
    resolve_kernel(requested)  # a kernel that does not run here at all says so first
    source = f"{KERNEL_ENV}={requested}" if forced else f"kernel={requested!r}"
    why = (
        "it quantizes bf16 weights to int8 / int4 at load"
        if requested in quantized_kernels()
        else "it is not an fp8 kernel on this CPU"
    )
    raise ValueError(
        f"{source} takes no fp8 expert weights (dtype=torch.float8_e4m3fn): {why}. fp8 weights run on: "
        f"{', '.join(available)}; for {requested} keep the experts in bf16 "
        "(KTExperts(dtype=torch.bfloat16), load_model(expert_dtype=torch.bfloat16): twice the host RAM)"
    )


def _check(name: str, t: torch.Tensor, shape: Sequence[int], dtypes: tuple[torch.dtype, ...]) -> None:
    if t.device.type != "cpu":
        raise ValueError(f"experts: {name} must be in host memory, got device {t.device}")
    if t.dtype not in dtypes:
        raise TypeError(f"experts: {name} must be {' or '.join(map(str, dtypes))}, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"experts: {name} must have shape {list(shape)}, got {list(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"experts: {name} must be contiguous")


def _check_inputs(module: KTExperts, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> tuple[int, int]:
    if x.dim() != 2 or ids.dim() != 2:
        raise ValueError(
            f"experts: expected hidden_states [T, H] and top_k_index [T, K], got {list(x.shape)} and {list(ids.shape)}"
        )
    T, K = ids.shape
    _check("hidden_states", x, (T, module.hidden_dim), tuple(_DTYPE_NAMES))
    _check("top_k_index", ids, (T, K), (torch.int64,))
    _check("top_k_weights", w, (T, K), (torch.float32,))
    return T, K


def check_expert_ids(ids: torch.Tensor, num_experts: int) -> None:
    bad = ((ids < -1) | (ids >= num_experts)).nonzero()
    if len(bad):
        t, k = bad[0].tolist()
        raise ValueError(
            f"top_k_index[{t}, {k}] = {ids[t, k].item()} is out of range: expected -1 or [0, {num_experts})"
        )


def dtype_name(dtype: torch.dtype) -> str:
    """The compiled module's name of an activation / weight dtype ("float32" or "bfloat16")."""
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"experts: dtype must be torch.float32 or torch.bfloat16, got {dtype}")
    return _DTYPE_NAMES[dtype]


def lora_args(lora: Sequence[torch.Tensor] | None, module: KTExperts):
    """The compiled module's LoRA argument: (rank, scaling, 4 factor addresses), or None without factors."""
    if not lora:
        return None
    for t in lora:
        if t.device.type != "cpu" or t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError("experts: LoRA factors must be contiguous fp32 tensors in host memory")
    return (module.lora.rank, module.lora.scaling, *(t.data_ptr() for t in lora))


def build_operator(module: KTExperts):
    """A C++ operator over the module's weights (borrowed pointers); packed variants pack (and quantize) them
    here, or load that work from the pack cache folder (KT_PACK_CACHE or KTExperts(pack_cache=...)), see
    runtime/pack_cache.py. Called by `KTExperts.operator()`, which keeps it while the weights stay put."""
    op = new_operator(module)
    load_or_pack(module, op, get_thread_pool(module.cpu_infer))
    gate_up_err, down_err = op.quantization_error
    if gate_up_err or down_err:
        logger.info(
            "experts (%s): weights quantized, relative error gate_up %.2e, down %.2e",
            module.kernel,
            gate_up_err,
            down_err,
        )
    return op


def new_operator(module: KTExperts):
    """The C++ operator over the module's weights (borrowed pointers), checked, not yet packed (build_operator
    packs it; kt_core.distributed.shared_packs lends it a node's shared packed copy instead)."""
    if _C is None:
        raise RuntimeError(f"{not_built_reason()}; only kernel='torch' runs here")
    E, H, I = module.num_experts, module.hidden_dim, module.intermediate_dim
    _check("gate_up_proj", module.gate_up_proj, (E, 2 * I, H), tuple(_WEIGHT_DTYPE_NAMES))
    _check("down_proj", module.down_proj, (E, H, I), (module.gate_up_proj.dtype,))
    scales = {}
    if module.gate_up_proj.dtype == FP8:
        gate_up_scale, down_scale = module.gate_up_proj_scale_inv, module.down_proj_scale_inv
        _check("gate_up_proj_scale_inv", gate_up_scale, module.fp8_scale_shape("gate_up_proj"), (torch.float32,))
        _check("down_proj_scale_inv", down_scale, module.fp8_scale_shape("down_proj"), (torch.float32,))
        scales = dict(
            gate_up_scale_ptr=gate_up_scale.data_ptr(),
            down_scale_ptr=down_scale.data_ptr(),
            block=tuple(module.weight_block_size),
        )
    op = _C.ExpertsOp(
        module.kernel,
        E,
        H,
        I,
        module.gate_up_proj.data_ptr(),
        module.down_proj.data_ptr(),
        _WEIGHT_DTYPE_NAMES[module.gate_up_proj.dtype],
        **scales,
    )
    return op


def quantization_error(module: KTExperts) -> tuple[float, float]:
    """Relative Frobenius error (gate_up, down) of the layer's quantized weights; (0, 0) when not quantized."""
    if module.kernel == TORCH_KERNEL:
        return 0.0, 0.0
    return tuple(module.operator().quantization_error)


def _chunks(module: KTExperts, T: int) -> list[tuple[int, int]]:
    # Large batches run in chunks of `chunk_size` tokens: bounded scratch memory, same result.
    size = getattr(module, "chunk_size", None) or max(T, 1)
    return [(t0, min(T, t0 + size)) for t0 in range(0, T, size)] or [(0, 0)]


def cache_row_floats(module: KTExperts, lora, dtype: torch.dtype | None = None) -> int:
    """fp32 elements per routed row of the forward's cache, for activations of `dtype` (None: the weights' dtype).

    The gate_up pre-activations [2I] (for bf16 activations 24 of their 32 bits, as 2 + 1 bytes each with the
    1-byte part's row padded to 4-byte units; fp32 otherwise), then the scaled LoRA inputs of gate_up and down [r]
    each, fp32; each section holds all rows of a chunk before the next starts. The compiled module computes it
    (csrc/moe/experts_op.h: ForwardCache::row_floats), so the layout has one definition.
    """
    if _C is None:
        raise RuntimeError(f"{not_built_reason()}; only kernel='torch' runs here")
    dtype = dtype or (module.gate_up_proj.dtype if module.gate_up_proj.dtype in _DTYPE_NAMES else torch.bfloat16)
    return _C.cache_row_floats(module.intermediate_dim, module.lora.rank if lora else 0, _DTYPE_NAMES[dtype])


_operator_s = 0.0  # wall seconds inside experts_forward / experts_backward in this process (operator_seconds)
_operator_lock = threading.Lock()  # calls come from the training thread and from the streaming runtime's pool


def operator_seconds() -> float:
    """Wall seconds this process has spent in the CPU operator's calls (experts_forward and experts_backward: every
    forward, checkpointed recomputation and backward, any thread), cumulative. What `kt_cpu_expert_share` counts
    (kt_core.runtime.expert_time)."""
    return _operator_s


def _timed(call):
    @functools.wraps(call)
    def timed(*args, **kwargs):
        global _operator_s
        t0 = time.perf_counter()
        try:
            return call(*args, **kwargs)
        finally:
            elapsed = time.perf_counter() - t0
            with _operator_lock:
                _operator_s += elapsed

    return timed


@_timed
def experts_forward(
    module: KTExperts,
    x: torch.Tensor,
    ids: torch.Tensor,
    w: torch.Tensor,
    *,
    lora: Sequence[torch.Tensor] | None = None,
    save_for_backward: bool = False,
    pin_output: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Routed-experts forward on the CPU.

    Args:
        module: the layer (weights, kernel choice, LoRA scaling).
        x: [T, H] fp32 or bf16, host memory. ids: [T, K] int64 (-1 = skip). w: [T, K] fp32.
        lora: (gate_up_A, gate_up_B, down_A, down_B) fp32 factors, or None.
        save_for_backward: also return, for backward, the gate_up pre-activations [T*K, 2I] (24 bits for bf16 x,
            fp32 otherwise; packed into a 1-D fp32 tensor) and with LoRA the scaled LoRA inputs of both projections.
        pin_output: allocate y in pinned memory (it is going to a GPU).

    Returns:
        y [T, H] in x.dtype, and the cache (or None).
    """
    T, K = _check_inputs(module, x, ids, w)
    released = module.host_weights_released
    if save_for_backward and released and not module.operator().packed_backward(_DTYPE_NAMES[x.dtype]):
        raise RuntimeError(
            f"KTExperts: the backward of kernel {module.kernel!r} with {x.dtype} activations reads the expert weights, "
            "which this layer released once packed (release_host_weights); restore_host_weights() gives them back, "
            "or train with bf16 activations on a bf16-format kernel (amx_bf16, avx512_bf16_packed)"
        )
    if module.kernel == TORCH_KERNEL:
        check_expert_ids(ids, module.num_experts)  # the C++ operator checks them itself
        with torch.no_grad():
            y = experts_reference(x, ids, w, *module.reference_weights(), lora, _scaling(module))
        return y, None
    # Recycled like the cache below (pinned outputs are not: pinning is the caller's own allocation).
    if pin_output:
        y = torch.empty((T, module.hidden_dim), dtype=x.dtype, pin_memory=True)
    else:
        y = host_buffers.empty(T * module.hidden_dim, x.dtype).view(T, module.hidden_dim)
    row_floats = cache_row_floats(module, lora, x.dtype)
    # Recycled: a fresh buffer this size costs a page fault per 4 KB on first touch (see runtime/buffers.py).
    cache = host_buffers.empty(T * K * row_floats) if save_for_backward else None
    op, pool, factors = module.operator(), get_thread_pool(module.cpu_infer), lora_args(lora, module)
    if module.release_after_packing and not (released or save_for_backward):
        _release_once_packed(module, op, x.dtype)
    for t0, t1 in _chunks(module, T):
        op.forward(
            pool,
            t1 - t0,
            K,
            x[t0:t1].data_ptr(),
            _DTYPE_NAMES[x.dtype],
            ids[t0:t1].data_ptr(),
            w[t0:t1].data_ptr(),
            y[t0:t1].data_ptr(),
            cache[t0 * K * row_floats :].data_ptr() if cache is not None else 0,
            factors,
        )
    return y, cache


def _release_once_packed(module: KTExperts, op, dtype: torch.dtype) -> None:
    """Forward-only use (KTExperts.release_after_packing): frees the layer's weights once its packed copy computes
    forwards of these activations, unless a GPU share copies the weights to the GPU."""
    if getattr(module.gpu_share, "reads_host_weights", False) or not op.packed_forward(_DTYPE_NAMES[dtype]):
        return
    freed = module.release_host_weights()
    logger.info("experts (%s): %.2f GiB of weights freed once packed (forward only)", module.kernel, freed / 2**30)


@_timed
def experts_backward(
    module: KTExperts,
    x: torch.Tensor,
    ids: torch.Tensor,
    w: torch.Tensor,
    dy: torch.Tensor,
    *,
    cache: torch.Tensor | None = None,
    lora: Sequence[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...] | None]:
    """Routed-experts backward on the CPU (base weights frozen).

    Args:
        module, x, ids, w, lora: as for experts_forward.
        dy: [T, H] gradient of the output, x.dtype.
        cache: what experts_forward returned with save_for_backward, or None to recompute.

    Returns:
        dx [T, H] (x.dtype), dw [T, K] fp32, and the LoRA factor gradients (or None).
    """
    T, K = _check_inputs(module, x, ids, w)
    _check("grad_output", dy, (T, module.hidden_dim), (x.dtype,))
    if module.kernel == TORCH_KERNEL:
        return _reference_backward(module, x, ids, w, dy, lora)
    dx = host_buffers.empty(x.numel(), x.dtype).view(x.shape)  # recycled: no fresh pages per call
    dw = torch.empty((T, K), dtype=torch.float32)
    lora_grads = tuple(torch.empty_like(t) for t in lora) if lora else None
    chunks = _chunks(module, T)
    # The C++ side overwrites the factor gradients: with several chunks each one gets its own and they add up.
    chunk_grads = tuple(torch.empty_like(t) for t in lora) if lora and len(chunks) > 1 else lora_grads
    row_floats = cache_row_floats(module, lora, x.dtype)
    bad_cache = cache is not None and (cache.dtype != torch.float32 or not cache.is_contiguous())
    if bad_cache or (cache is not None and cache.numel() < T * K * row_floats):
        raise ValueError(
            f"experts: cache must be the contiguous fp32 tensor experts_forward returned for these inputs "
            f"(at least {T * K * row_floats} elements), got {cache.dtype} with {cache.numel()}"
        )
    op, pool, factors = module.operator(), get_thread_pool(module.cpu_infer), lora_args(lora, module)
    for i, (t0, t1) in enumerate(chunks):
        op.backward(
            pool,
            t1 - t0,
            K,
            x[t0:t1].data_ptr(),
            _DTYPE_NAMES[x.dtype],
            ids[t0:t1].data_ptr(),
            w[t0:t1].data_ptr(),
            dy[t0:t1].data_ptr(),
            dx[t0:t1].data_ptr(),
            dw[t0:t1].data_ptr(),
            cache[t0 * K * row_floats :].data_ptr() if cache is not None else 0,
            factors,
            tuple(g.data_ptr() for g in chunk_grads) if chunk_grads else None,
        )
        if chunk_grads is not lora_grads:
            for total, part in zip(lora_grads, chunk_grads, strict=True):
                total.copy_(part) if i == 0 else total.add_(part)
    return dx, dw, lora_grads


def _scaling(module: KTExperts) -> float:
    return module.lora.scaling if module.lora is not None else 1.0


def _reference_backward(module, x, ids, w, dy, lora):
    with torch.enable_grad():
        xr = x.detach().requires_grad_()
        wr = w.detach().requires_grad_()
        factors = [t.detach().requires_grad_() for t in lora] if lora else None
        y = experts_reference(xr, ids, wr, *module.reference_weights(), factors, _scaling(module))
        inputs = [xr, wr, *(factors or [])]
        # No routed slot at all leaves y outside the graph: every gradient is zero.
        grads = torch.autograd.grad(y, inputs, dy, allow_unused=True) if y.requires_grad else [None] * len(inputs)
    grads = [g if g is not None else torch.zeros_like(t) for g, t in zip(grads, inputs, strict=True)]
    return grads[0], grads[1], tuple(grads[2:]) if lora else None
