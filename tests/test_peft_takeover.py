"""`take_over_peft_model` keeps the placement kt_core already made and plans only a model not placed yet.

The rule file keeps layer 1's experts as transformers' module, on the GPU, or on the CPU (all a CPU-only machine
can express besides the CPU operator): after `load_model` + `get_peft_model`, the take-over must leave that layer
to PEFT and never run the placement again; the model computes what stock PEFT computes on the plain model.
"""

from __future__ import annotations

import pytest
import torch

import kt_core
import kt_core.loading.convert
from kt_core.experts import KTExperts
from kt_core.peft import is_peft_param_wrapper, take_over_peft_model
from tests.tiny_models import build_tiny_model, randomize_lora, save_fused_checkpoint

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.filterwarnings("ignore:Unsupported layer type")

EXPERT_TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
KEPT_LAYER_RULES = r"""
- match: {name: "^model\\.layers\\.LAYER\\.mlp\\.experts$"}
  replace: {class: default, kwargs: {device: DEVICE}}  # transformers' module: PEFT computes its LoRA
  recursive: false
- match: {name: "^model\\.layers\\.\\d+\\.mlp\\.experts$"}
  replace: {class: kt_core.experts.KTExperts}
  recursive: false
- match: {name: "^model$"}
  replace: {class: default, kwargs: {device: DEVICE}}
- match: {name: "^lm_head$"}
  replace: {class: default, kwargs: {device: DEVICE}}
"""


def write_kept_layer_rules(path, layer: int, device: str):
    """A rule file keeping one layer's routed experts as transformers' module on `device`, with the rest of the
    model; every other layer's experts on the CPU operator. Returns `path`."""
    path.write_text(KEPT_LAYER_RULES.replace("LAYER", str(layer)).replace("DEVICE", f'"{device}"'))
    return path


def _with_lora(model):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], target_parameters=EXPERT_TARGETS)
    return randomize_lora(peft.get_peft_model(model, config))


def _logits(model) -> torch.Tensor:
    """Logits of a fixed [2, 12] batch on the CPU, computed where the model's embeddings are."""
    ids = torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(5))
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids.to(model.get_input_embeddings().weight.device)).logits.cpu()


def _experts(peft_model, layer: int):
    return peft_model.get_base_model().model.layers[layer].mlp.experts


@pytest.fixture(params=["cpu", pytest.param("cuda:0", marks=pytest.mark.gpu)])
def placed(request, tmp_path):
    """A tiny Qwen3-MoE from kt_core.load_model with layer 1's experts kept as transformers' module."""
    save_fused_checkpoint(build_tiny_model("qwen3_moe", num_layers=3), tmp_path / "base")
    device = request.param
    rules = write_kept_layer_rules(tmp_path / "kept.yaml", 1, device)
    model = kt_core.load_model(tmp_path / "base", device=device, rules=rules, dtype=torch.float32, progress=False)
    assert [isinstance(layer.mlp.experts, KTExperts) for layer in model.model.layers] == [True, False, True]
    assert model.model.layers[1].mlp.experts.gate_up_proj.device == torch.device(device)
    return model


def test_placed_model_keeps_its_placement(placed, monkeypatch):
    def plan_again(*args, **kwargs):
        raise AssertionError("take_over_peft_model planned the placement of a placed model again")

    monkeypatch.setattr(kt_core.loading.convert, "plan_placement", plan_again)
    stock = _with_lora(build_tiny_model("qwen3_moe", num_layers=3))
    ours = take_over_peft_model(_with_lora(placed))

    for layer in (0, 2):
        experts = _experts(ours, layer)
        assert isinstance(experts, KTExperts) and experts.lora is not None
    kept = _experts(ours, 1)
    assert is_peft_param_wrapper(kept)  # PEFT's own LoRA on transformers' module, where the rules put it
    assert not any(isinstance(m, KTExperts) for m in kept.modules())
    assert kept.get_base_layer().gate_up_proj.device == placed.model.embed_tokens.weight.device
    torch.testing.assert_close(_logits(ours), _logits(stock), rtol=1e-4, atol=1e-5)

    # The adapter holds every layer's expert LoRA under PEFT's keys, the kept layer's from PEFT itself.
    saved = peft.get_peft_model_state_dict(ours)
    for layer in range(3):
        assert any(f"layers.{layer}.mlp.experts." in key and "lora_B" in key for key in saved)


def test_rules_for_a_placed_model_are_refused(placed):
    with pytest.raises(ValueError, match="placed this model already"):
        take_over_peft_model(_with_lora(placed), rules="cpu-only.yaml")


def test_model_not_placed_is_placed_with_the_rules_given(tmp_path):
    rules = write_kept_layer_rules(tmp_path / "kept.yaml", 1, "cpu")
    stock = _with_lora(build_tiny_model("qwen3_moe", num_layers=3))
    ours = take_over_peft_model(_with_lora(build_tiny_model("qwen3_moe", num_layers=3)), rules=rules)
    assert [isinstance(_experts(ours, layer), KTExperts) for layer in range(3)] == [True, False, True]
    assert is_peft_param_wrapper(_experts(ours, 1))
    torch.testing.assert_close(_logits(ours), _logits(stock), rtol=1e-4, atol=1e-5)
