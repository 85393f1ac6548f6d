"""Streaming from the packed kernel's copy: a streamed layer's experts in host RAM once, not twice.

A packed CPU kernel (amx_bf16, avx512_bf16_packed) computes from its own copy of a layer's experts in the tile layout
of csrc/moe/packed.h, which keeps every bit of bf16 and FP8 weights, only rearranged. While some experts stream, the
store would hold the weights as well: twice the experts' bytes in host RAM. Once a streamed layer's operator is packed
(its first CPU share), the store reads the tiles instead and the layer frees its weights
(KTExperts.release_host_weights): each expert crosses PCIe as its tiles (the same number of bytes), and the device puts
them back in the [out, in] layout of the slot with one strided copy (`untile_`), a few experts at a time through a
small staging buffer (store.py).

Tile layout of one expert's N x K matrix (N outputs, K inputs), when no padding is needed: [N / 16 n-tiles][K / 32
k-blocks][16 input pairs][16 outputs][2 inputs]; gate_up's n-tiles alternate gate and up (tile 2p: gate rows
[16p, 16p + 16), tile 2p + 1: the same up rows). FP8 keeps that shape with one byte a weight. Widths that pad the tiles
(N not a multiple of 32, K not of 32, FP8 blocks that are not whole k-blocks) make the tiles larger than the weights:
such layers keep streaming from the weights (`tiles_of` returns None).

Legend: E = experts, G = experts of one copy, N = outputs, K = inputs, I = expert intermediate, H = hidden.
"""

from __future__ import annotations

import ctypes

import torch

__all__ = ["tiles_of", "untile_"]

EXACT_FORMATS = ("/bf16/", "/fp8/")  # packed formats that keep the weights bit for bit (csrc/moe/packed.h tags)


def tiles_of(op, gate_up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The packed copy of `op` (a built CPU operator) as host tensors [E, bytes] of uint8 (gate_up's, down's) that
    share its memory, or None when it keeps no exact copy or its tiles are padded (see the module docstring).

    `gate_up` [E, 2I, H] and `down` [E, H, I] give the shapes and dtype (meta tensors do). The tensors do not own the
    memory: keep `op` alive as long as they are used.
    """
    tag = op.packed_format or ""
    if not any(f in tag for f in EXACT_FORMATS):
        return None
    blobs = {name: (address, nbytes) for name, address, nbytes in op.packed_blobs()}
    out = []
    for name, w in (("gate_up.data", gate_up), ("down.data", down)):
        if name not in blobs:
            return None
        address, nbytes = blobs[name]
        if nbytes != w.numel() * w.element_size() or w.shape[1] % 32 or w.shape[2] % 32:
            return None  # padded tiles
        buffer = (ctypes.c_uint8 * nbytes).from_address(address)
        out.append(torch.frombuffer(buffer, dtype=torch.uint8).view(w.shape[0], -1))
    return out[0], out[1]


def untile_(dst: torch.Tensor, tiles: torch.Tensor, *, interleaved: bool) -> torch.Tensor:
    """Writes G experts' tiles ([G, N * K * item] uint8) into dst [G, N, K] (bf16 or FP8) as the weights; returns dst.

    interleaved: gate_up (n-tiles alternate gate and up halves), else down. Same device for both; exact (bytes move).
    """
    G, N, K = dst.shape
    raw = dst.view(torch.int16 if dst.element_size() == 2 else torch.uint8)
    src = tiles.view(raw.dtype)
    kb = K // 32
    if interleaved:  # tile (pair p, half h) holds rows h * N / 2 + 16 p + n
        pairs = N // 32
        t = src.view(G, pairs, 2, kb, 16, 16, 2)  # [G, pair, half, k-block, input pair, output, input]
        raw.view(G, 2, pairs, 16, kb, 16, 2).copy_(t.permute(0, 2, 1, 5, 3, 4, 6))
    else:
        t = src.view(G, N // 16, kb, 16, 16, 2)  # [G, n-tile, k-block, input pair, output, input]
        raw.view(G, N // 16, 16, kb, 16, 2).copy_(t.permute(0, 1, 4, 2, 3, 5))
    return dst
