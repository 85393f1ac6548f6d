"""The CPU experts of a KTExperts as stream-ordered work on a CUDA stream, so that a CUDA graph can hold them.

The ordinary path (bridge.py) waits for the routing on the host, computes, and copies the result back: a
host wait that a CUDA graph capture cannot contain. Here the whole CPU share is enqueued on a stream:

    rows = host row of each routed id (-1: computed elsewhere)        on the device
    copy x, rows, w -> pinned host buffers                             async copies
    the C++ operator on those buffers                                  host function (cuLaunchHostFunc)
    copy y <- pinned host buffer                                       async copy

A capture records the host function as a host node: each replay of the graph runs the operator between the
copies, with the pointers and token count fixed at capture. The pinned buffers are made outside any capture
(CUDA graph runners run each batch size once before capturing it) and shared by the layers of the model:
their work follows stream order, one layer after the other. No gradient flows here (serving only), and the
host function never calls CUDA. A run that fails inside the host function fills y with NaN (it cannot raise
there) and records the error, which the next call raises.

Legend: T = tokens, K = experts per token, H = hidden.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from kt_core import kernels
from kt_core.runtime.pool import get_thread_pool

__all__ = ["PinnedArenas", "StreamOrderedForward"]


@functools.cache
def _launch_host_func_address() -> int:
    # The CUDA driver is loaded (torch initialized it); its cuLaunchHostFunc takes a runtime stream handle.
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        raise RuntimeError(f"stream-ordered experts need the CUDA driver (libcuda.so.1): {e}") from e
    return ctypes.cast(driver.cuLaunchHostFunc, ctypes.c_void_p).value


class PinnedArena:
    """Pinned host buffers for up to `max_tokens` tokens: x [max, H] and y [max, H] in `dtype`, rows [max, K]
    int64, w [max, K] fp32."""

    def __init__(self, max_tokens: int, hidden: int, top_k: int, dtype: torch.dtype):
        self.max_tokens = max_tokens
        pin = torch.cuda.is_available()  # (without a GPU, for tests of the bookkeeping)
        self.x = torch.empty(max_tokens, hidden, dtype=dtype, pin_memory=pin)
        self.y = torch.empty(max_tokens, hidden, dtype=dtype, pin_memory=pin)
        self.rows = torch.empty(max_tokens, top_k, dtype=torch.int64, pin_memory=pin)
        self.w = torch.empty(max_tokens, top_k, dtype=torch.float32, pin_memory=pin)


class PinnedArenas:
    """The pinned buffers of a model's stream-ordered layers, shared by all of them (their runs follow one
    stream's order). A larger batch than the newest arena holds gets a new one, made outside any capture
    (pinning memory is not allowed while a stream captures); the older ones stay alive, since the runs made
    for them (and the graphs that captured those) keep their pointers.

    Args:
        hidden, top_k, dtype: H, K and the activations' dtype of the model's experts.
        max_tokens: the largest batch served this way (larger ones take the waiting path).
    """

    def __init__(self, hidden: int, top_k: int, dtype: torch.dtype, max_tokens: int = 1024):
        self.hidden, self.top_k, self.dtype, self.max_tokens = hidden, top_k, dtype, max_tokens
        self._arenas: list[PinnedArena] = []

    def serves(self, T: int, hidden: int, top_k: int, dtype: torch.dtype) -> bool:
        return 0 < T <= self.max_tokens and (hidden, top_k, dtype) == (self.hidden, self.top_k, self.dtype)

    def for_tokens(self, T: int) -> PinnedArena:
        """An arena holding T tokens; raises while a capture is on when a new one would be needed."""
        if self._arenas and self._arenas[-1].max_tokens >= T:
            return self._arenas[-1]
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"stream-ordered experts: a CUDA graph of {T} tokens is being captured, but no pinned buffers of "
                "that size were made before the capture (run the batch once without capturing first, as CUDA "
                "graph runners do to warm up)"
            )
        size = min(self.max_tokens, max(T, 2 * self._arenas[-1].max_tokens if self._arenas else T))
        self._arenas.append(PinnedArena(size, self.hidden, self.top_k, self.dtype))
        return self._arenas[-1]


class StreamOrderedForward:
    """Enqueues a KTExperts' CPU share on the current CUDA stream (no host wait; capturable).

    Args:
        experts: the layer (its weights, LoRA factors and, with `expert_ids`, its id -> row map).
        arenas: the model's pinned buffers.
    """

    def __init__(self, experts, arenas: PinnedArenas):
        self.experts = experts
        self.arenas = arenas
        self._calls: dict[int, tuple] = {}  # T -> (kt_core._C.StreamForward, the PinnedArena it reads and writes)
        self._rows: torch.Tensor | None = None  # [total_experts + 1] id -> host row, on the device

    def __call__(
        self, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """y [T, H] on x's device: the CPU experts' sum for each token (0 where every slot is elsewhere).

        Args:
            x: [T, H] on a CUDA device, fp32 or bf16. ids: [T, K] expert ids (-1: skip). w: [T, K].
            out: [T, H] device tensor to write y into (e.g. allocated on another stream, which then waits
                for this one); None: a new one.
        """
        T, K = ids.shape
        if not self.arenas.serves(T, self.experts.hidden_dim, K, x.dtype):
            raise RuntimeError(
                f"stream-ordered experts: a batch of {T} tokens (H={self.experts.hidden_dim}, K={K}, {x.dtype}) is "
                f"not served by pinned buffers for 1-{self.arenas.max_tokens} tokens (H={self.arenas.hidden}, "
                f"K={self.arenas.top_k}, {self.arenas.dtype})"
            )
        call, arena = self._call(T, K)
        if call.error:
            raise RuntimeError(f"stream-ordered experts: the CPU operator failed in an earlier run: {call.error}")
        rows = self._rows_on(ids.device)[ids.long()]  # [T, K]; ids -1 index the trailing -1
        arena.x[:T].copy_(x, non_blocking=True)
        arena.rows[:T].copy_(rows, non_blocking=True)
        arena.w[:T].copy_(w.float(), non_blocking=True)
        call.enqueue(_launch_host_func_address(), torch.cuda.current_stream(x.device).cuda_stream)
        if out is None:
            return arena.y[:T].to(x.device, non_blocking=True)
        return out.copy_(arena.y[:T], non_blocking=True)

    def _call(self, T: int, K: int) -> tuple:
        if T not in self._calls:
            experts, arena = self.experts, self.arenas.for_tokens(T)
            call = experts.operator().stream_forward(
                get_thread_pool(experts.cpu_infer),
                T,
                K,
                arena.x.data_ptr(),
                kernels.dtype_name(arena.x.dtype),
                arena.rows.data_ptr(),
                arena.w.data_ptr(),
                arena.y.data_ptr(),
                kernels.lora_args(experts.active_lora_factors(), experts),
                experts.chunk_size or 0,
            )
            self._calls[T] = (call, arena)
        return self._calls[T]

    def _rows_on(self, device: torch.device) -> torch.Tensor:
        if self._rows is None or self._rows.device != device:
            experts = self.experts
            rows = experts.host_rows
            if rows is None:  # every expert in host memory, id e in row e
                rows = torch.cat([torch.arange(experts.num_experts), torch.tensor([-1])])
            self._rows = rows.to(device)
        return self._rows
