"""On-disk cache of packed (and quantized) expert weights: a second load skips the packing.

Packed kernels (amx_*, avx512_vnni_*, avx512_bf16_packed) copy each layer's weights into the tile layout of
the matrix units, and the int8 / int4 ones quantize them, once when the operator is built. With a cache
folder (the KT_PACK_CACHE environment variable, or `KTExperts(..., pack_cache=dir)`), the packed buffers are
saved as one safetensors file per layer and reloaded on the next build instead of packed again.

A file is named by a key over: the label (`KTExperts.pack_cache_key`: checkpoint and layer name, when the
loader sets one), the kernel, the packed layout tag of the compiled module, the weight dtype and shapes, and
a fingerprint of the weights (and of fp8 weights' block scales). The fingerprint is cheap, not a full hash: it
reads a few thousand strided samples of each tensor (plus its first and last elements), so it follows any
re-initialization, fine-tuning or different checkpoint, but an edit confined to elements between the samples
goes unseen.
Give such layers a distinct `pack_cache_key` (or clear the folder) when weights are edited in place.

Files are written under a temporary name and moved in place (os.replace), so a reader never sees half a
file. A file that cannot be read or does not match (format tag, blob names or sizes, key) is ignored with a
warning and rewritten after packing.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from kt_core.config import PACK_CACHE_ENV, current

if TYPE_CHECKING:
    from kt_core.experts import KTExperts

__all__ = [
    "PACK_CACHE_ENV",
    "cache_dir",
    "cache_path",
    "load_or_pack",
    "pack_experts",
    "training_releases_weights",
    "weights_fingerprint",
]

logger = logging.getLogger(__name__)

_FILE_VERSION = "1"  # of this file format (metadata keys, blob naming), next to the C++ layout tag
_SAMPLES = 4096  # strided samples per weight tensor in the fingerprint
_EDGE = 64  # first and last elements always sampled


def cache_dir(module: KTExperts) -> Path | None:
    """The module's cache folder: its `pack_cache`, else the config's (KT_PACK_CACHE); None when neither is set."""
    folder = getattr(module, "pack_cache", None) or current().pack_cache
    return Path(folder) if folder else None


def weights_fingerprint(*tensors: torch.Tensor, samples: int = _SAMPLES) -> str:
    """Cheap fingerprint of weight tensors: shapes, dtypes and a blake2b of strided samples of each.

    Reads about `samples` elements per tensor at an even stride, plus the first and last few, never the
    whole tensor: the fingerprint changes with any new set of weights, not with every single-element edit.
    """
    h = hashlib.blake2b(digest_size=16)
    for t in tensors:
        flat = t.detach().reshape(-1)
        h.update(f"{tuple(t.shape)}:{t.dtype}:".encode())
        step = max(1, flat.numel() // samples)
        picked = torch.cat([flat[:_EDGE], flat[::step][:samples], flat[-_EDGE:]]).contiguous()
        h.update(picked.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _key_fields(module: KTExperts, op) -> dict[str, str]:
    return {
        "kt_pack_cache": _FILE_VERSION,
        "label": str(getattr(module, "pack_cache_key", None) or ""),
        "kernel": module.kernel,
        "format": op.packed_format,
        "dtype": str(module.gate_up_proj.dtype),
        "gate_up_shape": json.dumps(list(module.gate_up_proj.shape)),
        "down_shape": json.dumps(list(module.down_proj.shape)),
        "fingerprint": weights_fingerprint(*_weights(module)),
    }


def _weights(module: KTExperts) -> list[torch.Tensor]:
    """The tensors the packed buffers are made from: the weights, and for fp8 weights their block scales (the
    packed fp8 tiles carry them; the block size is in the compiled module's format tag)."""
    tensors = [module.gate_up_proj, module.down_proj]
    if getattr(module, "is_fp8", False):
        tensors += [module.gate_up_proj_scale_inv, module.down_proj_scale_inv]
    return tensors


def cache_path(module: KTExperts, op, folder: Path) -> tuple[Path, dict[str, str]]:
    """The file for this module's packed weights, and the key fields it must carry as metadata."""
    fields = _key_fields(module, op)
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]
    label = "".join(c if c.isalnum() or c in "-_." else "_" for c in fields["label"])[-80:]
    name = f"{label + '-' if label else ''}{module.kernel}-{digest}.safetensors"
    return folder / name, fields


def _load(path: Path, fields: dict[str, str], op) -> bool:
    """Loads the packed blobs of `path` into `op`; False (and a warning) when the file is unusable."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            for k, v in fields.items():
                if meta.get(k) != v:
                    raise ValueError(f"metadata {k!r} is {meta.get(k)!r}, expected {v!r}")
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
        blobs = [(name, t.data_ptr(), t.numel() * t.element_size()) for name, t in tensors.items()]
        op.load_packed(meta["format"], blobs, float(meta["gate_up_error"]), float(meta["down_error"]))
    except Exception as exc:  # any unreadable or mismatched file is rebuilt
        logger.warning("pack cache: ignoring %s (%s); packing again", path, exc)
        return False
    return True


def _save(path: Path, fields: dict[str, str], op) -> None:
    from safetensors.torch import save_file

    gate_up_err, down_err = op.quantization_error
    tensors = {}
    for name, address, nbytes in op.packed_blobs():
        # A copy of the op's buffer as uint8 (safetensors needs tensors it can read; the op keeps its own).
        buf = torch.empty(nbytes, dtype=torch.uint8)
        ctypes.memmove(buf.data_ptr(), address, nbytes)
        tensors[name] = buf
    meta = {**fields, "gate_up_error": repr(gate_up_err), "down_error": repr(down_err)}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_or_pack(module: KTExperts, op, pool) -> bool:
    """Packs `op` for `module`, through the cache folder when one is set. Returns True when loaded from it."""
    folder = cache_dir(module)
    if folder is None or not op.packs:
        op.pack(pool)
        return False
    path, fields = cache_path(module, op, folder)
    if path.is_file() and _load(path, fields, op):
        logger.info("pack cache: loaded %s", path)
        return True
    op.pack(pool)
    try:
        _save(path, fields, op)
    except OSError as exc:  # a full or read-only disk costs the next load its packing, nothing more
        logger.warning("pack cache: could not write %s (%s)", path, exc)
    else:
        logger.info("pack cache: wrote %s", path)
    return False


ENGINES = ("FSDP", "DEEPSPEED")  # accelerate's launch settings (ACCELERATE_USE_<name>) that wrap the model


def pack_experts(model: torch.nn.Module, *, progress: bool = True, release: bool = False) -> int:
    """Builds now, one layer after the other with a progress bar, the CPU operator of every KTExperts of `model`
    that computes on the CPU alone (no GPU share attached): packed kernels pack their weights here (or load them
    from the cache folder) instead of at the layer's first call, where a large model's first training step would
    stall silently (a full-width DeepSeek-V3 layer packs in ~20 s on 15 AMX threads). Layers with a GPU share
    (streaming, SGLang) keep building on first use: some never compute on the CPU. Returns the layers built.

    With `release`, each layer whose packed copy serves both its forward and its backward with bf16 activations
    (amx_bf16, avx512_bf16_packed, on bf16 or fp8 weights) frees its weights right after packing
    (KTExperts.release_host_weights): host RAM then holds the experts once, and the peak is the weights plus one
    layer's packed copy. Other layers (unpacked or int8 / int4 kernels, whose backward reads the weights) keep them.
    """
    from tqdm.auto import tqdm

    from kt_core.experts import KTExperts
    from kt_core.kernels import TORCH_KERNEL

    layers = [m for m in model.modules() if isinstance(m, KTExperts) and m.gpu_share is None]
    if not layers:
        return 0
    pending = [m.pending_pack_bytes() for m in layers]
    # Before any work: all the packed copies, or with `release` the largest (each layer then frees its weights).
    _check_host_room(max(pending) if release else sum(pending), pending, release)
    t0 = time.perf_counter()
    gib = sum(m.gate_up_proj.nbytes + m.down_proj.nbytes for m in layers) / 2**30
    released = 0
    with tqdm(total=len(layers), desc=f"CPU experts ({layers[0].kernel})", unit="layer", disable=not progress) as bar:
        for i, m in enumerate(layers):
            _check_host_room(pending[i], pending, release, done=i)  # what the layers before it kept or freed
            op = m.operator() if m.kernel != TORCH_KERNEL else None
            if release and op is not None and op.packed_backward("bfloat16"):
                released += m.release_host_weights()
            bar.update()
    seconds = time.perf_counter() - t0
    logger.info("CPU experts: %d layers (%.2f GiB of weights) ready in %.1f s", len(layers), gib, seconds)
    if released:
        logger.info(
            "CPU experts: %.2f GiB of weights released once packed: host RAM holds the packed copy only "
            "(keep_host_weights / kt_keep_host_weights keeps both)",
            released / 2**30,
        )
    return len(layers)


def _check_host_room(need: int, pending: list[int], release: bool, done: int = 0) -> None:
    """Raises MemoryPlanError when `need` more bytes of packed copies do not fit the host RAM available now (a host
    out of memory would end the process without a word); `pending`: each layer's packed bytes, `done`: layers packed."""
    from kt_core.loading.memory import MemoryPlanError, available_host_bytes, format_bytes

    available = available_host_bytes()
    if not need or available is None or need <= available:
        return
    kept = "frees its weights once packed where its kernel allows" if release else "keeps its weights"
    raise MemoryPlanError(
        f"pack_experts: packing the CPU experts needs {format_bytes(need)} more host RAM at layer {done + 1} of "
        f"{len(pending)} but {format_bytes(available)} is available (MemAvailable in /proc/meminfo); each layer's "
        f"packed copy is {format_bytes(max(pending))} and this run {kept}. Free the weights as they pack "
        "(training: a bf16 model on one process with keep_host_weights / kt_keep_host_weights off, the default), "
        "pick a kernel that computes from the weights as they are (KT_KERNEL=avx512_bf16 or avx2), or use a "
        "machine with more RAM."
    )


def training_releases_weights(model: torch.nn.Module, keep_host_weights: bool, args=None) -> bool:
    """Whether a training run frees the experts' weights once packed (`pack_experts(release=True)`): unless they are
    kept; only for a bf16 model (the packed backward takes bf16 activations, and the experts get the model's dtype);
    not with several ranks, whose node shares one copy of the weights (kt_core/distributed); and not under FSDP or
    DeepSpeed (`args`: the TrainingArguments; or accelerate's launch settings), whose state-dict gathering reads every
    tensor of the module."""
    if keep_host_weights:
        return False
    engine = args is not None and (getattr(args, "fsdp", None) or getattr(args, "deepspeed", None))
    launched = any(os.environ.get(f"ACCELERATE_USE_{name}", "").lower() in ("1", "true") for name in ENGINES)
    if engine or launched:
        return False
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed and torch.distributed.get_world_size() > 1:
        return False
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.dtype == torch.bfloat16
