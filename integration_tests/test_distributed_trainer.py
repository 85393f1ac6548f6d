"""The stock Trainer with KTCallback under torchrun: two ranks (gloo, CPU) give the single process's loss curve.

The same script runs three ways: one process at per-device batch 4; `python -m torch.distributed.run
--nproc-per-node 2` at per-device batch 2 (the same global batch of 4; DDP averages the gradients of the attention
LoRA, kt_core.distributed.ExpertLoraAverager those of the expert LoRA factors, which DDP ignores), saving a checkpoint
at step 2; one process resuming from that two-rank checkpoint. A second pair runs gradient accumulation (2
micro-batches per step: one rank at per-device batch 2, two ranks at 1, the same global batch) with the gradient
norm clipped hard (max_grad_norm 0.02, below every step's norm): the norms and curves agree only when the expert
LoRA gradients are averaged on the last micro-batch, before the Trainer clips. The model comes from
kt_core.load_model, so both ranks map one expert file, and the CPUs are split between them.
Legend of a report: losses / grad_norms = the Trainer's logged loss (averaged over the ranks by the Trainer) and
gradient norm before clipping, per step; reductions / broadcasts = the averager's all_reduce calls (one per
optimizer step) and broadcasts of the factors from rank 0 (one).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from tests.distributed_helpers import launch, peft_model_with_expert_lora, run_rank

STEPS = 4
GLOBAL_BATCH = 4
CLIP = 0.02

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore:Unsupported layer type")]


def _run(checkpoint: Path, out: Path, *, ranks: int, resume: Path | None = None, accumulate: int = 1) -> dict:
    done = launch(__file__, [checkpoint, out, resume or "", accumulate], ranks=ranks)
    report = json.loads((out / "report.json").read_text())
    report["log"] = done.stdout + done.stderr
    return report


def test_two_ranks_match_one_process_and_resume_on_one(tmp_path):
    from tests.tiny_models import build_tiny_model, save_fused_checkpoint

    save_fused_checkpoint(build_tiny_model("qwen3_moe", num_layers=2), tmp_path / "ckpt")
    one = _run(tmp_path / "ckpt", tmp_path / "one", ranks=1)
    two = _run(tmp_path / "ckpt", tmp_path / "two", ranks=2)

    assert len(one["losses"]) == len(two["losses"]) == STEPS
    assert one["losses"][-1] != one["losses"][0]  # the curve moves: the comparison means something
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), rtol=1e-5, atol=0)
    assert two["world_size"] == 2 and two["ddp_ignores_experts"] and two["expert_lora_factors"] > 0
    assert two["reductions"] == STEPS and two["broadcasts"] == 1 and one["reductions"] == 0
    assert "local rank 1 of 2 on this node: the CPU experts run on CPUs" in two["log"]
    assert "expert weights of this node's 2 ranks in one shared file" in two["log"]

    # Saved once (rank 0), resumed on one rank: the rest of the single process's curve.
    saved = tmp_path / "two" / "checkpoint-2"
    assert len(list(saved.glob("adapter_model.safetensors"))) == 1 and (saved / "optimizer.pt").is_file()
    resumed = _run(tmp_path / "ckpt", tmp_path / "resumed", ranks=1, resume=saved)
    assert resumed["losses"][:2] == two["losses"][:2]  # the history the two ranks saved
    torch.testing.assert_close(torch.tensor(resumed["losses"]), torch.tensor(one["losses"]), rtol=1e-5, atol=0)


def test_two_ranks_match_one_process_with_accumulation_and_clipping(tmp_path):
    from tests.tiny_models import build_tiny_model, save_fused_checkpoint

    save_fused_checkpoint(build_tiny_model("qwen3_moe", num_layers=2), tmp_path / "ckpt")
    one = _run(tmp_path / "ckpt", tmp_path / "one", ranks=1, accumulate=2)
    two = _run(tmp_path / "ckpt", tmp_path / "two", ranks=2, accumulate=2)

    assert len(one["losses"]) == len(two["losses"]) == STEPS
    assert min(one["grad_norms"]) > 5 * CLIP  # every step clipped: the norm decides the update
    assert two["reductions"] == STEPS  # once per optimizer step, not per micro-batch
    torch.testing.assert_close(torch.tensor(two["grad_norms"]), torch.tensor(one["grad_norms"]), rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), rtol=1e-5, atol=0)


# ---- the training script (one process, or each torchrun worker) ---------------------------------------------------


def _train(checkpoint: str, out: str, resume: str, accumulate: str) -> None:
    import logging

    import transformers
    from torch.nn.parallel import DistributedDataParallel

    from kt_plugins.hf_trainer import KTCallback
    from tests.tiny_models import token_dataset, trainer_args

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    model = peft_model_with_expert_lora(checkpoint)
    micro_batches = int(accumulate)
    args = trainer_args(
        out,
        max_steps=STEPS,
        per_device_train_batch_size=GLOBAL_BATCH // world // micro_batches,
        gradient_accumulation_steps=micro_batches,
        max_grad_norm=CLIP if micro_batches > 1 else 1.0,
        logging_steps=1,
        save_strategy="steps",
        save_steps=2,
        ddp_backend="gloo" if world > 1 else None,
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=token_dataset(n=32), callbacks=[KTCallback(cpu_infer=None)]
    )
    trainer.train(resume_from_checkpoint=resume or None)
    wrapped = trainer.model_wrapped
    ignored = wrapped.parameters_to_ignore if isinstance(wrapped, DistributedDataParallel) else set()
    if trainer.is_world_process_zero():
        report = {
            "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
            "grad_norms": [e["grad_norm"] for e in trainer.state.log_history if "grad_norm" in e],
            "reductions": model.kt_lora_averager.reductions,
            "broadcasts": model.kt_lora_averager.broadcasts,
            "world_size": trainer.args.world_size,
            "ddp_ignores_experts": any(name.endswith("experts.gate_up_proj") for name in ignored),
            "expert_lora_factors": sum(1 for n, p in model.named_parameters() if ".experts.lora." in n),
        }
        Path(out, "report.json").write_text(json.dumps(report))


if __name__ == "__main__":
    run_rank(_train, *sys.argv[1:5])
