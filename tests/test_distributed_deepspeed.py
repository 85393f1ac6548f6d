"""DeepSpeed ZeRO-2 and ZeRO-3 with the routed experts in host memory: the experts' tensors stay out of DeepSpeed
(never broadcast, partitioned, moved or flattened), the expert LoRA factors are averaged over the ranks and stepped
by an optimizer of their own when ZeRO steps (kt_core.distributed.deepspeed).

The two-rank runs drive the stock Trainer (`TrainingArguments(deepspeed=<config>)`) over gloo on the CPU (DeepSpeed's
CPU accelerator); the one-process reference is the plain Trainer at the same global batch. Skipped when deepspeed is
not importable. Legend of a report: losses = the Trainer's logged loss per step; reductions / broadcasts = the
factors' all_reduce calls (one per optimizer step) and broadcasts from rank 0 (one); expert_ds = tensors of the
experts carrying DeepSpeed attributes (ds_id: a ZeRO-3 parameter); expert_params = experts' tensors still listed by
named_parameters(); in_deepspeed = the factors among the tensors DeepSpeed's optimizer holds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kt_core.settings import SettingError
from tests.distributed_helpers import launch, peft_model_with_expert_lora, run_rank

STEPS = 4
GLOBAL_BATCH = 4

pytestmark = pytest.mark.filterwarnings("ignore:Unsupported layer type")


def _deepspeed_importable() -> bool:
    done = subprocess.run([sys.executable, "-c", "import deepspeed"], capture_output=True, timeout=300)
    return done.returncode == 0


needs_deepspeed = pytest.mark.skipif(not _deepspeed_importable(), reason="deepspeed is not importable")


def _run(
    checkpoint: Path, out: Path, *, ranks: int, stage: int, accumulate: int = 1, saves: str = "", clip: float = 0.0
) -> dict:
    """saves: "" (no checkpoint), "save" (a checkpoint every 2 steps), "resume" (from the newest one in `out`);
    clip: the Trainer's max_grad_norm."""
    done = launch(__file__, [checkpoint, out, stage, accumulate, saves, clip], ranks=ranks,
                  env={"DS_ACCELERATOR": "cpu"}, timeout=1200)  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    report["log"] = done.stdout + done.stderr
    return report


def _check(one: dict, two: dict, out: Path, one_out: Path, stage: int) -> None:
    assert len(one["losses"]) == len(two["losses"]) == STEPS
    assert one["losses"][-1] != one["losses"][0]  # the curve moves: the comparison means something
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), rtol=1e-5, atol=0)
    # The logged gradient norm is of every trainable parameter, the expert LoRA's included, as without DeepSpeed.
    assert len(one["grad_norms"]) == len(two["grad_norms"]) == STEPS
    torch.testing.assert_close(torch.tensor(two["grad_norms"]), torch.tensor(one["grad_norms"]), rtol=1e-4, atol=0)
    assert two["zero_stage"] == stage and two["world_size"] == 2
    assert two["reductions"] == STEPS and two["broadcasts"] == 1  # once per optimizer step, not per micro-batch
    # The experts are DeepSpeed's in nothing: no ZeRO attribute, no parameter DeepSpeed lists, none in its optimizer.
    assert two["expert_ds"] == [] and two["expert_params"] == [] and two["in_deepspeed"] == 0
    assert two["optimizer_params"] > 0  # DeepSpeed's optimizer stepped the other LoRA (its flat partitions)
    for rank in range(2):
        state = torch.load(out / f"factors-{rank}.pt")
        # The frozen base weights are the loaded ones, whole, in the tensors the operator was built on.
        assert state["base_unchanged"] and state["base_same_storage"], rank
        assert state["base_shapes"] == one["base_shapes"]
    # The adapter save_model writes: PEFT's keys and values, the expert LoRA's included (ZeRO-3: gathered).
    ours, theirs = (load_file(o / "adapter" / "adapter_model.safetensors") for o in (out, one_out))
    assert ours.keys() == theirs.keys() and sum(".experts." in k for k in ours) == 8, sorted(ours)
    for key, value in theirs.items():
        torch.testing.assert_close(ours[key], value, rtol=1e-4, atol=1e-6, msg=key)
    first, second = torch.load(out / "factors-0.pt"), torch.load(out / "factors-1.pt")
    start = torch.load(out / "factors-start.pt")
    assert first["values"].keys() == second["values"].keys() and len(first["values"]) == 8  # 2 layers x 4 factors
    for name, value in first["values"].items():
        torch.testing.assert_close(value, second["values"][name], rtol=0, atol=0, msg=name)  # the same on both ranks
        assert not torch.equal(value, start[name]), name  # moved by training
    assert "DeepSpeed leaves the 2 routed-experts modules alone" in two["log"]


@needs_deepspeed
@pytest.mark.parametrize(
    ("stage", "accumulate", "clip"), [(2, 1, 0.0), (2, 2, 0.0), (3, 1, 0.0), (2, 2, 0.05), (3, 1, 0.05)]
)
def test_deepspeed_two_ranks_match_one_process(tmp_path, stage, accumulate, clip):
    """clip: max_grad_norm, below every step's norm (so every step clips): ZeRO and the factors by the one norm."""
    from tests.tiny_models import build_tiny_model, save_fused_checkpoint

    save_fused_checkpoint(build_tiny_model("qwen3_moe", num_layers=2), tmp_path / "ckpt")
    one = _run(tmp_path / "ckpt", tmp_path / "one", ranks=1, stage=0, accumulate=accumulate, clip=clip)
    two = _run(tmp_path / "ckpt", tmp_path / "two", ranks=2, stage=stage, accumulate=accumulate, clip=clip)
    if clip:
        assert min(one["grad_norms"]) > 2 * clip  # clipping changes every step
    _check(one, two, tmp_path / "two", tmp_path / "one", stage)


@needs_deepspeed
def test_deepspeed_resumes_the_expert_lora_and_its_optimizer(tmp_path):
    """ZeRO-2 on 2 ranks saving every 2 steps; a new pair of processes resumes from checkpoint-2
    (`train(resume_from_checkpoint=True)`) and continues the uninterrupted run's curve and expert LoRA."""
    import shutil

    from tests.tiny_models import build_tiny_model, save_fused_checkpoint

    save_fused_checkpoint(build_tiny_model("qwen3_moe", num_layers=2), tmp_path / "ckpt")
    whole = _run(tmp_path / "ckpt", tmp_path / "whole", ranks=2, stage=2, saves="save")
    saved = tmp_path / "whole" / "checkpoint-2"
    assert (saved / "kt_expert_lora.pt").is_file()
    shutil.copytree(saved, tmp_path / "resumed" / "checkpoint-2")
    resumed = _run(tmp_path / "ckpt", tmp_path / "resumed", ranks=2, stage=2, saves="resume")
    assert "expert LoRA and its optimizer state resumed from" in resumed["log"]
    assert resumed["losses"][:2] == whole["losses"][:2]  # the history the checkpoint holds
    torch.testing.assert_close(torch.tensor(resumed["losses"]), torch.tensor(whole["losses"]), rtol=1e-5, atol=0)
    ours, theirs = torch.load(tmp_path / "resumed" / "factors-0.pt"), torch.load(tmp_path / "whole" / "factors-0.pt")
    for name, value in theirs["values"].items():
        torch.testing.assert_close(ours["values"][name], value, rtol=1e-5, atol=1e-7, msg=name)


# ---- one process: the hiding and the refusals -------------------------------------------------------------------


def test_prepare_deepspeed_hides_the_experts_tensors():
    """The experts' tensors leave the parameter registry (the same tensor objects stay attributes), the factors
    still save under PEFT's keys, and the optimizer of the model's parameters no longer holds them."""
    from kt_core import KTExperts
    from kt_core.distributed import prepare_deepspeed
    from tests.test_distributed import _tiny_with_expert_lora

    model = _tiny_with_expert_lora()
    experts = [m for m in model.modules() if isinstance(m, KTExperts)]
    before = {id(getattr(m, n)) for m in experts for n in ("gate_up_proj", "down_proj")}
    factors = [p for m in experts for p in m.lora.factors()]
    beside = prepare_deepspeed(model)
    assert beside is model.kt_deepspeed and prepare_deepspeed(model) is beside
    assert [id(p) for p in beside.factors] == [id(p) for p in factors]
    assert not any(".experts." in n for n, _ in model.named_parameters())
    assert {id(getattr(m, n)) for m in experts for n in ("gate_up_proj", "down_proj")} == before
    assert all(p.requires_grad for p in beside.trainable) and len(beside.trainable) == 8
    ids = torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in factors)  # the operator still computes their gradients


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"gradient_clipping": 1.0, "zero_optimization": {"stage": 0}},
            r"DeepSpeed gradient_clipping: got 1\.0 with zero_optimization\.stage 0, expected 0\..*max_grad_norm=0",
        ),
        ({"fp16": {"enabled": True}}, r"DeepSpeed fp16\.enabled: got True, expected False"),
    ],
)
def test_deepspeed_settings_we_do_not_run_are_refused(config, message):
    from kt_core.distributed import prepare_deepspeed
    from tests.test_distributed import _tiny_with_expert_lora

    with pytest.raises(SettingError, match=message):
        prepare_deepspeed(_tiny_with_expert_lora(), config)


def test_deepspeed_outside_the_tested_range_is_refused(monkeypatch):
    import importlib.metadata

    from kt_core.distributed.deepspeed import TESTED_RANGE, check_deepspeed_version

    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda d: "0.18.0" if d == "deepspeed" else real(d))
    with pytest.raises(SettingError, match=rf"DeepSpeed 0\.18\.0: .*>={TESTED_RANGE[0]},<{TESTED_RANGE[1]}"):
        check_deepspeed_version()
    monkeypatch.setattr(importlib.metadata, "version", lambda d: TESTED_RANGE[0] if d == "deepspeed" else real(d))
    assert check_deepspeed_version() == TESTED_RANGE[0]


# ---- the training script (one process, or each torchrun worker) ---------------------------------------------------


def _train(checkpoint: str, out: str, stage: str, accumulate: str, saves: str, clip: str) -> None:
    import logging

    import torch.distributed as dist
    import transformers

    from kt_core import KTExperts
    from kt_plugins.hf_trainer import KTCallback
    from tests.tiny_models import token_dataset, trainer_args

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    model = peft_model_with_expert_lora(checkpoint)
    experts = [(n, m) for n, m in model.named_modules() if isinstance(m, KTExperts)]
    base = {f"{n}.{w}": getattr(m, w) for n, m in experts for w in ("gate_up_proj", "down_proj")}
    base_start = {k: (t.data_ptr(), t.detach().clone()) for k, t in base.items()}
    micro_batches = int(accumulate)
    ds = {}
    if stage != "0":
        ds_config = {
            "zero_optimization": {"stage": int(stage)},
            "train_micro_batch_size_per_gpu": "auto",
            "train_batch_size": "auto",
            "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto",
            "stage3_gather_16bit_weights_on_model_save": True,  # ZeRO-3's save_model gathers (ignored by ZeRO-2)
        }
        ds = {"deepspeed": ds_config, "ddp_backend": "gloo"}
    args = trainer_args(
        out,
        max_steps=STEPS,
        per_device_train_batch_size=GLOBAL_BATCH // world // micro_batches,
        gradient_accumulation_steps=micro_batches,
        max_grad_norm=float(clip),
        logging_steps=1,
        **({"save_strategy": "steps", "save_steps": 2} if saves else {}),
        **ds,
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=token_dataset(n=32), callbacks=[KTCallback(cpu_infer=None)]
    )
    names = ("gate_up_A", "gate_up_B", "down_A", "down_B")
    factors = {f"{n}.lora.{f}": getattr(m.lora, f) for n, m in experts for f in names}  # PEFT's, taken over
    start = {k: p.detach().clone() for k, p in factors.items()}
    trainer.train(resume_from_checkpoint=True if saves == "resume" else None)
    trainer.save_model(str(Path(out, "adapter")))
    rank = dist.get_rank() if dist.is_initialized() else 0
    unchanged = all(torch.equal(t, base_start[k][1]) for k, t in base.items())
    same_storage = all(t.data_ptr() == base_start[k][0] for k, t in base.items())
    torch.save(
        {
            "values": {k: p.detach().clone() for k, p in factors.items()},
            "base_unchanged": unchanged,
            "base_same_storage": same_storage,
            "base_shapes": {k: list(t.shape) for k, t in base.items()},
        },
        Path(out, f"factors-{rank}.pt"),
    )
    if rank == 0:
        torch.save(start, Path(out, "factors-start.pt"))
        beside = getattr(model, "kt_deepspeed", None)
        report = {
            "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
            "grad_norms": [e["grad_norm"] for e in trainer.state.log_history if "grad_norm" in e],
            "world_size": trainer.args.world_size,
            "base_shapes": {k: list(t.shape) for k, t in base.items()},
        }
        if beside is not None:
            engine = trainer.model_wrapped
            inner = engine.optimizer.optimizer
            held = {id(p) for group in inner.param_groups for p in group["params"]}
            tensors = [*base.values(), *factors.values()]
            report |= {
                "zero_stage": engine.zero_optimization_stage(),
                "reductions": beside.reductions,
                "broadcasts": beside.broadcasts,
                "expert_ds": [k for k, t in {**base, **factors}.items() if any(a.startswith("ds_") for a in vars(t))],
                "expert_params": [n for n, _ in model.named_parameters() if ".experts." in n],
                "in_deepspeed": sum(id(t) in held for t in tensors),
                "optimizer_params": len(inner.state),
            }
        Path(out, "report.json").write_text(json.dumps(report))


if __name__ == "__main__":
    run_rank(_train, *sys.argv[1:7])
