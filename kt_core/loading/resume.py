"""Checking a training checkpoint folder (`checkpoint-N`) before a run resumes from it.

The Trainer's and LLaMA-Factory's saves write straight into `checkpoint-N`, file by file: a run killed
during a save leaves a folder that is empty or holds truncated files, and automatic resume picks the
highest N. Resuming from it fails deep inside safetensors / torch.load / json with no path. Here each file
a checkpoint of a kt-plugins run holds is checked cheaply (headers and sizes, zip directories, JSON), and
a broken folder is named together with the newest complete one before it.
"""

from __future__ import annotations

import json
import re
import struct
import zipfile
from pathlib import Path

from kt_core.loading.checkpoint import CheckpointError

__all__ = ["check_training_checkpoint", "last_good_checkpoint"]

_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"  # the Trainer writes it after the weights and the optimizer
_TORCH_ZIPS = ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin")


def _safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file cannot be read in full, or None (header and size checked, data not read)."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{path.name} is truncated ({size} bytes)"
        (header_len,) = struct.unpack("<Q", head)
        if 8 + header_len > size:
            return f"{path.name} is truncated (its header alone needs {8 + header_len} bytes, the file has {size})"
        try:
            header = json.loads(f.read(header_len))
        except (ValueError, UnicodeDecodeError):
            return f"{path.name} has a corrupt header"
    ends = [info["data_offsets"][1] for name, info in header.items() if name != "__metadata__"]
    need = 8 + header_len + max(ends, default=0)
    if need > size:
        return f"{path.name} is truncated ({size} of {need} bytes)"
    return None


def _file_problem(path: Path) -> str | None:
    if path.stat().st_size == 0:
        return f"{path.name} is empty"
    if path.suffix == ".safetensors":
        return _safetensors_problem(path)
    if path.name in _TORCH_ZIPS:
        try:
            with zipfile.ZipFile(path) as archive:
                archive.namelist()
        except (zipfile.BadZipFile, OSError):
            return f"{path.name} is truncated or not a torch archive"
    elif path.suffix == ".json":
        try:
            json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError):
            return f"{path.name} is not valid JSON"
    return None


def _problem(folder: Path) -> str | None:
    """Why `folder` cannot be resumed from, or None."""
    if not folder.is_dir():
        return "the folder does not exist"
    files = sorted(p for p in folder.iterdir() if p.is_file())
    if not files:
        return "the folder is empty (a save that was interrupted)"
    for path in files:
        problem = _file_problem(path)
        if problem is not None:
            return problem
    if not (folder / STATE_FILE).is_file():
        return f"the folder has no {STATE_FILE} (a save that was interrupted)"
    return None


def _step(folder: Path) -> int | None:
    match = _CHECKPOINT_RE.match(folder.name)
    return int(match.group(1)) if match else None


def last_good_checkpoint(output_dir: str | Path, before: int | None = None) -> Path | None:
    """The newest complete `checkpoint-N` of `output_dir` (with N < `before` when given), or None."""
    root = Path(output_dir)
    if not root.is_dir():
        return None
    found = [(_step(p), p) for p in root.iterdir() if p.is_dir() and _step(p) is not None]
    for step, folder in sorted(found, reverse=True):
        if (before is None or step < before) and _problem(folder) is None:
            return folder
    return None


def check_training_checkpoint(folder: str | Path) -> None:
    """Raises when a run cannot resume from `folder`; the message names it and the previous good checkpoint.

    Args:
        folder: a `checkpoint-N` folder written by the Trainer (LLaMA-Factory's included).

    Raises:
        CheckpointError: the folder is missing, empty, lacks trainer_state.json, or holds a truncated or
            corrupt file (safetensors header / size, torch zip directory, JSON).
    """
    folder = Path(folder)
    problem = _problem(folder)
    if problem is None:
        return
    step = _step(folder)
    previous = last_good_checkpoint(folder.parent, before=step) if step is not None else None
    advice = (
        f"the newest complete checkpoint before it is {previous}: resume from it "
        f"(resume_from_checkpoint: {previous}) or delete {folder.name}"
        if previous is not None
        else "no complete checkpoint precedes it: delete it and start again"
    )
    raise CheckpointError(f"cannot resume from {folder}: {problem}; {advice}")
