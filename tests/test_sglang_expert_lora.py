"""The SGLang plugin's expert-LoRA reader (`--kt-experts-lora`) reads back the factors an adapter was written from.

Both of PEFT's factor layouts: the environment's PEFT (0.18) saves only its own, so adapters are written here
with kt_core.peft.layout's conversion (`expert_factors_to_peft`, checked against PEFT's own formulas in
tests/test_peft_format.py), and the layout is named by `peft_version` as PEFT records it. At H == 2*I
(gate_up_proj) and H == I (down_proj) both layouts give the tensors the same shapes: only `peft_version` tells
them apart. The last test reads what the installed PEFT itself saves (run with PEFT >= 0.19 on the path, it
covers that layout as PEFT writes it).

Needs no sglang: the reader imports torch and kt_core only.

Legend: E = experts, H = hidden, I = expert intermediate, r = rank.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from kt_core.peft import EXPERT_PARAMETERS, expert_factors_to_peft, is_peft_param_wrapper
from kt_plugins.sglang.lora import read_expert_lora
from tests.tiny_models import build_tiny_model, randomize_lora

E, R, ALPHA = 4, 2, 8.0
LAYERS = (1, 3)
LAYOUTS = {"0.18.1": False, "0.19.1": True, "0.21.2": True}  # peft_version -> the swapped layout
SHAPES = {"H==2I": (32, 16), "H==I": (24, 24), "H!=I,2I": (40, 12)}  # (H, I)


def _factors(H: int, I: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "gate_up_A": torch.randn(E, R, H, generator=g),  # [E, r, H]
        "gate_up_B": torch.randn(E, 2 * I, R, generator=g),  # [E, 2I, r]
        "down_A": torch.randn(E, R, I, generator=g),  # [E, r, I]
        "down_B": torch.randn(E, H, R, generator=g),  # [E, H, r]
    }


def _write_adapter(path, factors_by_layer, *, swapped: bool, **recorded) -> None:
    """An adapter as PEFT saves it: down_proj's wrapper outermost, gate_up_proj's nested under base_layer."""
    state = {}
    for layer, factors in factors_by_layer.items():
        prefix = f"base_model.model.model.layers.{layer}.mlp.experts."
        for param, nest in (("down_proj", ""), ("gate_up_proj", "base_layer.")):
            a_name, b_name = EXPERT_PARAMETERS[param]
            lora_A, lora_B = expert_factors_to_peft(factors[a_name], factors[b_name], swapped=swapped)
            state[f"{prefix}{nest}lora_A.weight"] = lora_A
            state[f"{prefix}{nest}lora_B.weight"] = lora_B
    path.mkdir(parents=True)
    save_file(state, str(path / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": R, "lora_alpha": ALPHA, "target_parameters": ["gate_up_proj", "down_proj"]}
    (path / "adapter_config.json").write_text(json.dumps({**config, **recorded}))


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("peft_version", LAYOUTS)
def test_reads_back_the_factors_in_either_layout(tmp_path, peft_version, shape):
    H, I = shape
    written = {layer: _factors(H, I, seed=layer) for layer in LAYERS}
    _write_adapter(tmp_path / "adapter", written, swapped=LAYOUTS[peft_version], peft_version=peft_version)

    adapter = read_expert_lora(str(tmp_path / "adapter"))
    assert (adapter.rank, adapter.scaling, adapter.swapped) == (R, ALPHA / R, LAYOUTS[peft_version])
    for layer in LAYERS:
        read = adapter.layer_factors(layer, E, H, I)
        assert read.keys() == written[layer].keys()
        for name, tensor in written[layer].items():
            assert torch.equal(read[name], tensor), f"layer {layer} {name}"
    assert adapter.layer_factors(0, E, H, I) == {}  # a layer the adapter does not touch


@pytest.mark.parametrize("config", [{}, {"peft_version": "0.19.0.dev0@UNKNOWN"}], ids=["missing", "dev-build"])
def test_refuses_an_adapter_that_does_not_name_its_layout(tmp_path, config):
    _write_adapter(tmp_path / "adapter", {1: _factors(32, 16, seed=0)}, swapped=True, **config)
    expected = f"--kt-experts-lora: {tmp_path / 'adapter' / 'adapter_config.json'}: "
    with pytest.raises(ValueError, match="does not tell the factor layout of the expert LoRA") as info:
        read_expert_lora(str(tmp_path / "adapter"))
    assert str(info.value).startswith(expected)


def test_tensors_of_the_other_layout_fit_neither_parameter(tmp_path):
    H, I = SHAPES["H!=I,2I"]
    _write_adapter(tmp_path / "adapter", {1: _factors(H, I, seed=0)}, swapped=True, peft_version="0.18.1")
    adapter = read_expert_lora(str(tmp_path / "adapter"))
    with pytest.raises(
        ValueError, match=r"fits neither gate_up_proj \(lora_A \[r\*E, 24\], lora_B \[40, r\*E\]\)"
    ) as e:
        adapter.layer_factors(1, E, H, I)
    assert "in the PEFT < 0.19 layout that adapter_config.json's peft_version names" in str(e.value)


@pytest.mark.parametrize("moe_intermediate_size", [16, 32], ids=["H==2I", "H==I"])
def test_reads_what_the_installed_peft_saves(tmp_path, moe_intermediate_size):
    peft = pytest.importorskip("peft")
    model = build_tiny_model("qwen3_moe", num_layers=2, moe_intermediate_size=moe_intermediate_size)
    config = peft.LoraConfig(
        r=R, lora_alpha=ALPHA, target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    )
    peft_model = randomize_lora(peft.get_peft_model(model, config))
    peft_model.save_pretrained(tmp_path)

    H, I = model.config.hidden_size, moe_intermediate_size
    adapter = read_expert_lora(str(tmp_path))
    for layer in range(2):
        factors = adapter.layer_factors(layer, E, H, I)
        module = peft_model.get_submodule(f"base_model.model.model.layers.{layer}.mlp.experts")
        while is_peft_param_wrapper(module):  # PEFT's own delta of each wrapped parameter: [E, out, in]
            a_name, b_name = EXPERT_PARAMETERS[module.parameter_name]
            ours = adapter.scaling * factors[b_name] @ factors[a_name]
            torch.testing.assert_close(ours, module.get_delta_weight("default"), rtol=1e-5, atol=1e-6)
            module = module.base_layer
