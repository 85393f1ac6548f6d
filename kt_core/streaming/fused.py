"""Fused element-wise steps of the device path: one pass over memory each instead of several torch kernels.

On CUDA with Triton (bundled with torch's CUDA wheels) each step is one kernel; elsewhere, or with
`KT_STREAM_TRITON=0`, the same math runs as plain torch ops (the CPU "fake device" of the tests).

- silu_mul:        h = silu(gate) * up from gu = [gate | up], fp32 math, rounded once; with `add` (the LoRA
                   term), gu + add first, rounded to gu's dtype as a separate add would round it, and written
                   back into gu when the caller keeps it
- swiglu_backward: d(gate | up) from dh and gu, fp32 math, rounded once; with `add`, from dh + add (rounded
                   to dh's dtype first, likewise); with the rows' routing weights, also the routing-weight
                   gradient <dh, h> (h recomputed in registers) and d(gate | up) for those weights
- combine:         total[t] += sum_k w[t, k] * rows[slot(t, k)] over the slots of one piece, token-major
                   (each token's sum in registers: no atomics, no fp32 copy of the rows)

Legend: S = sorted slots of a piece, T = tokens, K = experts per token, H = hidden, I = expert intermediate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kt_core.config import current

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch builds do not ship Triton
    triton = None

__all__ = ["combine", "silu_mul", "swiglu_backward", "triton_enabled"]

ROWS = 8192  # rows per piece of the plain-torch fp32 work (bounds its temporaries)


def triton_enabled(t: torch.Tensor) -> bool:
    return triton is not None and t.is_cuda and current().stream_triton


# ---- public steps (dispatch) ----------------------------------------------------------------------------


def silu_mul(gu: torch.Tensor, add: torch.Tensor | None = None, *, sum_into_gu: bool = True) -> torch.Tensor:
    """[S, 2I] gu (+ [S, 2I] add) -> [S, I] silu(gate) * up in gu.dtype.

    With `add`, gate and up are those of gu + add, rounded to gu.dtype; `sum_into_gu` writes that sum into gu
    (what the backward reads), else gu is left as it was (one write fewer).
    """
    S, I = gu.shape[0], gu.shape[1] // 2
    if triton_enabled(gu) and S:
        h = gu.new_empty((S, I))
        extra = gu if add is None else add.contiguous()  # unused pointer without `add`
        _launch_rows(
            _silu_mul_kernel,
            S,
            I,
            gu,
            extra,
            h,
            gu.stride(0),
            extra.stride(0),
            h.stride(0),
            HAS_ADD=add is not None,
            STORE_SUM=add is not None and sum_into_gu,
        )
        return h
    if add is not None:
        gu = gu.add_(add) if sum_into_gu else gu + add
    if gu.dtype == torch.float32:
        return F.silu(gu[:, :I]) * gu[:, I:]
    h = gu.new_empty((S, I))
    for a in range(0, S, ROWS):  # fp32 math, rounded once (as the kernel, and as the backward recomputes h)
        torch.mul(F.silu(gu[a : a + ROWS, :I].float()), gu[a : a + ROWS, I:].float(), out=h[a : a + ROWS])
    return h


def swiglu_backward(
    dh: torch.Tensor, gu: torch.Tensor, add: torch.Tensor | None = None, w: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """d(gate | up) [S, 2I] in gu.dtype from [S, I] dh (+ [S, I] add, the sum rounded to dh.dtype) and [S, 2I] gu.

    With `w` ([S] fp32 routing weights; dh then is the gradient for a unit weight), the rows' d(gate | up) are
    scaled by w and the second result is [S] fp32 <dh (+ add), h>, h = silu(gate) * up rounded to gu.dtype as
    the forward rounded it (the routing-weight gradient); else it is None.
    """
    S, I = dh.shape
    dgu = torch.empty_like(gu)
    dots = torch.empty(S, dtype=torch.float32, device=gu.device) if w is not None else None
    if triton_enabled(gu) and S:
        dh = dh.contiguous()
        extra = dh if add is None else add.contiguous()  # unused pointers without `add` / `w`
        _swiglu_backward_kernel[(S,)](
            gu,
            dh,
            extra,
            gu if w is None else w.contiguous(),
            dgu,
            dgu if dots is None else dots,
            gu.stride(0),
            dh.stride(0),
            dgu.stride(0),
            I,
            HAS_ADD=add is not None,
            HAS_W=w is not None,
            BLOCK=_BLOCK,
        )
        return dgu, dots
    if add is not None:
        dh = dh + add
    for a in range(0, S, ROWS):
        g, u, d = gu[a : a + ROWS, :I].float(), gu[a : a + ROWS, I:].float(), dh[a : a + ROWS].float()
        sig = torch.sigmoid(g)
        if w is not None:
            h = (g * sig * u).to(gu.dtype).float()
            dots[a : a + ROWS] = (d * h).sum(-1)
            d = d * w[a : a + ROWS, None]
        dgu[a : a + ROWS, I:] = d * g * sig  # d(up) = dh * silu(gate)
        dgu[a : a + ROWS, :I] = d * u * sig * (1 + g * (1 - sig))
    return dgu, dots


def combine(
    total: torch.Tensor,
    rows: torch.Tensor,
    start: int,
    *,
    inv: torch.Tensor | None,
    tok: torch.Tensor,
    w_tok: torch.Tensor | None = None,
    w_sorted: torch.Tensor | None = None,
) -> None:
    """total[t] += sum_k w[t, k] * rows[inv[t, k] - start] over the slots of rows [start, start + S).

    Args:
        total: [T, H] fp32 accumulator. rows: [S, H] the piece's rows (sorted order).
        inv: [T*K] int64 sorted position of each token-major slot (None: no such map, the rows are added
            one by one). tok: [S] token of each of the piece's rows.
        w_tok: [T*K] fp32 routing weights in token order (None: weight 1). w_sorted: the piece's [S] weights.
    """
    if inv is not None and triton_enabled(rows) and rows.shape[0]:
        T, H = total.shape
        K = inv.shape[0] // T
        rows = rows.contiguous()
        w = w_tok if w_tok is not None else inv  # unused pointer when there are no weights
        grid = (T, triton.cdiv(H, _BLOCK))
        _combine_kernel[grid](total, rows, inv, w, start, rows.shape[0], H, K=K, HAS_W=w_tok is not None, BLOCK=_BLOCK)
        return
    for a in range(0, rows.shape[0], ROWS):
        piece = rows[a : a + ROWS]
        # one kernel either way: bf16 rows times fp32 weights promote to fp32
        piece = piece.float() if w_sorted is None else torch.mul(piece, w_sorted[a : a + ROWS, None].float())
        total.index_add_(0, tok[a : a + ROWS], piece)


# ---- Triton kernels ---------------------------------------------------------------------------------------

_BLOCK = 1024  # columns per program


def _launch_rows(kernel, rows: int, cols: int, *args, **flags) -> None:
    kernel[(rows, triton.cdiv(cols, _BLOCK))](*args, cols, **flags, BLOCK=_BLOCK)


if triton is not None:

    @triton.jit
    def _silu_mul_kernel(
        gu_ptr,
        add_ptr,
        h_ptr,
        stride_gu,
        stride_add,
        stride_h,
        I,
        HAS_ADD: tl.constexpr,
        STORE_SUM: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = cols < I
        gate, up = gu_ptr + row * stride_gu + cols, gu_ptr + row * stride_gu + I + cols
        g = tl.load(gate, mask=m, other=0.0).to(tl.float32)
        u = tl.load(up, mask=m, other=0.0).to(tl.float32)
        if HAS_ADD:  # the sums rounded to gu's dtype, as a separate add would leave them (and the backward reads them)
            add = add_ptr + row * stride_add + cols
            g = (g + tl.load(add, mask=m, other=0.0).to(tl.float32)).to(gu_ptr.dtype.element_ty)
            u = (u + tl.load(add + I, mask=m, other=0.0).to(tl.float32)).to(gu_ptr.dtype.element_ty)
            if STORE_SUM:
                tl.store(gate, g, mask=m)
                tl.store(up, u, mask=m)
            g, u = g.to(tl.float32), u.to(tl.float32)
        h = g * tl.sigmoid(g) * u
        tl.store(h_ptr + row * stride_h + cols, h.to(h_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _swiglu_backward_kernel(
        gu_ptr,
        dh_ptr,
        add_ptr,
        w_ptr,
        dgu_ptr,
        dots_ptr,
        stride_gu,
        stride_dh,
        stride_dgu,
        I,
        HAS_ADD: tl.constexpr,
        HAS_W: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)  # one row a program: its dot product summed in a fixed order
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for c in range(0, I, BLOCK):
            cols = c + tl.arange(0, BLOCK)
            m = cols < I
            g = tl.load(gu_ptr + row * stride_gu + cols, mask=m, other=0.0).to(tl.float32)
            u = tl.load(gu_ptr + row * stride_gu + I + cols, mask=m, other=0.0).to(tl.float32)
            d = tl.load(dh_ptr + row * stride_dh + cols, mask=m, other=0.0).to(tl.float32)
            if HAS_ADD:  # add: dh's shape and strides; the sum rounded to dh's dtype, as a separate add would round it
                a = tl.load(add_ptr + row * stride_dh + cols, mask=m, other=0.0).to(tl.float32)
                d = (d + a).to(dh_ptr.dtype.element_ty).to(tl.float32)
            sig = tl.sigmoid(g)
            if HAS_W:  # <dh, h> with h rounded as the forward stored it, then dh for the row's weight
                acc += d * (g * sig * u).to(gu_ptr.dtype.element_ty).to(tl.float32)
                d = d * tl.load(w_ptr + row).to(tl.float32)
            d_gate = d * u * sig * (1.0 + g * (1.0 - sig))
            d_up = d * g * sig
            out = dgu_ptr + row * stride_dgu + cols
            tl.store(out, d_gate.to(dgu_ptr.dtype.element_ty), mask=m)
            tl.store(out + I, d_up.to(dgu_ptr.dtype.element_ty), mask=m)
        if HAS_W:
            tl.store(dots_ptr + row, tl.sum(acc, axis=0))

    @triton.jit
    def _combine_kernel(
        total_ptr, rows_ptr, inv_ptr, w_ptr, start, n_rows, H, K: tl.constexpr, HAS_W: tl.constexpr, BLOCK: tl.constexpr
    ):
        t = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = cols < H
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for k in tl.static_range(K):
            r = tl.load(inv_ptr + t * K + k) - start
            inside = (r >= 0) & (r < n_rows)
            r = tl.where(inside, r, 0)
            ok = m & ((tl.zeros([BLOCK], dtype=tl.int32) + inside.to(tl.int32)) != 0)  # rows of other pieces: no read
            v = tl.load(rows_ptr + r * H + cols, mask=ok, other=0.0).to(tl.float32)
            if HAS_W:
                v = v * tl.load(w_ptr + t * K + k).to(tl.float32)
            acc += v
        dst = total_ptr + t * H + cols
        tl.store(dst, tl.load(dst, mask=m, other=0.0) + acc, mask=m)
