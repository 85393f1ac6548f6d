"""`merge_and_unload()` / `unload()` of a PEFT model whose experts run on the CPU operator, against stock PEFT."""

from __future__ import annotations

import pytest
import torch

import kt_core
from kt_core.experts import KTExperts
from kt_core.peft import take_over_peft_model
from kt_core.peft.attach import merge_expert_lora_
from tests.tiny_models import build_tiny_model, randomize_lora, save_fused_checkpoint

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.filterwarnings("ignore:Unsupported layer type")

ATTENTION_TARGETS = {
    "qwen3_moe": ["q_proj", "o_proj"],
    "deepseek_v3": ["q_a_proj", "kv_b_proj", "o_proj"],
}


def _with_lora(model, family, targets=("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=ATTENTION_TARGETS[family], target_parameters=targets)
    return randomize_lora(peft.get_peft_model(model, config))


def _logits(model, seed=5):
    ids = torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(seed))
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("flow", ["a", "b"])
@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_merge_and_unload_matches_stock_peft(family, flow, tmp_path):
    stock = _with_lora(build_tiny_model(family, num_layers=2), family)
    if flow == "b":
        ours = take_over_peft_model(_with_lora(build_tiny_model(family, num_layers=2), family))
    else:
        save_fused_checkpoint(build_tiny_model(family, num_layers=2), tmp_path / "base")
        loaded = kt_core.load_model(tmp_path / "base", device="cpu", dtype=torch.float32, progress=False)
        ours = take_over_peft_model(_with_lora(loaded, family))
    torch.testing.assert_close(_logits(ours), _logits(stock), rtol=1e-4, atol=1e-5)

    stock_merged = stock.merge_and_unload()
    merged = ours.merge_and_unload()
    assert type(merged) is type(stock_merged)  # the plain transformers class, no PEFT wrapper left
    experts = [m for m in merged.modules() if isinstance(m, KTExperts)]
    assert experts and all(m.lora is None for m in experts)
    assert not any("lora" in name for name in merged.state_dict())
    expected = _logits(stock_merged)
    torch.testing.assert_close(_logits(merged), expected, rtol=1e-4, atol=1e-5)

    # A normal transformers checkpoint: plain transformers reads it back, no kt-plugins involved.
    merged.save_pretrained(tmp_path / "merged")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any(isinstance(m, KTExperts) for m in reloaded.modules())
    torch.testing.assert_close(_logits(reloaded), expected, rtol=1e-4, atol=1e-5)


def test_unload_drops_expert_lora():
    base = _logits(build_tiny_model("qwen3_moe", num_layers=2))
    ours = take_over_peft_model(_with_lora(build_tiny_model("qwen3_moe", num_layers=2), "qwen3_moe"))
    assert not torch.allclose(_logits(ours), base, rtol=1e-3, atol=1e-3)
    plain = ours.unload()
    assert all(m.lora is None for m in plain.modules() if isinstance(m, KTExperts))
    torch.testing.assert_close(_logits(plain), base, rtol=1e-5, atol=1e-6)


def test_merge_single_target_and_bf16_weights():
    stock = _with_lora(build_tiny_model("qwen3_moe", num_layers=2), "qwen3_moe", targets=["mlp.experts.down_proj"])
    ours = take_over_peft_model(
        _with_lora(build_tiny_model("qwen3_moe", num_layers=2), "qwen3_moe", targets=["mlp.experts.down_proj"])
    )
    torch.testing.assert_close(
        _logits(ours.merge_and_unload()), _logits(stock.merge_and_unload()), rtol=1e-4, atol=1e-5
    )

    # bf16 store: the merged weights are W + delta rounded once to bf16.
    experts = KTExperts.from_tensors(
        torch.randn(4, 32, 16).bfloat16(), torch.randn(4, 16, 16).bfloat16(), lora_rank=2, lora_alpha=4
    )
    with torch.no_grad():
        for p in experts.lora.parameters():
            p.normal_(0, 0.3)
    W = experts.down_proj.float().clone()
    delta = experts.lora.scaling * torch.bmm(experts.lora.down_B, experts.lora.down_A)
    merge_expert_lora_(experts)
    assert experts.lora is None and experts.down_proj.dtype == torch.bfloat16
    torch.testing.assert_close(experts.down_proj, (W + delta).bfloat16(), rtol=0, atol=0)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_disable_adapter_switches_expert_lora_off_as_stock_peft(family):
    """`with model.disable_adapter():` (a DPO reference pass) gives the base model, expert LoRA included."""
    stock = _with_lora(build_tiny_model(family, num_layers=2), family)
    ours = take_over_peft_model(_with_lora(build_tiny_model(family, num_layers=2), family))
    base = _logits(build_tiny_model(family, num_layers=2))
    with stock.disable_adapter():
        torch.testing.assert_close(_logits(stock), base, rtol=1e-5, atol=1e-6)
    with ours.disable_adapter():
        assert all(not m.lora_enabled for m in ours.modules() if isinstance(m, KTExperts) and m.lora is not None)
        torch.testing.assert_close(_logits(ours), base, rtol=1e-5, atol=1e-6)
    adapted = _logits(ours)
    assert not torch.allclose(adapted, base, rtol=1e-3, atol=1e-3)  # back on after the block
    torch.testing.assert_close(adapted, _logits(stock), rtol=1e-4, atol=1e-5)


def test_disabled_expert_lora_gets_no_gradient():
    ours = take_over_peft_model(_with_lora(build_tiny_model("qwen3_moe", num_layers=2), "qwen3_moe"))
    ids = torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(2))
    embeds = ours.get_input_embeddings()(ids).detach().requires_grad_()  # every adapter off: nothing else trains
    ours.train()
    with ours.disable_adapter():
        ours(inputs_embeds=embeds, labels=ids).loss.backward()
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0
    experts = [m for m in ours.modules() if isinstance(m, KTExperts) and m.lora is not None]
    assert experts and all(p.grad is None for m in experts for p in m.lora.factors())
