"""Expert LoRA <-> PEFT's LoRA on fused expert parameters (`target_parameters`), against PEFT itself."""

from __future__ import annotations

import pytest
import torch

from kt_core.experts import KTExperts
from kt_core.peft import expert_factors_from_peft, expert_factors_to_peft
from kt_core.peft.attach import expert_lora_to_peft_state_dict, install_peft_state_dict_hooks, load_expert_lora_
from kt_core.peft.layout import peft_layout_swapped
from kt_core.peft.wrappers import take_over_peft_experts
from tests.tiny_models import build_tiny_model, randomize_lora

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.filterwarnings("ignore:Unsupported layer type")

EXPERT_TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _peft_model(family="qwen3_moe", *, targets=EXPERT_TARGETS, r=4, alpha=8, use_rslora=False):
    model = build_tiny_model(family, num_layers=2)
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_parameters=targets, use_rslora=use_rslora)
    return randomize_lora(peft.get_peft_model(model, config))


def _experts_name(peft_model):
    return next(n for n, m in peft_model.named_modules() if n.endswith("mlp.experts"))


def test_factor_layout_matches_peft_delta():
    peft_model = _peft_model()
    wrapper = peft_model.get_submodule(_experts_name(peft_model))
    for layer in (wrapper, wrapper.base_layer):  # down_proj (outer), gate_up_proj (inner)
        E, swapped = layer.num_experts, peft_layout_swapped(layer)  # swapped: PEFT >= 0.19
        A, B = expert_factors_from_peft(
            layer.lora_A["default"].weight, layer.lora_B["default"].weight, E, swapped=swapped
        )
        ours = layer.scaling["default"] * torch.bmm(B, A)  # [E, out, in]
        torch.testing.assert_close(ours, layer.get_delta_weight("default"), rtol=1e-5, atol=1e-6)
        assert ours.shape == layer.get_param().shape
        back_A, back_B = expert_factors_to_peft(A, B, swapped=swapped)
        torch.testing.assert_close(back_A, layer.lora_A["default"].weight.detach(), rtol=0, atol=0)
        torch.testing.assert_close(back_B, layer.lora_B["default"].weight.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_taken_over_experts_match_peft(family, use_rslora):
    peft_model = _peft_model(family, use_rslora=use_rslora)
    name = _experts_name(peft_model)
    wrapper = peft_model.get_submodule(name)
    experts, peft_lora = take_over_peft_experts(wrapper)
    assert peft_lora.chain == ["down_proj", "gate_up_proj"]
    assert peft_lora.scaling == pytest.approx(8 / (2.0 if use_rslora else 4.0))
    kt = KTExperts.from_module(experts, dtype=torch.float32)
    load_expert_lora_(kt, peft_lora)

    torch.manual_seed(2)
    T, H, E = 9, experts.gate_up_proj.shape[-1], experts.gate_up_proj.shape[0]
    x = torch.randn(T, H)
    ids = torch.stack([torch.randperm(E)[:2] for _ in range(T)])  # [T, 2]
    w = torch.rand(T, 2)
    torch.testing.assert_close(kt(x, ids, w), wrapper(x, ids, w), rtol=1e-5, atol=1e-5)


def test_state_dict_uses_peft_keys_and_loads_back():
    peft_model = _peft_model()
    name = _experts_name(peft_model)
    wrapper = peft_model.get_submodule(name)
    peft_keys = {k: v for k, v in wrapper.state_dict().items() if "lora_" in k}
    experts, peft_lora = take_over_peft_experts(wrapper)
    kt = KTExperts.from_module(experts, dtype=torch.float32)
    load_expert_lora_(kt, peft_lora)
    install_peft_state_dict_hooks(kt, peft_lora.chain, swapped=peft_lora.swapped)

    state = kt.state_dict()
    assert {k for k in state if "lora" in k} == set(peft_keys)
    for k, v in peft_keys.items():
        torch.testing.assert_close(state[k], v.detach(), rtol=0, atol=0)

    fresh = KTExperts.from_module(experts, dtype=torch.float32, lora_rank=4, lora_alpha=8)
    install_peft_state_dict_hooks(fresh, peft_lora.chain, swapped=peft_lora.swapped)
    fresh.load_state_dict(state)
    for a, b in zip(fresh.lora.factors(), kt.lora.factors(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_reversed_targets_and_single_target():
    peft_model = _peft_model(targets=list(reversed(EXPERT_TARGETS)))
    wrapper = peft_model.get_submodule(_experts_name(peft_model))
    _, peft_lora = take_over_peft_experts(wrapper)
    assert peft_lora.chain == ["down_proj", "gate_up_proj"]  # PEFT picks the nesting, not the list order

    peft_model = _peft_model(targets=["mlp.experts.gate_up_proj"])
    wrapper = peft_model.get_submodule(_experts_name(peft_model))
    experts, peft_lora = take_over_peft_experts(wrapper)
    kt = KTExperts.from_module(experts, dtype=torch.float32)
    lora = load_expert_lora_(kt, peft_lora)
    assert not lora.down_A.requires_grad and not lora.down_B.requires_grad
    assert float(lora.down_B.abs().sum()) == 0.0
    keys = expert_lora_to_peft_state_dict(lora, peft_lora.chain)
    assert set(keys) == {"lora_A.weight", "lora_B.weight"}


def test_take_over_rejects_mismatched_ranks():
    model = build_tiny_model("qwen3_moe", num_layers=2)
    config = peft.LoraConfig(r=4, target_parameters=EXPERT_TARGETS, rank_pattern={"down_proj": 2})
    peft_model = peft.get_peft_model(model, config)
    with pytest.raises(ValueError, match="share rank and alpha"):
        take_over_peft_experts(peft_model.get_submodule(_experts_name(peft_model)))


def test_swapped_layout_of_peft_019(monkeypatch):
    """PEFT >= 0.19 swaps in/out features of `gate_up_proj` / `down_proj` wrappers and marks them.

    Emulated on the installed PEFT by swapping before `update_layer`, as PEFT >= 0.19 does; the reference
    delta is the >= 0.19 formula delta[e] = scaling * lora_B[:, :, e] @ lora_A[e].
    """
    ParamWrapper = peft.tuners.lora.layer.ParamWrapper
    update_layer = ParamWrapper.update_layer

    def swapped_update_layer(layer, *args, **kwargs):
        if not getattr(layer, "_did_swap_in_out_features", False):
            layer.in_features, layer.out_features = layer.out_features, layer.in_features
            layer._did_swap_in_out_features = True
        return update_layer(layer, *args, **kwargs)

    monkeypatch.setattr(ParamWrapper, "update_layer", swapped_update_layer)
    peft_model = _peft_model()
    wrapper = peft_model.get_submodule(_experts_name(peft_model))
    for layer in (wrapper, wrapper.base_layer):
        E, d1, d2 = layer.get_param().shape
        lora_A, lora_B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        r = lora_A.shape[0] // E
        assert tuple(lora_A.shape) == (r * E, d2) and tuple(lora_B.shape) == (d1, r * E)
        expected = layer.scaling["default"] * torch.bmm(
            lora_B.detach().reshape(d1, r, E).permute(2, 0, 1), lora_A.detach().reshape(E, r, d2)
        )
        A, B = expert_factors_from_peft(lora_A, lora_B, E, swapped=True)
        torch.testing.assert_close(layer.scaling["default"] * torch.bmm(B, A), expected, rtol=1e-5, atol=1e-6)
        back_A, back_B = expert_factors_to_peft(A, B, swapped=True)
        torch.testing.assert_close(back_A, lora_A.detach(), rtol=0, atol=0)
        torch.testing.assert_close(back_B, lora_B.detach(), rtol=0, atol=0)

    # The layout travels with the converted module: its state dict holds PEFT's tensors as they were.
    peft_keys = {k: v.detach() for k, v in wrapper.state_dict().items() if "lora_" in k}
    experts, peft_lora = take_over_peft_experts(wrapper)
    assert peft_lora.swapped
    kt = KTExperts.from_module(experts, dtype=torch.float32)
    load_expert_lora_(kt, peft_lora)
    install_peft_state_dict_hooks(kt, peft_lora.chain, swapped=peft_lora.swapped)
    state = kt.state_dict()
    for k, v in peft_keys.items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=0)
    fresh = KTExperts.from_module(experts, dtype=torch.float32, lora_rank=4, lora_alpha=8)
    install_peft_state_dict_hooks(fresh, peft_lora.chain, swapped=True)
    fresh.load_state_dict(state)
    for a, b in zip(fresh.lora.factors(), kt.lora.factors(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
