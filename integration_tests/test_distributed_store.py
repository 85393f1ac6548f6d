"""Two ranks on one node share the expert weights: one file in host memory that both map.

The test starts this file as a script twice, with the variables torchrun gives its workers (LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR / MASTER_PORT, TORCHELASTIC_RUN_ID); each worker loads a tiny checkpoint with
kt_core.load_model and reports, as JSON, which file backs its expert weights and what it read.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from kt_core.distributed import local_ranks

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two_ranks(checkpoint: Path, out: Path, mode: str) -> list[dict]:
    env = {
        **os.environ,
        "LOCAL_WORLD_SIZE": "2",
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "TORCHELASTIC_RUN_ID": uuid.uuid4().hex,
        "PYTHONPATH": str(ROOT),
    }
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(checkpoint), str(out / f"rank{r}.json"), mode],
            env={**env, "LOCAL_RANK": str(r), "RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    logs = [p.communicate(timeout=180)[0] for p in procs]
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["env", "gloo"])
def test_two_ranks_map_one_expert_file(tmp_path, mode):
    """Both ranks' expert weights are the same /dev/shm file (same inode), equal to the checkpoint; only local
    rank 0 reads expert tensors; the file is removed: at once with torch.distributed up, else at exit."""
    from tests.tiny_models import build_tiny_model, save_fused_checkpoint

    save_fused_checkpoint(build_tiny_model("qwen3_moe", num_layers=2), tmp_path / "ckpt")
    ranks = _run_two_ranks(tmp_path / "ckpt", tmp_path, mode)

    assert [r["expert_reads"] > 0 for r in ranks] == [True, False]
    assert all(r["equal_to_checkpoint"] for r in ranks)
    files = [{(w["inode"], w["file"]) for w in r["weights"]} for r in ranks]
    assert files[0] == files[1] and len(files[0]) == 1  # every layer, both ranks: one file
    ((inode, name),) = files[0]
    assert name.startswith("/dev/shm/kt-experts-") and inode != "0"
    assert not Path(name.removesuffix(" (deleted)")).exists()  # removed when the ranks were done
    if mode == "gloo":
        assert all(r["file_left_after_load"] is False for r in ranks)  # removed right after the barrier
        # Both ranks mapped the pages at once: each is charged half of them (proportional set size).
        for r in ranks:
            assert r["rss_kb"] > 0 and abs(2 * r["pss_kb"] - r["rss_kb"]) <= 8


# ---- the worker -------------------------------------------------------------------------------------------------


def _mapping_of(ptr: int) -> tuple[str, str, int, int]:
    """(inode, file, Rss kB, Pss kB) of the memory mapping holding address `ptr`, from /proc/self/smaps."""
    found, rss, pss = None, 0, 0
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
                lo, hi = (int(x, 16) for x in head[0].split("-"))
                if found is not None:
                    break
                if lo <= ptr < hi:
                    found = (head[4], line.split(maxsplit=5)[5].strip() if len(head) > 5 else "")
            elif found is not None and head[0] in ("Rss:", "Pss:"):
                rss, pss = (int(head[1]), pss) if head[0] == "Rss:" else (rss, int(head[1]))
    assert found is not None, f"no mapping holds {ptr:#x}"
    return found[0], found[1], rss, pss


def _worker(checkpoint: str, out: str, mode: str) -> None:
    import torch.distributed as dist
    from safetensors.torch import load_file

    import kt_core
    from kt_core.experts import KTExperts
    from kt_core.loading.checkpoint import Checkpoint

    if mode == "gloo":
        dist.init_process_group("gloo")
    reads = []
    original_get = Checkpoint.get
    Checkpoint.get = lambda self, key: (reads.append(key), original_get(self, key))[1]
    model = kt_core.load_model(checkpoint, device="cpu", progress=False)
    expected = load_file(f"{checkpoint}/model.safetensors")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, KTExperts)}
    equal = all(
        torch.equal(getattr(m, w), expected[f"{n}.{w}"].to(getattr(m, w).dtype))
        for n, m in layers.items()
        for w in ("gate_up_proj", "down_proj")
    )
    shm_files = [p for p in Path("/dev/shm").glob(f"kt-experts-{os.getuid()}-*") if p.suffix == ".bin"]
    if mode == "gloo":
        dist.barrier()  # both ranks hold their mappings now
    weights = []
    for m in layers.values():
        for w in ("gate_up_proj", "down_proj"):
            inode, file, rss, pss = _mapping_of(getattr(m, w).data_ptr())
            weights.append({"inode": inode, "file": file})
    report = {
        "expert_reads": sum(".experts." in k for k in reads),
        "equal_to_checkpoint": equal,
        "weights": weights,
        "file_left_after_load": any(f.name in weights[0]["file"] for f in shm_files),
        "rss_kb": rss,
        "pss_kb": pss,
    }
    Path(out).write_text(json.dumps(report))
    if mode == "gloo":
        dist.barrier()
        dist.destroy_process_group()
    else:  # no barrier: local rank 0 removes the file when it exits, so it waits for the other rank's report
        other = Path(out).with_name("rank1.json")
        while local_ranks().is_leader and not other.exists():
            time.sleep(0.1)


if __name__ == "__main__":
    _worker(*sys.argv[1:4])
