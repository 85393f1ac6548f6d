"""The real `llamafactory-cli train` on a GPU with `use_kt: true`, the default optimizer (fused AdamW) and
expert LoRA (`lora_target: all`): the streamed split (`kt_expert_gpu_memory`) gives the loss curve of the
CPU-expert run, and both differ visibly from a run without expert LoRA (so a split that lost the expert-LoRA
updates would fail).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.integration]
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from test_llamafactory import REPO, losses, run_cli, train_config, write_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    config = REPO / "examples" / "tiny_moe" / "qwen3_moe"
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "qwen3_moe", config, dtype=torch.bfloat16)


def _run(checkpoint, out, workdir, **extra):
    config = train_config(checkpoint, out, use_kt=True, bf16=True, max_steps=12, learning_rate=5e-3, **extra)
    config.pop("cpu_infer")
    proc = run_cli("train", config, workdir)
    return losses(out), proc.stdout + proc.stderr


def test_streamed_split_matches_cpu_experts_under_the_default_optimizer(checkpoint, tmp_path):
    cpu, _ = _run(checkpoint, tmp_path / "cpu", tmp_path)
    streamed, log = _run(checkpoint, tmp_path / "streamed", tmp_path, kt_expert_gpu_memory="1GiB")
    frozen, _ = _run(checkpoint, tmp_path / "no-expert-lora", tmp_path, kt_expert_lora=False)
    assert "expert streaming on" in log
    gap = max(abs(a - b) for a, b in zip(streamed, cpu, strict=True))
    moved = max(abs(a - b) for a, b in zip(cpu, frozen, strict=True))
    print(f"\ncpu experts: {cpu}\nstreamed:    {streamed}\nno expert LoRA: {frozen}\ngap {gap:.4f} moved {moved:.4f}")
    assert moved > 1e-2
    assert gap < 0.25 * moved
