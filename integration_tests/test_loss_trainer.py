"""The efficient causal-LM loss (kt_core.loss) through the stock HF Trainer and the LLaMA-Factory CLI.

Gradient accumulation with ragged labels makes `num_items_in_batch` matter: each micro-batch's loss is
its sum over the whole accumulated batch's label count, as transformers computes it.
"""

from __future__ import annotations

import pytest
import torch

from kt_core.loss import enable_efficient_loss
from tests.tiny_models import build_tiny_model, trainer_args

transformers = pytest.importorskip("transformers")

from kt_plugins.hf_trainer import KTCallback  # noqa: E402  (needs transformers)

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore:Unsupported layer type")]

STEPS = 6


def _ragged_dataset(n: int = 32, seq: int = 16) -> list[dict[str, torch.Tensor]]:
    """Rows whose labelled tail varies in length (prompt tokens carry -100)."""
    g = torch.Generator().manual_seed(3)
    rows = []
    for i in range(n):
        ids = torch.randint(3, 64, (seq,), generator=g)
        labels = ids.clone()
        labels[: (5 * i) % (seq - 2)] = -100
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def _train(tmp_path, *, loss: str | None, callbacks=()):
    model = build_tiny_model("qwen3_moe", num_layers=2).train()
    if loss is not None:
        enable_efficient_loss(model, loss, chunk_tokens=7)
    args = trainer_args(
        tmp_path, max_steps=STEPS, per_device_train_batch_size=2, gradient_accumulation_steps=3, logging_steps=1
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_ragged_dataset(), callbacks=list(callbacks))
    trainer.train()
    return trainer, [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_trainer_with_gradient_accumulation_matches_plain_run(tmp_path):
    _, ref = _train(tmp_path / "ref", loss=None)
    trainer, ours = _train(tmp_path / "ours", loss="chunked")
    assert trainer.model_accepts_loss_kwargs  # the Trainer hands num_items_in_batch to the model
    assert len(ours) == len(ref) == STEPS and ref[-1] != ref[0]
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(ref), rtol=1e-5, atol=0)


def test_kt_callback_attaches_the_loss_by_default(tmp_path):
    _, off = _train(tmp_path / "off", loss=None, callbacks=[KTCallback(loss="off")])
    callback = KTCallback()
    _, ours = _train(tmp_path / "auto", loss=None, callbacks=[callback])
    assert callback.efficient_loss is not None and callback.efficient_loss.last_backend == "chunked"
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(off), rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match=r"KTCallback\(loss\)"):
        KTCallback(loss="fused")


def test_llamafactory_kt_loss(tmp_path):
    """`use_kt` attaches the loss by default (the log says which); `kt_loss: false` gives the same curve."""
    lf = pytest.importorskip("integration_tests.test_llamafactory")  # skips where LLaMA-Factory is absent
    model = lf.write_checkpoint(tmp_path / "ckpt", lf.REPO / "examples" / "tiny_moe" / "qwen3_moe", dtype=torch.float32)
    on, off = tmp_path / "on", tmp_path / "off"
    proc = lf.run_cli("train", lf.train_config(model, on, use_kt=True, kt_expert_lora=False), tmp_path)
    assert "causal-LM loss without [tokens x vocab] logits: chunked" in proc.stdout + proc.stderr
    proc = lf.run_cli("train", lf.train_config(model, off, use_kt=True, kt_expert_lora=False, kt_loss=False), tmp_path)
    assert "causal-LM loss without" not in proc.stdout + proc.stderr
    assert len(lf.losses(on)) == 4
    assert lf.losses(on) == pytest.approx(lf.losses(off), rel=1e-5)
