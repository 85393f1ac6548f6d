"""The packed kernels' copy of a node's expert weights, in one shared file beside the weights' own.

The packed kernels (amx_*, avx512_bf16_packed, avx512_vnni_*) compute from a copy of each layer's weights in their
tile layout (csrc/moe/packed.h), as large as the weights (bf16, fp8) or a half / quarter of them (int8, int4). With
several ranks on a node each rank would pack its own: host memory would hold the shared weights plus one packed
copy per rank. When the weights are shared (shared_store.py), their packed copy is too:

- local rank 0 packs every layer at load (or loads it from the pack cache, kt_core/runtime/pack_cache.py) and
  writes the packed buffers into a second file of the same folder, then borrows its tiles from there (its own
  packed copy is freed layer by layer);
- the other local ranks wait for that file, map it, and their operators borrow the same tiles
  (`ExpertsOp.load_packed(..., borrow=True)`): they pack nothing. The small buffers (int8 / int4 / fp8 scales) are
  copied into each operator.

Host memory holds the weights once and their packed copy once, whatever the number of ranks. The file is a
SharedExperts (same naming by run, publication, removal and waiting), named after the weights' file and each layer's
kernel and packed format. Its layout: per layer (sorted by name) the buffers `ExpertsOp.packed_layout()` names
("gate_up.data", "gate_up.scale", ..., each on its own page: the tiles stay 64-byte aligned), and "errors" (float64
[2]: the quantization errors int8 / int4 packing measured, 0 otherwise).
"""

from __future__ import annotations

import ctypes
import logging

import torch
from torch import nn

from kt_core.distributed.shared_store import SharedExperts

__all__ = ["share_packed_weights"]

logger = logging.getLogger(__name__)

_ERRORS = "errors"


def share_packed_weights(model: nn.Module, weights: SharedExperts) -> SharedExperts | None:
    """Packs the layers of `model` whose weights live in `weights` into one file of the node (local rank 0), and
    gives every rank's layers operators that borrow their tiles from it (the module docstring).

    Every rank of the node calls it, after `weights.publish()`, with the same model.

    Returns:
        The packed copy's shared file (kept alive by the layers that borrow from it), or None when no layer's kernel
        packs (unpacked kernels, or the plain-torch one).
    """
    from kt_core import kernels
    from kt_core.experts import KTExperts
    from kt_core.runtime.pack_cache import load_or_pack
    from kt_core.runtime.pool import get_thread_pool

    layers = {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, KTExperts) and name in weights and m.kernel != kernels.TORCH_KERNEL
    }
    ops = {name: kernels.new_operator(m) for name, m in sorted(layers.items())}
    ops = {name: op for name, op in ops.items() if op.packs}
    if not ops:
        return None
    shapes = {}
    for name, op in ops.items():
        shapes[name] = {blob: ((nbytes,), torch.uint8) for blob, nbytes in op.packed_layout()}
        shapes[name][_ERRORS] = ((2,), torch.float64)
    kinds = "|".join(f"{name}:{layers[name].kernel}:{op.packed_format}" for name, op in ops.items())
    packs = SharedExperts.open(weights.folder, f"{weights.path.name}|packed|{kinds}", shapes, weights.ranks)
    if packs is None:  # one rank on this node after all
        return None
    for name, op in ops.items():
        module = layers[name]
        if packs.writer:
            load_or_pack(module, op, get_thread_pool(module.cpu_infer))
            tensors = packs.tensors(name)
            for blob, address, nbytes in op.packed_blobs():
                ctypes.memmove(tensors[blob].data_ptr(), address, nbytes)
            tensors[_ERRORS].copy_(torch.tensor(op.quantization_error, dtype=torch.float64))
            _borrow(op, tensors)  # its own copy goes now, layer by layer
    packs.publish()
    for name, op in ops.items():
        if not packs.writer:
            _borrow(op, packs.tensors(name))
        layers[name].use_operator(op, packed_source=packs)
    logger.info(
        "packed expert weights of this node's %d ranks in one shared file (%d layers, %.2f GiB): no rank packs its own",
        packs.ranks.size,
        len(ops),
        packs.nbytes / 2**30,
    )
    return packs


def _borrow(op, tensors: dict[str, torch.Tensor]) -> None:
    """`op` borrows its tiles from the file's tensors and copies its scales from them."""
    gate_up_error, down_error = tensors[_ERRORS].tolist()
    blobs = [(blob, t.data_ptr(), t.numel()) for blob, t in tensors.items() if blob != _ERRORS]
    op.load_packed(op.packed_format, blobs, gate_up_error, down_error, borrow=True)
