"""DeepSeek's FP8 checkpoints: e4m3 weights with one fp32 scale per 128 x 128 block (`weight_scale_inv`).

Dequantized to bf16 at load time: w[o, i] = q[o, i] * scale_inv[o // 128, i // 128].
"""

from __future__ import annotations

import torch

__all__ = ["DEFAULT_BLOCK", "dequantize_fp8_blockwise", "fp8_block_size", "quantize_fp8_blockwise"]

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
    scale = scale_inv.to(weight.device, torch.float32)
    scale = scale.repeat_interleave(b0, dim=0)[:O].repeat_interleave(b1, dim=1)[:, :I]  # [O, I]
    return (weight.to(torch.float32) * scale).to(dtype)


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
