"""Reading a local Hugging Face checkpoint: config.json, safetensors shards and their index.

Only the shards' headers are read up front (names, dtypes, shapes, byte sizes), so that the memory
plan is known before any tensor data is touched; tensors are then read one at a time.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

__all__ = ["Checkpoint", "CheckpointError", "TensorInfo"]

INDEX_NAME = "model.safetensors.index.json"
SAFETENSORS_ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
}  # fmt: skip
_MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint directory or file that is missing, incomplete or corrupt; the message names it."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as its shard header describes it."""

    key: str
    file: Path
    dtype: str  # safetensors dtype name: "BF16", "F32", "F8_E4M3", ...
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        numel = 1
        for s in self.shape:
            numel *= s
        return numel * SAFETENSORS_ITEMSIZE.get(self.dtype, 4)

    @property
    def is_fp8(self) -> bool:
        return self.dtype.startswith("F8")


class Checkpoint:
    """A checkpoint directory: its config and the tensors of its safetensors shards.

    Args:
        path: folder with config.json and model.safetensors or sharded `*.safetensors` (+ index).

    Raises:
        CheckpointError: missing config / shards, an index naming absent files, corrupt headers.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: not a checkpoint directory")
        config_file = self.path / "config.json"
        if not config_file.is_file():
            raise CheckpointError(f"{self.path}: config.json is missing")
        try:
            self.config_dict: dict = json.loads(config_file.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{config_file}: not valid JSON: {exc}") from exc
        self.tensors: dict[str, TensorInfo] = {}
        for file in self._shard_files():
            for info in _read_header(file):
                self.tensors[info.key] = info
        self._handles: dict[Path, object] = {}

    def _shard_files(self) -> list[Path]:
        index = self.path / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise CheckpointError(f"{index}: not a safetensors index (no weight_map): {exc}") from exc
            files = sorted({self.path / name for name in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{index} lists shards that are missing: {', '.join(missing[:5])}")
            return files
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.path}: no *.safetensors files (GGUF and .bin are not read here)")
        return files

    def get(self, key: str) -> torch.Tensor:
        """Reads one tensor into host memory."""
        info = self.tensors[key]
        handle = self._handles.get(info.file)
        if handle is None:
            handle = safe_open(str(info.file), framework="pt", device="cpu")
            self._handles[info.file] = handle
        try:
            return handle.get_tensor(key)
        except Exception as exc:
            raise CheckpointError(f"{info.file}: cannot read tensor {key}: {exc}") from exc

    def close(self) -> None:
        """Drops the open shard handles (and their memory maps)."""
        self._handles.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _read_header(file: Path) -> list[TensorInfo]:
    size = file.stat().st_size
    with file.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{file}: truncated safetensors file ({size} bytes)")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > min(_MAX_HEADER, size - 8):
            raise CheckpointError(f"{file}: corrupt safetensors header (length {header_len}, file {size} bytes)")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{file}: corrupt safetensors header: {exc}") from exc
    data_size = size - 8 - header_len
    out = []
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        _, end = meta["data_offsets"]
        if end > data_size:
            raise CheckpointError(f"{file}: tensor {key} lies past the end of the file (truncated download?)")
        out.append(TensorInfo(key=key, file=file, dtype=meta["dtype"], shape=tuple(meta["shape"])))
    return out
