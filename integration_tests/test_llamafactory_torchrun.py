"""Stock LLaMA-Factory (0.9.5) with `use_kt: true` under its own torchrun launch (FORCE_TORCHRUN=1
NPROC_PER_NODE=2), on the CPU with gloo: the real `llamafactory-cli train`, two ranks at per-device batch 1, gives
the loss curve of one process at per-device batch 2 (the same global batch), expert LoRA on (lora_target: all).

Each rank builds the model through kt_core on its own device (cpu here; cuda:LOCAL_RANK on a GPU machine), the
two ranks map one expert file (kt_shared_experts unset: /dev/shm) and split the CPUs, DDP averages the attention
LoRA and kt_core.distributed.ExpertLoraAverager the expert LoRA. LLaMA-Factory's launcher runs the `torchrun` found
on PATH: the virtual environment's bin folder goes first.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

pytestmark = pytest.mark.integration

if importlib.util.find_spec("llamafactory") is None:
    pytest.skip("needs LLaMA-Factory: make setup installs it", allow_module_level=True)

from test_llamafactory import REPO, losses, train_config, write_checkpoint  # noqa: E402

BIN = Path(sys.executable).parent
GLOBAL_BATCH = 2
GLOO_EXIT_ABORT = "terminate called without an active exception"


def _train(model: Path, out: Path, workdir: Path, *, ranks: int) -> tuple[list[float], str]:
    config = train_config(model, out, use_kt=True, per_device_train_batch_size=GLOBAL_BATCH // ranks)
    config.pop("cpu_infer")  # each rank's share of the CPUs
    if ranks > 1:
        config["ddp_backend"] = "gloo"  # (accelerate refuses it in a single process)
    path = workdir / f"train-{ranks}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")}
    env.update(USE_KT="1", DISABLE_VERSION_CHECK="1", OMP_NUM_THREADS="1", PATH=f"{BIN}{os.pathsep}{env['PATH']}")
    if ranks > 1:
        env.update(FORCE_TORCHRUN="1", NPROC_PER_NODE=str(ranks))
    for attempt in range(2):
        proc = subprocess.run(
            [str(BIN / "llamafactory-cli"), "train", str(path)],
            cwd=workdir,
            capture_output=True,
            text=True,
            timeout=600,
            env=env,
        )
        log = proc.stdout + proc.stderr
        # PyTorch's gloo teardown abort (README "Several GPUs", Known; pytorch/pytorch#190489) can end a rank as it
        # exits after its training, and torchrun then stops the other one mid-save: one more run on that signature.
        if proc.returncode == 0 or attempt or GLOO_EXIT_ABORT not in log or "Training completed" not in log:
            break
        shutil.rmtree(out, ignore_errors=True)
    assert proc.returncode == 0, log[-8000:]
    return losses(out), log


def test_force_torchrun_two_ranks_match_one_process(tmp_path):
    model = write_checkpoint(tmp_path / "ckpt", REPO / "examples" / "tiny_moe" / "qwen3_moe", dtype=torch.float32)
    one, _ = _train(model, tmp_path / "one", tmp_path, ranks=1)
    two, log = _train(model, tmp_path / "two", tmp_path, ranks=2)

    assert "Initializing 2 distributed tasks" in log and "world size: 2" in log
    assert "expert LoRA on 4 layers" in log
    assert "1 CPU threads" in log  # each rank took its half of the CPUs (2 on the test machine)
    assert len(one) == len(two) == 4 and one[-1] != one[0]
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), rtol=1e-4, atol=0)
