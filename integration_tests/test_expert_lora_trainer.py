"""Expert LoRA through the stock HF Trainer, under the optimizers users pick and every split of the experts.

Stock Trainer + PEFT on the plain transformers model is the reference; ours is the same PEFT model with
KTCallback (experts and their LoRA on the CPU operator), optionally with the experts split between the CPU
and a GPU share (the CPU standing in for the GPU: the same split, staging, device copies of the factors and
gradient return as on a GPU). The Trainer's default optimizer is torch's fused AdamW, which updates
parameters in place without bumping their version counters.
"""

from __future__ import annotations

import importlib.util
import logging

import pytest
import torch

from kt_core.experts import KTExperts
from kt_core.streaming import enable_streaming
from tests.tiny_models import build_tiny_model, token_dataset, trainer_args

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from kt_plugins.hf_trainer import KTCallback  # noqa: E402  (needs transformers)

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore:Unsupported layer type")]

FAMILY = "qwen3_moe"
STEPS = 8

SPLITS = {
    "cpu": None,
    "all-streamed": dict(mode="gpu"),
    "half-streamed": dict(mode="gpu", expert_gpu_memory="0.5"),  # replaced by a per-model byte count below
    "resident": dict(mode="gpu", expert_gpu_memory="resident"),
    "int8-streamed": dict(mode="gpu", quantize="int8"),
}
OPTIMIZERS = ["adamw_torch_fused", "adamw_torch", "sgd", "adagrad"] + (
    ["adamw_bnb_8bit"] if importlib.util.find_spec("bitsandbytes") else []
)


def _peft_model(expert_lora: bool = True):
    model = build_tiny_model(FAMILY, num_layers=2)
    torch.manual_seed(1)
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=["q_proj", "v_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"] if expert_lora else None,
    )
    return peft.get_peft_model(model, config)


class _SplitExperts(transformers.TrainerCallback):
    """After KTCallback has converted the experts: split them between the CPU and the stand-in GPU."""

    def __init__(self, options):
        self.options = dict(options)
        self.runtime = None

    def on_init_end(self, args, state, control, model=None, **kwargs):
        layers = [m for m in model.modules() if isinstance(m, KTExperts)]
        E = layers[0].num_experts
        expert_bytes = sum(t[0].numel() * t.element_size() for t in (layers[0].gate_up_proj, layers[0].down_proj))
        budget = self.options.get("expert_gpu_memory")
        if budget == "0.5":  # one slot of half the experts
            self.options["expert_gpu_memory"] = 2 * (E // 2) * expert_bytes
        elif budget == "resident":  # a full slot, plus 3 resident experts per layer
            self.options["expert_gpu_memory"] = 2 * E * expert_bytes + 3 * len(layers) * expert_bytes
        self.runtime = enable_streaming(model, device="cpu", **self.options)


def _train(model, optim, tmp_path, callbacks, **overrides):
    losses = []
    model.register_forward_hook(lambda m, a, out: losses.append(out.loss.item()) if m.training else None)
    args = trainer_args(tmp_path, max_steps=STEPS, optim=optim, learning_rate=5e-2, **overrides)
    transformers.Trainer(model=model, args=args, train_dataset=token_dataset(), callbacks=callbacks).train()
    return losses


@pytest.fixture(scope="module")
def stock_curves(tmp_path_factory):
    cache = {}

    def run(optim, **overrides):
        key = (optim, tuple(sorted(overrides.items())))
        if key not in cache:
            cache[key] = _train(_peft_model(), optim, tmp_path_factory.mktemp("stock"), [], **overrides)
        return cache[key]

    return run


# Every split under the Trainer's default optimizer; every other optimizer on the two streamed splits.
CASES = [("adamw_torch_fused", split) for split in sorted(SPLITS)] + [
    (optim, split) for optim in OPTIMIZERS[1:] for split in ("all-streamed", "half-streamed")
]


@pytest.mark.parametrize(("optim", "split"), CASES)
def test_stock_trainer_loss_curve_under_every_optimizer_and_split(optim, split, stock_curves, tmp_path):
    stock = stock_curves(optim)
    callbacks = [KTCallback()]
    if SPLITS[split] is not None:
        callbacks.append(_SplitExperts(SPLITS[split]))
    ours = _train(_peft_model(), optim, tmp_path, callbacks)
    assert stock[-1] < stock[0]  # the curve moves: the comparison means something
    # int8-streamed weights are not the stock weights: agreement to the quantization error only.
    rtol = 2e-3 if split == "int8-streamed" else 1e-5
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(stock), rtol=rtol, atol=0)
    if split != "cpu":
        assert callbacks[-1].runtime.history, "the split never ran"


def test_expert_lora_moves_the_loss(stock_curves, tmp_path):
    """At these settings the expert LoRA visibly changes the curve: a run that lost its updates would fail."""
    without = _train(_peft_model(expert_lora=False), "adamw_torch_fused", tmp_path, [])
    with_lora = stock_curves("adamw_torch_fused")
    moved = max(abs(a - b) / abs(b) for a, b in zip(with_lora, without, strict=True))
    assert moved > 100 * 1e-5  # a hundred times the tolerance of the curve comparisons above


@pytest.mark.parametrize("split", ["all-streamed", "half-streamed"])
def test_gradient_accumulation_under_the_default_optimizer(split, stock_curves, tmp_path):
    options = {"gradient_accumulation_steps": 2, "per_device_train_batch_size": 2}
    stock = stock_curves("adamw_torch_fused", **options)
    ours = _train(_peft_model(), "adamw_torch_fused", tmp_path, [KTCallback(), _SplitExperts(SPLITS[split])], **options)
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(stock), rtol=1e-5, atol=0)


def test_shape_dependent_optimizer_is_named(stock_curves, tmp_path, caplog):
    """Adafactor factors its moments by a parameter's shape; our expert-LoRA factors are one matrix per expert,
    PEFT's one per projection, so the curves differ, and the run says so instead of differing silently."""
    with caplog.at_level(logging.WARNING, logger="kt_core.peft"):
        ours = _train(_peft_model(), "adafactor", tmp_path, [KTCallback()])
    assert "Adafactor updates a parameter according to its shape" in caplog.text
    assert ours != pytest.approx(stock_curves("adafactor"), rel=1e-5)  # the difference the warning is about
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kt_core.peft"):
        _train(_peft_model(), "adagrad", tmp_path / "adagrad", [KTCallback()])
    assert "according to its shape" not in caplog.text
