"""On a GPU, bf16, through the stock Trainer under its default optimizer (fused AdamW): every split of the
experts gives the loss curve of stock transformers + PEFT on the GPU, with expert LoRA that visibly moves it.

One checkpoint on disk; the reference is `from_pretrained(device_map="cuda")` + PEFT + the Trainer, ours the
same with the experts on the CPU operator (`kt_core.load_model` + KTCallback), all CPU or split with the GPU
(`KTCallback(expert_gpu_memory=...)`: all streamed, half streamed, resident hot experts, int8 streamed).
"""

from __future__ import annotations

import pytest
import torch

import kt_core
from tests.tiny_models import build_tiny_model, save_fused_checkpoint, token_dataset, trainer_args

pytestmark = [pytest.mark.gpu, pytest.mark.filterwarnings("ignore:Unsupported layer type")]
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from kt_plugins.hf_trainer import KTCallback  # noqa: E402

FAMILY = "qwen3_moe"
LAYERS = 3
SIZES = dict(hidden_size=256, moe_intermediate_size=128, num_experts=16, num_experts_per_tok=4, vocab_size=512)
STEPS = 12
LR = 1e-2
EXPERT_BYTES = 3 * 256 * 128 * 2  # gate, up, down of one expert in bf16


def _budget(split: str) -> dict:
    E, slot = SIZES["num_experts"], 2 * EXPERT_BYTES  # one expert of slot capacity (two slots)
    return {
        "cpu": {},
        "all-streamed": {"expert_gpu_memory": E * slot},
        "half-streamed": {"expert_gpu_memory": E // 2 * slot},
        "resident": {"expert_gpu_memory": E * slot + 4 * LAYERS * EXPERT_BYTES},
        "int8-streamed": {"expert_gpu_memory": E * slot, "stream_quantize": "int8"},
    }[split]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    save_fused_checkpoint(build_tiny_model(FAMILY, num_layers=LAYERS, dtype=torch.bfloat16, **SIZES), path)
    return path


def _lora(expert_lora: bool = True):
    return peft.LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"] if expert_lora else None,
    )


def _train(model, tmp_path, callbacks):
    losses = []
    model.register_forward_hook(lambda m, a, out: losses.append(out.loss.item()) if m.training else None)
    args = trainer_args(
        tmp_path, max_steps=STEPS, learning_rate=LR, bf16=True, use_cpu=False, gradient_checkpointing=True,
        per_device_train_batch_size=8, logging_steps=1,
    )  # fmt: skip
    data = token_dataset(n=8, seq=64, vocab=SIZES["vocab_size"])  # one batch, seen every step: memorised
    transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks).train()
    return losses


def _stock(checkpoint, tmp_path, expert_lora=True):
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16, device_map="cuda")
    torch.manual_seed(1)
    return _train(peft.get_peft_model(model, _lora(expert_lora)), tmp_path, [])


@pytest.fixture(scope="module")
def stock_curves(checkpoint, tmp_path_factory):
    with_lora = _stock(checkpoint, tmp_path_factory.mktemp("stock"))
    without = _stock(checkpoint, tmp_path_factory.mktemp("stock-no-expert-lora"), expert_lora=False)
    print(f"\nstock + PEFT on the GPU: {[round(v, 4) for v in with_lora]}")
    print(f"stock, no expert LoRA:   {[round(v, 4) for v in without]}")
    moved = max(abs(a - b) for a, b in zip(with_lora, without, strict=True))
    return with_lora, moved


@pytest.mark.parametrize("split", ["cpu", "all-streamed", "half-streamed", "resident", "int8-streamed"])
def test_bf16_stock_trainer_every_split_matches_stock_peft(split, checkpoint, stock_curves, tmp_path):
    stock, moved = stock_curves
    model = kt_core.load_model(checkpoint, device="cuda", dtype=torch.bfloat16, progress=False)
    torch.manual_seed(1)
    model = peft.get_peft_model(model, _lora())
    ours = _train(model, tmp_path, [KTCallback(**_budget(split))])
    gap = max(abs(a - b) for a, b in zip(ours, stock, strict=True))
    print(f"\n{split}: {[round(v, 4) for v in ours]} | max |ours - stock| {gap:.4f}, expert LoRA moves {moved:.4f}")
    # bf16: ours and stock round differently; the gap must stay well below what the expert LoRA moves.
    assert gap < max(0.25 * moved, 1e-2), f"{split}: {gap} vs expert-LoRA effect {moved}"
    assert moved > 2e-2, "the expert LoRA must visibly move the loss at this learning rate"
