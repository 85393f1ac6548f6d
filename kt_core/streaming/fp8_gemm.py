"""Grouped GEMMs straight from block-FP8 expert weights: e4m3 tiles dequantized in registers, no bf16 copy.

The FP8 experts of a streamed layer (kt_core.streaming.store.GroupedWeight: e4m3 values with one fp32 scale per
b0 x b1 block, as DeepSeek ships them) otherwise go through the store's bf16 working buffer: each group of experts is
dequantized there (a write and a read of 2 bytes per weight), then multiplied by torch._grouped_mm. Here one Triton
kernel loads each weight tile as e4m3, multiplies it by its block scale in fp32 and rounds it once to bf16 (bit for
bit the buffer's values), and feeds it to the tensor cores: a weight crosses memory as one byte, and the routing's
per-expert row counts never reach the host.

Both products of the device path: `transposed` (x @ W^T, the forward's gate/up and down) and not (x @ W, the
backward's dh and dx). Used where `applies(w)`: CUDA with Triton, bf16 compute, the streamed path's kernels on
(`KT_STREAM_TRITON`), every width and the block a multiple of the kernel's K step; elsewhere the working buffer,
which is allocated only where the kernel does not take the experts (`dequant_bytes_needed`).

Legend: S = sorted slots, G = experts of the weight set, N x K = one expert's weight (out x in), R = the product's
reduction length (K transposed, N not), C = its output columns (N transposed, K not).
"""

from __future__ import annotations

import torch

from kt_core.config import current

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch builds do not ship Triton
    triton = None

__all__ = ["applies", "dequant_bytes_needed", "grouped_mm", "takes"]

BM, BN, BK = 128, 128, 64  # rows of slots, output columns and reduction step per program
# (num_warps, num_stages) by product, transposed or not: the fastest of eight configurations at DeepSeek-V3 widths on
# an H100 at 64 and 256 rows per expert (benchmarks/RESULTS.md 2026-12-06, "grouped GEMMs from e4m3")
LAUNCH = {True: (8, 3), False: (4, 4)}


def takes(hidden: int, intermediate: int, block: tuple[int, int] | None, device: str | torch.device) -> bool:
    """Whether the kernel multiplies FP8 experts of these widths and quantization block on `device`."""
    if triton is None or block is None or torch.device(device).type != "cuda" or not current().stream_triton:
        return False
    return all(v % BK == 0 for v in (hidden, intermediate, *block))


def applies(w) -> bool:
    """Whether the kernel takes this GroupedWeight (else the store's working buffer does)."""
    gate_up = w.which == 0
    hidden, intermediate = (w.shape[2], w.shape[1] // 2) if gate_up else (w.shape[1], w.shape[2])
    return w.dtype == torch.bfloat16 and takes(hidden, intermediate, w.store.block, w.q.device)


def dequant_bytes_needed(
    dequant_bytes: int, hidden: int, intermediate: int, block: tuple[int, int] | None, device: str | torch.device
) -> int:
    """The working buffer FP8 experts need: none where the kernel takes them (0), else `dequant_bytes`. Read when
    streaming is enabled and planned; a run that turns the kernels off later (KT_STREAM_TRITON=0) then dequantizes
    each weight set into a buffer of its own, outside the plan."""
    return 0 if takes(hidden, intermediate, block, device) else dequant_bytes


def grouped_mm(x: torch.Tensor, w, offs: torch.Tensor, *, transposed: bool) -> torch.Tensor:
    """[S, R] x (sorted by group) times each group's dequantized weight: x @ W^T ([S, N]) if `transposed`, else
    x @ W ([S, K]); bf16 out, fp32 accumulation.

    Args:
        x: bf16 slots, the rows of group g at [offs[g-1], offs[g]).
        w: a GroupedWeight (q [G, N, K] e4m3, scale [G, N / b0, K / b1] fp32; gate_up's scale rows are gate's
            blocks, then up's).
        offs: [G] int32 cumulative row ends, on the device.
    """
    q, scale = w.q, w.scale
    G, N, K = q.shape
    S = x.shape[0]
    C = N if transposed else K
    y = x.new_empty((S, C))
    if S == 0:
        return y
    split = N // 2 if w.which == 0 else N  # gate_up: up's block rows follow gate's
    half = scale.shape[1] // 2 if w.which == 0 else 0
    b0, b1 = w.store.block
    # each group's tiles of BM rows, found by the programs on the device: no host read of the row counts
    ends = offs.to(torch.int64)
    counts = torch.diff(ends, prepend=ends.new_zeros(1))
    tile_ends = torch.cumsum((counts + BM - 1) // BM, 0)  # [G]
    max_tiles = triton.cdiv(S, BM) + G
    tile_group = torch.searchsorted(tile_ends, torch.arange(max_tiles, device=x.device), right=True)
    x = x.contiguous()
    if transposed:  # output columns run over N (rows of W), the reduction over K
        qc, qr, sc_scale, sr_scale = q.stride(1), q.stride(2), scale.stride(1), scale.stride(2)
    else:
        qc, qr, sc_scale, sr_scale = q.stride(2), q.stride(1), scale.stride(2), scale.stride(1)
    grid = (max_tiles, triton.cdiv(C, BN))
    _fp8_grouped_mm_kernel[grid](
        x,
        q,
        scale,
        y,
        ends,
        tile_ends,
        tile_group,
        x.shape[1],
        C,
        G,
        x.stride(0),
        y.stride(0),
        q.stride(0),
        qc,
        qr,
        scale.stride(0),
        sc_scale,
        sr_scale,
        split,
        half,
        B0=b0,
        B1=b1,
        TRANSPOSED=transposed,
        BM=BM,
        BN=BN,
        BK=BK,
        num_warps=LAUNCH[transposed][0],
        num_stages=LAUNCH[transposed][1],
    )
    return y


if triton is not None:

    @triton.jit
    def _n_block(n, split, half, B0: tl.constexpr):
        """The scale block row of W's row n: gate's blocks, then up's (w2: split = N, all rows below it)."""
        return tl.where(n < split, n // B0, half + (n - split) // B0)

    @triton.jit
    def _fp8_grouped_mm_kernel(
        x_ptr,
        q_ptr,
        s_ptr,
        y_ptr,
        ends_ptr,
        tile_ends_ptr,
        tile_group_ptr,
        R,
        C,
        G,
        stride_x,
        stride_y,
        stride_qg,
        stride_qc,
        stride_qr,
        stride_sg,
        stride_sc,
        stride_sr,
        split,
        half,
        B0: tl.constexpr,
        B1: tl.constexpr,
        TRANSPOSED: tl.constexpr,
        BM: tl.constexpr,
        BN: tl.constexpr,
        BK: tl.constexpr,
    ):
        tile = tl.program_id(0)
        g = tl.load(tile_group_ptr + tile).to(tl.int32)
        if g >= G:  # past the last group's tiles
            return
        first_tile = tl.load(tile_ends_ptr + g - 1, mask=g > 0, other=0)
        group_start = tl.load(ends_ptr + g - 1, mask=g > 0, other=0)
        group_end = tl.load(ends_ptr + g)
        rows = group_start + (tile - first_tile) * BM + tl.arange(0, BM)  # [BM] slots
        row_ok = rows < group_end
        cols = tl.program_id(1) * BN + tl.arange(0, BN)  # [BN] output columns
        col_ok = cols < C
        q_base = q_ptr + g.to(tl.int64) * stride_qg
        s_base = s_ptr + g.to(tl.int64) * stride_sg
        # the columns' scale blocks: W's rows n (transposed) or its columns k
        col_block = _n_block(cols, split, half, B0) if TRANSPOSED else cols // B1
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for r0 in range(0, R, BK):
            red = r0 + tl.arange(0, BK)  # [BK]
            xt = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + red[None, :], mask=row_ok[:, None], other=0.0)
            w_at = q_base + cols[:, None].to(tl.int64) * stride_qc + red[None, :] * stride_qr
            wq = tl.load(w_at, mask=col_ok[:, None], other=0.0)  # [BN, BK] e4m3
            # the step's scale block: one block column of k (transposed), or one block row of n (BK divides B0, split)
            red_block = r0 // B1 if TRANSPOSED else _n_block(r0, split, half, B0)
            sc = tl.load(s_base + col_block * stride_sc + red_block * stride_sr, mask=col_ok, other=0.0)  # [BN]
            wt = (wq.to(tl.float32) * sc[:, None]).to(xt.dtype)  # rounded once, as the working buffer holds it
            acc = tl.dot(xt, tl.trans(wt), acc)
        dst = y_ptr + rows[:, None].to(tl.int64) * stride_y + cols[None, :]
        tl.store(dst, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
