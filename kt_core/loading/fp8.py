"""DeepSeek's FP8 checkpoints: e4m3 weights with one fp32 scale per 128 x 128 block (`weight_scale_inv`).

w[o, i] = q[o, i] * scale_inv[o // 128, i // 128]. Non-expert weights are dequantized to bf16 at load time; routed
experts may stay FP8 in host RAM (KTExperts(dtype=torch.float8_e4m3fn)), the CPU kernels converting in registers.
"""

from __future__ import annotations

import logging

import torch

__all__ = [
    "DEFAULT_BLOCK",
    "dequantize_experts_fp8",
    "dequantize_experts_fp8_",
    "dequantize_fp8_blockwise",
    "expert_scale_bytes",
    "expert_scale_shapes",
    "expert_store_dtype",
    "fp8_block_size",
    "quantize_experts_fp8",
    "quantize_fp8_blockwise",
    "scale_blocks_",
    "write_fp8_expert",
]

logger = logging.getLogger(__name__)

DEFAULT_BLOCK = (128, 128)
_E4M3_MAX = 448.0


def fp8_block_size(config_dict: dict) -> tuple[int, int] | None:
    """The quantization block of an FP8 checkpoint from its config, or None when it is not one."""
    quant = config_dict.get("quantization_config") or {}
    if quant.get("quant_method") != "fp8":
        return None
    block = quant.get("weight_block_size") or DEFAULT_BLOCK
    return int(block[0]), int(block[1])


def dequantize_fp8_blockwise(
    weight: torch.Tensor,
    scale_inv: torch.Tensor,
    block: tuple[int, int] = DEFAULT_BLOCK,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Dequantizes one weight.

    Args:
        weight: [O, I] float8_e4m3fn.
        scale_inv: [ceil(O / b0), ceil(I / b1)] fp32 block scales.
        block: (b0, b1).
        dtype: result dtype.

    Returns:
        [O, I] in `dtype`, on weight's device.
    """
    O, I = weight.shape
    b0, b1 = block
    expected = (-(-O // b0), -(-I // b1))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(
            f"FP8 scale shape {tuple(scale_inv.shape)} does not match weight {tuple(weight.shape)} "
            f"with {b0}x{b1} blocks (expected {expected})"
        )
    out = weight.to(dtype, copy=True)
    scale_blocks_(out[None], scale_inv.to(weight.device, torch.float32)[None], block)
    return out


def scale_blocks_(out: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK) -> torch.Tensor:
    """out [N, R, C] *= scale_inv [N, ceil(R / b0), ceil(C / b1)], each scale over its b0 x b1 block; in place.

    The one block-scaled multiply of this module: out holds the e4m3 values already (their conversion to bf16 / fp32
    is exact), and each product is computed in fp32 and rounded once to out's dtype, so the result is bit for bit
    `(q.float() * scale).to(dtype)`. Dims that are not whole blocks take their last, partial block; no temporary the
    size of the weights is made (the whole blocks, the last block row and the last block column are views).
    """
    N, R, C = out.shape
    b0, b1 = block
    full_r, full_c = R // b0, C // b1
    rows = [(0, full_r * b0, slice(0, full_r), full_r, b0), (full_r * b0, R, slice(full_r, full_r + 1), 1, R % b0)]
    cols = [(0, full_c * b1, slice(0, full_c), full_c, b1), (full_c * b1, C, slice(full_c, full_c + 1), 1, C % b1)]
    for r0, r1, rs, nr, br in rows:
        for c0, c1, cs, nc, bc in cols:
            if r1 > r0 and c1 > c0:
                out[:, r0:r1, c0:c1].view(N, nr, br, nc, bc).mul_(scale_inv[:, rs, None, cs, None])
    return out


def quantize_fp8_blockwise(
    weight: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantizes like DeepSeek's release (for tests and for writing FP8 checkpoints).

    Args:
        weight: [O, I] floating point.
        block: (b0, b1).

    Returns:
        (q [O, I] float8_e4m3fn, scale_inv [ceil(O / b0), ceil(I / b1)] fp32).
    """
    O, I = weight.shape
    b0, b1 = block
    P0, P1 = -(-O // b0) * b0, -(-I // b1) * b1
    padded = torch.zeros(P0, P1, dtype=torch.float32, device=weight.device)
    padded[:O, :I] = weight.float()
    blocks = padded.view(P0 // b0, b0, P1 // b1, b1)  # [O/b0, b0, I/b1, b1]
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)  # [O/b0, I/b1]
    scale_inv = amax / _E4M3_MAX
    q = (blocks / scale_inv[:, None, :, None]).view(P0, P1)[:O, :I].to(torch.float8_e4m3fn)
    return q.contiguous(), scale_inv


# ---- routed experts kept as FP8 (KTExperts(dtype=torch.float8_e4m3fn)) --------------------------------------------
# gate_up [E, 2I, H] fuses gate [I, H] and up [I, H], which the checkpoint quantizes apart: its scales are gate's
# ceil(I / b0) block rows, then up's ([E, 2I / b0, H / b1] when b0 divides I, as DeepSeek-V3 and Kimi have it).


def expert_scale_shapes(
    num_experts: int, hidden: int, intermediate: int, block: tuple[int, int] = DEFAULT_BLOCK
) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Shapes of the block scales of FP8 experts: gate_up_proj_scale_inv and down_proj_scale_inv.

    Returns:
        ([E, 2 ceil(I / b0), ceil(H / b1)], [E, ceil(H / b0), ceil(I / b1)]).
    """
    b0, b1 = block
    E, H, I = num_experts, hidden, intermediate
    return (E, 2 * -(-I // b0), -(-H // b1)), (E, -(-H // b0), -(-I // b1))


def quantize_experts_fp8(
    gate_up: torch.Tensor, down: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantizes fused expert weights as DeepSeek's release quantizes each expert's gate, up and down.

    Args:
        gate_up: [E, 2I, H]. down: [E, H, I].

    Returns:
        (gate_up q [E, 2I, H] e4m3, its scales, down q [E, H, I] e4m3, its scales), shapes as expert_scale_shapes.
    """
    I = gate_up.shape[1] // 2
    parts = [[quantize_fp8_blockwise(w[:I], block), quantize_fp8_blockwise(w[I:], block)] for w in gate_up]
    q_gu = torch.stack([torch.cat([g[0], u[0]]) for g, u in parts])
    s_gu = torch.stack([torch.cat([g[1], u[1]]) for g, u in parts])
    down_parts = [quantize_fp8_blockwise(w, block) for w in down]
    return q_gu, s_gu, torch.stack([q for q, _ in down_parts]), torch.stack([s for _, s in down_parts])


def dequantize_experts_fp8(
    gate_up: torch.Tensor,
    gate_up_scale_inv: torch.Tensor,
    down: torch.Tensor,
    down_scale_inv: torch.Tensor,
    block: tuple[int, int] = DEFAULT_BLOCK,
    dtype: torch.dtype = torch.bfloat16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of quantize_experts_fp8: (gate_up [E, 2I, H], down [E, H, I]) in `dtype`."""
    E, two_I, H = gate_up.shape
    I = two_I // 2
    gu_shape, d_shape = expert_scale_shapes(E, H, I, block)
    for name, scale, shape in (("gate_up_proj", gate_up_scale_inv, gu_shape), ("down_proj", down_scale_inv, d_shape)):
        if tuple(scale.shape) != shape:
            raise ValueError(
                f"{name}_scale_inv: shape {tuple(scale.shape)}, expected {shape} for {tuple(block)} blocks"
            )
    gu = torch.empty(gate_up.shape, dtype=dtype, device=gate_up.device)
    d = torch.empty(down.shape, dtype=dtype, device=down.device)
    return dequantize_experts_fp8_(gu, d, gate_up, gate_up_scale_inv, down, down_scale_inv, block)


def dequantize_experts_fp8_(
    gate_up_out: torch.Tensor,
    down_out: torch.Tensor,
    gate_up: torch.Tensor,
    gate_up_scale_inv: torch.Tensor,
    down: torch.Tensor,
    down_scale_inv: torch.Tensor,
    block: tuple[int, int] = DEFAULT_BLOCK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """dequantize_experts_fp8 into given buffers (any float dtype, on the weights' device; e.g. a GPU working buffer).

    Args:
        gate_up_out: [N, 2I, H]. down_out: [N, H, I]. gate_up, down: the e4m3 weights of the same N experts; their
            scales as expert_scale_shapes (gate's block rows, then up's).

    Returns:
        (gate_up_out, down_out), each value `(q.float() * scale)` rounded once to their dtype.
    """
    I = gate_up.shape[1] // 2
    half = gate_up_scale_inv.shape[1] // 2
    gate_up_out.copy_(gate_up)  # e4m3 -> bf16 / fp32 is exact
    down_out.copy_(down)
    scale_blocks_(gate_up_out[:, :I], gate_up_scale_inv[:, :half], block)
    scale_blocks_(gate_up_out[:, I:], gate_up_scale_inv[:, half:], block)
    scale_blocks_(down_out, down_scale_inv, block)
    return gate_up_out, down_out


def expert_scale_bytes(hidden: int, intermediate: int, block: tuple[int, int] = DEFAULT_BLOCK) -> int:
    """Bytes of one FP8 expert's fp32 block scales (gate_up's and down's)."""
    return sum(4 * s[1] * s[2] for s in expert_scale_shapes(1, hidden, intermediate, block))


def expert_store_dtype(
    expert_dtype: torch.dtype | str | None, checkpoint_fp8: bool, kernel: str, fallback: torch.dtype
) -> torch.dtype:
    """The dtype of the routed-expert stores in host RAM (load_model's / convert_model's expert_dtype).

    Args:
        expert_dtype: the caller's choice (torch.float8_e4m3fn or "fp8", torch.bfloat16, torch.float32), or None:
            `fallback` (FP8 experts dequantized at load). FP8 stores halve the host RAM and run on
            kt_core.kernels.fp8_kernels() and through streaming (dequantized on the GPU); they are kept only when
            asked for, and a `kernel` that takes no fp8 (int8 / int4) is refused with them.
        checkpoint_fp8: the checkpoint's experts are FP8.
        kernel: the experts' kernel ("auto" or a name; KT_KERNEL has the last word, as for the layers).
        fallback: the store dtype otherwise (bf16, or fp32 when the model is loaded in fp32).
    """
    from kt_core import kernels  # the loader imports this module before the experts exist

    if isinstance(expert_dtype, str):
        names = {"fp8": torch.float8_e4m3fn, "float8_e4m3fn": torch.float8_e4m3fn}
        name = expert_dtype.removeprefix("torch.")
        expert_dtype = names.get(name) or getattr(torch, name, None)
    if expert_dtype is not None:
        if expert_dtype not in (torch.float8_e4m3fn, torch.bfloat16, torch.float32):
            raise ValueError(
                "expert_dtype: expected torch.float8_e4m3fn ('fp8'), torch.bfloat16 or torch.float32, "
                f"got {expert_dtype}"
            )
        if expert_dtype == torch.float8_e4m3fn and not checkpoint_fp8:
            raise ValueError(
                "expert_dtype=fp8 keeps an FP8 checkpoint's experts as shipped; this checkpoint is not FP8"
            )
        requested = kernels.current().kernel or kernel
        if expert_dtype == torch.float8_e4m3fn and requested not in ("auto", *kernels.fp8_kernels()[:-1]):
            raise ValueError(
                f"expert_dtype=fp8: kernel {requested!r} takes no fp8 weights; use one of "
                f"{kernels.fp8_kernels()[:-1]} (or 'auto'), or let the experts be dequantized (expert_dtype=None)"
            )
        return expert_dtype
    if checkpoint_fp8:
        logger.info(
            "experts: FP8 checkpoint, experts dequantized to %s at load; expert_dtype='fp8' keeps them as shipped "
            "(half the host RAM and PCIe bytes)",
            fallback,
        )
    return fallback


def write_fp8_expert(store, proj: str, expert: int | None, q: torch.Tensor, scale_inv: torch.Tensor | None, where: str):
    """One checkpoint tensor of FP8 experts into an fp8 store, as shipped (no dequantization): one expert's gate,
    up or down (`expert` given), or fused [E, 2I, H] / [E, H, I] with its [E, ...] scales."""
    if q.dtype != torch.float8_e4m3fn or scale_inv is None:
        raise ValueError(f"{where}: an fp8 expert store takes float8_e4m3fn weights with their weight_scale_inv")
    if expert is not None:
        store.load_expert_(expert, **{proj: q, f"{proj}_scale_inv": scale_inv})
        return
    name = "gate_up_proj" if proj == "gate_up" else "down_proj"
    target, scales = getattr(store, name), getattr(store, f"{name}_scale_inv")
    if tuple(q.shape) != tuple(target.shape) or tuple(scale_inv.shape) != tuple(scales.shape):
        raise ValueError(
            f"{where}: shapes {tuple(q.shape)} and scales {tuple(scale_inv.shape)}, expected {tuple(target.shape)} "
            f"and {tuple(scales.shape)}"
        )
    with torch.no_grad():
        target.copy_(q)
        scales.copy_(scale_inv)
