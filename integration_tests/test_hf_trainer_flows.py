"""The HF Trainer flows against the stock Trainer + PEFT on the plain model: same loss curves.

(a) `kt_core.load_model` (experts already KTExperts) -> `get_peft_model` -> Trainer + KTCallback
(b) plain transformers model -> `get_peft_model` -> Trainer + KTCallback (see test_hf_trainer.py)
and, for (b) and (a): gradient checkpointing (both reentrant modes), gradient accumulation, bf16 autocast,
checkpoint save + resume in a fresh Trainer (expert-LoRA optimizer state included).
"""

from __future__ import annotations

import pytest
import torch

import kt_core
from kt_core.experts import KTExperts
from tests.tiny_models import build_tiny_model, eval_logits, save_fused_checkpoint, token_dataset, trainer_args

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from kt_plugins.hf_trainer import KTCallback  # noqa: E402  (needs transformers)
from kt_plugins.hf_trainer.convert import expert_lora_parameters  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore:Unsupported layer type")]

STEPS = 20
LAYERS = 3
ATTENTION_TARGETS = {
    "qwen3_moe": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "deepseek_v3": ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"],
}


def _lora_config(family):
    return peft.LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,  # PEFT's ParamWrapper refuses dropout
        target_modules=ATTENTION_TARGETS[family],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    )


def _plain_peft(family):
    """Flow (b), and the stock reference: PEFT on the plain transformers model."""
    model = build_tiny_model(family, num_layers=LAYERS)
    torch.manual_seed(1)
    return peft.get_peft_model(model, _lora_config(family))


def _loaded_peft(family, checkpoint):
    """Flow (a): the model from kt_core.load_model (experts already on the CPU operator), then PEFT."""
    model = kt_core.load_model(checkpoint, device="cpu", dtype=torch.float32, progress=False)
    assert any(isinstance(m, KTExperts) for m in model.modules())
    torch.manual_seed(1)
    return peft.get_peft_model(model, _lora_config(family))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{family: folder} of tiny checkpoints holding the same weights as build_tiny_model(family)."""
    out = {}
    for family in ATTENTION_TARGETS:
        out[family] = tmp_path_factory.mktemp(family)
        save_fused_checkpoint(build_tiny_model(family, num_layers=LAYERS), out[family])
    return out


def _args(tmp_path, **overrides):
    return trainer_args(tmp_path, max_steps=STEPS, **overrides)


def _train(model, args, *, callbacks, resume=None):
    """Trains; returns the loss of every training forward (micro-batch) and the Trainer."""
    losses = []
    model.register_forward_hook(lambda m, a, out: losses.append(out.loss.item()) if m.training else None)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=token_dataset(), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return losses, trainer


def _assert_curves(ours, stock, rtol):
    assert len(ours) == len(stock) > 0
    assert stock[-1] < stock[0]  # the curve moves: the comparison means something
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(stock), rtol=rtol, atol=0)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_flow_a_load_model_then_peft_matches_stock(family, checkpoints, tmp_path):
    stock_model = _plain_peft(family)
    stock, _ = _train(stock_model, _args(tmp_path / "stock"), callbacks=[])
    model = _loaded_peft(family, checkpoints[family])
    ours, _ = _train(model, _args(tmp_path / "ours"), callbacks=[KTCallback()])
    _assert_curves(ours, stock, rtol=1e-4)
    assert all(m.lora is not None for m in model.modules() if isinstance(m, KTExperts))

    # The adapter is a stock one: PEFT alone loads it onto the plain transformers model.
    model.save_pretrained(tmp_path / "adapter")
    plain = peft.PeftModel.from_pretrained(build_tiny_model(family, num_layers=LAYERS), tmp_path / "adapter")
    ours_logits = eval_logits(model)
    torch.testing.assert_close(eval_logits(plain), ours_logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(eval_logits(stock_model), ours_logits, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize(
    ("flow", "options", "rtol"),
    [
        ("b", {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}}, 1e-4),
        ("a", {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": True}}, 1e-4),
        ("b", {"gradient_accumulation_steps": 2, "per_device_train_batch_size": 2}, 1e-4),
        # bf16 autocast: ours and stock round differently (stock's eager experts run bf16 matmuls, ours
        # accumulate in fp32), so only agreement to bf16 precision is expected.
        ("b", {"bf16": True}, 2e-2),
    ],
    ids=["checkpointing-nonreentrant", "checkpointing-reentrant-flow-a", "grad-accumulation", "bf16"],
)
def test_training_options_match_stock(flow, options, rtol, checkpoints, tmp_path):
    family = "qwen3_moe"
    stock, _ = _train(_plain_peft(family), _args(tmp_path / "stock", **options), callbacks=[])
    model = _plain_peft(family) if flow == "b" else _loaded_peft(family, checkpoints[family])
    ours, _ = _train(model, _args(tmp_path / "ours", **options), callbacks=[KTCallback()])
    _assert_curves(ours, stock, rtol=rtol)


class _CheckOptimizerState(transformers.TrainerCallback):
    """At the first resumed step: the expert-LoRA factors' Adam moments are those the checkpoint saved."""

    def __init__(self, saved_state):
        self.saved = saved_state
        self.checked = 0

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.checked:
            return
        params = [p for group in optimizer.param_groups for p in group["params"]]
        index = {id(p): i for i, p in enumerate(params)}
        for p in expert_lora_parameters(model):
            saved = self.saved[index[id(p)]]
            assert saved["exp_avg"].shape == p.shape
            torch.testing.assert_close(optimizer.state[p]["exp_avg"], saved["exp_avg"], rtol=0, atol=0)
            torch.testing.assert_close(optimizer.state[p]["exp_avg_sq"], saved["exp_avg_sq"], rtol=0, atol=0)
            self.checked += 1


@pytest.mark.parametrize("flow", ["a", "b"])
def test_resume_from_checkpoint_continues_the_curve(flow, checkpoints, tmp_path):
    family = "qwen3_moe"

    def build():
        return _plain_peft(family) if flow == "b" else _loaded_peft(family, checkpoints[family])

    args = _args(tmp_path / "run", save_strategy="steps", save_steps=STEPS // 2)
    full, trainer = _train(build(), args, callbacks=[KTCallback()])
    checkpoint = tmp_path / "run" / f"checkpoint-{STEPS // 2}"

    # The checkpoint's optimizer state covers every trainable parameter, expert LoRA included, in the
    # order of the optimizer's param groups (which the conversion, done before the optimizer exists, fixes).
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    n_trainable = sum(1 for p in trainer.model.parameters() if p.requires_grad)
    assert sum(len(g["params"]) for g in saved["param_groups"]) == n_trainable
    assert len(saved["state"]) == n_trainable

    # A fresh model (fresh LoRA init) and a fresh Trainer continue the same curve.
    check = _CheckOptimizerState(saved["state"])
    resumed, _ = _train(build(), args, callbacks=[KTCallback(), check], resume=str(checkpoint))
    assert check.checked > 0
    assert len(resumed) == STEPS - STEPS // 2
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(full[STEPS // 2 :]), rtol=1e-5, atol=0)


def test_bf16_training_on_a_packed_kernel_holds_the_experts_once(checkpoints, tmp_path, monkeypatch):
    """A bf16 model on a packed kernel: KTCallback frees the experts' weights once packed at train start (the packed
    forward and backward read only their own copy); the loss curve is the one of the run that keeps them, bit for
    bit, and merge_and_unload writes the weights back before merging."""
    monkeypatch.setenv("KT_AMX_EMULATE", "1")  # amx_bf16 on its scalar model where the CPU has no AMX
    family, runs = "qwen3_moe", {}
    for keep in (True, False):
        model = kt_core.load_model(
            checkpoints[family], device="cpu", dtype=torch.bfloat16, kernel="amx_bf16", progress=False
        )
        torch.manual_seed(1)
        model = peft.get_peft_model(model, _lora_config(family))
        losses, _ = _train(model, _args(tmp_path / f"keep-{keep}"), callbacks=[KTCallback(keep_host_weights=keep)])
        experts = [m for m in model.modules() if isinstance(m, KTExperts)]
        assert experts and all(m.host_weights_released != keep for m in experts)
        runs[keep] = (losses, model)
    assert runs[False][0] == runs[True][0]
    assert runs[True][0][-1] < runs[True][0][0]  # it trained

    merged = {keep: model.merge_and_unload() for keep, (_, model) in runs.items()}
    assert not any(m.host_weights_released for m in merged[False].modules() if isinstance(m, KTExperts))
    torch.testing.assert_close(eval_logits(merged[False]), eval_logits(merged[True]), rtol=0, atol=0)
