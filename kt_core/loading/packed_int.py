"""compressed-tensors `pack-quantized` checkpoints (Kimi-K2's int4 release): integer weights packed into int32.

A quantized Linear weight `<name>.weight` [O, I] is stored as
    `<name>.weight_packed` int32 [O, ceil(I / P)]: P = 32 / bits values per word, column c in word c // P at
        bits (c % P) * bits, each stored as q + 2^(bits-1) (unsigned);
    `<name>.weight_scale` [O, ceil(I / G)] (group strategy, G = group_size) or [O, 1] (channel strategy);
    `<name>.weight_shape` int [2]: (O, I).
Symmetric quantization: w[o, i] = q[o, i] * scale[o, i // G]. Dequantized to bf16 at load time, as FP8 is.
Asymmetric schemes (a packed `weight_zero_point`) and activation-order `weight_g_idx` are refused by name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["COMPANIONS", "PACKED_SUFFIX", "PackedArgs", "dequantize_packed", "pack_quantized", "packed_args"]

PACKED_SUFFIX = "_packed"  # `<name>.weight_packed` holds what `<name>.weight` would
COMPANIONS = ("_scale", "_shape", "_zero_point", "_g_idx")  # `<name>.weight<suffix>` next to it


@dataclass(frozen=True)
class PackedArgs:
    bits: int
    group_size: int | None  # None: one scale per output row (channel strategy)


def packed_args(config_dict: dict) -> PackedArgs | None:
    """The weight quantization of a compressed-tensors pack-quantized checkpoint, or None when it is not one.

    Raises:
        ValueError: a pack-quantized scheme this loader does not read (the message names the key).
    """
    quant = config_dict.get("quantization_config") or {}
    if quant.get("quant_method") != "compressed-tensors" or quant.get("format") != "pack-quantized":
        return None
    schemes = [g.get("weights") or {} for g in (quant.get("config_groups") or {}).values()]
    if len(schemes) != 1:
        raise ValueError(f"quantization_config.config_groups: expected one weight scheme, got {len(schemes)}")
    w = schemes[0]
    bits, strategy = int(w.get("num_bits", 0)), w.get("strategy")
    problems = []
    if w.get("type", "int") != "int" or bits not in (2, 4, 8):
        problems.append(f"type {w.get('type')!r} with num_bits {bits} (expected int with 2, 4 or 8 bits)")
    if not w.get("symmetric", True):
        problems.append("symmetric: false (zero points are not read)")
    if strategy not in ("group", "channel"):
        problems.append(f"strategy {strategy!r} (expected 'group' or 'channel')")
    if w.get("actorder"):
        problems.append(f"actorder {w['actorder']!r} (g_idx reordering is not read)")
    if problems:
        raise ValueError("quantization_config (pack-quantized): unsupported " + "; ".join(problems))
    return PackedArgs(bits, int(w["group_size"]) if strategy == "group" else None)


def dequantize_packed(
    packed: torch.Tensor, scale: torch.Tensor, shape, args: PackedArgs, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """[O, ceil(I / P)] int32 words + [O, groups] scales -> [O, I] weight in `dtype`."""
    O, I = (int(v) for v in shape)
    per_word = 32 // args.bits
    if packed.dtype != torch.int32 or tuple(packed.shape) != (O, -(-I // per_word)):
        raise ValueError(
            f"packed weight {packed.dtype} {tuple(packed.shape)} does not hold a [{O}, {I}] weight of {args.bits}-bit "
            f"values (expected int32 [{O}, {-(-I // per_word)}])"
        )
    groups = 1 if args.group_size is None else -(-I // args.group_size)
    if tuple(scale.shape) != (O, groups):
        raise ValueError(
            f"scale shape {tuple(scale.shape)} does not match a [{O}, {I}] weight (expected [{O}, {groups}])"
        )
    shifts = torch.arange(per_word, dtype=torch.int32) * args.bits  # [P]
    unsigned = (packed.unsqueeze(-1) >> shifts) & ((1 << args.bits) - 1)  # [O, I/P, P]
    q = unsigned.reshape(O, -1)[:, :I].float() - (1 << (args.bits - 1))  # [O, I]
    step = I if args.group_size is None else args.group_size
    return (q * scale.float().repeat_interleave(step, dim=1)[:, :I]).to(dtype)


def pack_quantized(weight: torch.Tensor, args: PackedArgs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantizes and packs like a compressed-tensors release (for tests and for writing such checkpoints).

    Returns:
        (packed int32 [O, ceil(I / P)], scale fp32 [O, groups], shape int32 [2]).
    """
    O, I = weight.shape
    step = I if args.group_size is None else args.group_size
    groups = -(-I // step)
    padded = torch.zeros(O, groups * step)
    padded[:, :I] = weight.float()
    top = (1 << (args.bits - 1)) - 1
    scale = padded.view(O, groups, step).abs().amax(dim=2).clamp(min=1e-12) / top  # [O, groups]
    q = torch.round(padded / scale.repeat_interleave(step, dim=1)).clamp(-top - 1, top)[:, :I]
    per_word = 32 // args.bits
    words = -(-I // per_word)
    unsigned = torch.zeros(O, words * per_word, dtype=torch.int64)
    unsigned[:, :I] = (q + (1 << (args.bits - 1))).long()
    shifts = torch.arange(per_word, dtype=torch.int64) * args.bits
    packed = (unsigned.view(O, words, per_word) << shifts).sum(dim=2)  # disjoint bits: the sum is the OR
    packed = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)  # the words' bits as int32
    return packed, scale, torch.tensor([O, I], dtype=torch.int32)
