"""Resuming on another number of ranks: a checkpoint the stock Trainer saved (KTCallback, expert LoRA on) continues
the uninterrupted loss curve at the same global batch whatever the rank count of the run that resumes it.

The adapter (expert LoRA under PEFT's keys) and optimizer.pt (the factors' Adam state among the others, in the
optimizer's own parameter order) hold no rank count: DDP saves them once, from rank 0, with the factors equal on every
rank (ExpertLoraAverager broadcasts them and averages their gradients), and every rank loads them whole. The runs are
integration_tests/test_distributed_trainer.py's script (4 steps at a global batch of 4, a checkpoint at step 2; two
ranks over gloo at per-device batch 2), which also checks two ranks resuming on one.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from tests.distributed_helpers import launch

pytestmark = pytest.mark.filterwarnings("ignore:Unsupported layer type")


def _run(checkpoint: Path, out: Path, *, ranks: int, resume: Path | None = None) -> dict:
    """integration_tests/test_distributed_trainer.py's run, through this file (__main__ below)."""
    launch(__file__, [checkpoint, out, resume or "", 1], ranks=ranks)
    return json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    from tests.tiny_models import build_tiny_model, save_fused_checkpoint

    work = tmp_path_factory.mktemp("resume")
    save_fused_checkpoint(build_tiny_model("qwen3_moe", num_layers=2), work / "ckpt")
    one = _run(work / "ckpt", work / "one", ranks=1)
    assert len(one["losses"]) == 4 and one["losses"][-1] != one["losses"][0]
    return work, one


def test_one_process_checkpoint_resumes_on_two_ranks(uninterrupted, tmp_path):
    work, one = uninterrupted
    saved = work / "one" / "checkpoint-2"
    assert (saved / "optimizer.pt").is_file() and (saved / "adapter_model.safetensors").is_file()
    resumed = _run(work / "ckpt", tmp_path / "two", ranks=2, resume=saved)
    assert resumed["world_size"] == 2 and resumed["ddp_ignores_experts"]
    assert resumed["losses"][:2] == one["losses"][:2]  # the history the one process saved
    assert resumed["reductions"] == 2 and resumed["broadcasts"] == 1  # the two steps left, averaged over the ranks
    torch.testing.assert_close(torch.tensor(resumed["losses"]), torch.tensor(one["losses"]), rtol=1e-5, atol=0)


def test_two_rank_checkpoint_resumes_on_one_process(uninterrupted, tmp_path):
    work, one = uninterrupted
    two = _run(work / "ckpt", tmp_path / "two", ranks=2)
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), rtol=1e-5, atol=0)
    resumed = _run(work / "ckpt", tmp_path / "resumed", ranks=1, resume=tmp_path / "two" / "checkpoint-2")
    assert resumed["world_size"] == 1 and resumed["reductions"] == 0
    torch.testing.assert_close(torch.tensor(resumed["losses"]), torch.tensor(one["losses"]), rtol=1e-5, atol=0)


if __name__ == "__main__":  # one process, or each torchrun worker
    from integration_tests.test_distributed_trainer import _train
    from tests.distributed_helpers import cpu_map_location, run_rank

    cpu_map_location()
    run_rank(_train, *sys.argv[1:5])
