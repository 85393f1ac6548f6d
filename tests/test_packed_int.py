"""compressed-tensors pack-quantized checkpoints (Kimi-K2's int4 release): the format, and loading one for LoRA."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from kt_core import KTExperts, load_model
from kt_core.loading import CheckpointError
from kt_core.loading.packed_int import PackedArgs, dequantize_packed, pack_quantized, packed_args
from tests.tiny_models import build_tiny_model

INT4_G32 = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32}


def _config(weights: dict) -> dict:
    return {
        "quantization_config": {
            "quant_method": "compressed-tensors",
            "format": "pack-quantized",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}},
            "ignore": ["lm_head"],
        }
    }


def test_bit_layout_is_the_formats():
    """Column c sits in word c // 8 at bits 4 * (c % 8), stored as q + 8: one row written out by hand."""
    q = [-7, -1, 0, 1, 7, 3, -3, 2, 5]  # 9 columns: two words, the second padded with zeros
    words = [sum((v + 8) << (4 * i) for i, v in enumerate(q[:8])), q[8] + 8]
    expected = torch.tensor([[w - 2**32 if w >= 2**31 else w for w in words]], dtype=torch.int32)
    args = PackedArgs(bits=4, group_size=None)
    packed, scale, shape = pack_quantized(torch.tensor([q], dtype=torch.float32) * 0.5, args)  # amax 3.5: scale 0.5
    assert torch.equal(packed, expected) and scale.item() == 0.5 and shape.tolist() == [1, 9]
    back = dequantize_packed(packed, scale, shape.tolist(), args, torch.float32)
    assert back.tolist() == [[v * 0.5 for v in q]]


@pytest.mark.parametrize(("bits", "group"), [(4, 32), (4, None), (8, 16), (2, 8)])
@pytest.mark.parametrize("shape", [(24, 64), (5, 70)])
def test_round_trip_within_half_a_step(bits, group, shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(bits))
    args = PackedArgs(bits, group)
    packed, scale, stored_shape = pack_quantized(w, args)
    assert packed.dtype == torch.int32 and packed.shape == (shape[0], -(-shape[1] // (32 // bits)))
    back = dequantize_packed(packed, scale, stored_shape.tolist(), args, torch.float32)
    step = scale.repeat_interleave(group or shape[1], dim=1)[:, : shape[1]]
    assert ((back - w).abs() <= step / 2 + 1e-6).all()


def test_scheme_is_read_and_unsupported_ones_are_named():
    assert packed_args(_config(INT4_G32)) == PackedArgs(4, 32)
    assert packed_args(_config({**INT4_G32, "strategy": "channel", "group_size": None})) == PackedArgs(4, None)
    assert packed_args({"quantization_config": {"quant_method": "fp8"}}) is None and packed_args({}) is None
    with pytest.raises(ValueError, match=r"unsupported symmetric: false"):
        packed_args(_config({**INT4_G32, "symmetric": False}))
    with pytest.raises(ValueError, match=r"unsupported actorder 'group'"):
        packed_args(_config({**INT4_G32, "actorder": "group"}))
    with pytest.raises(ValueError, match=r"does not hold a \[4, 64\] weight"):
        dequantize_packed(torch.zeros(4, 7, dtype=torch.int32), torch.ones(4, 2), [4, 64], PackedArgs(4, 32))


def _int4_checkpoint(tmp_path):
    """A tiny Kimi-K2-layout checkpoint (DeepSeek-V3 family) whose routed experts are int4 pack-quantized."""
    reference = build_tiny_model("deepseek_v3", dtype=torch.bfloat16)
    reference.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    args, dequantized = PackedArgs(4, 32), {}
    for key in [k for k in tensors if ".mlp.experts." in k and k.endswith("_proj.weight")]:
        packed, scale, shape = pack_quantized(tensors.pop(key), args)
        stem = key.removesuffix(".weight")
        tensors.update({f"{stem}.weight_packed": packed, f"{stem}.weight_scale": scale.bfloat16(),
                        f"{stem}.weight_shape": shape})  # fmt: skip
        dequantized[key] = dequantize_packed(packed, scale.bfloat16(), shape.tolist(), args)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((tmp_path / "config.json").read_text())
    config["model_type"] = "kimi_k2"
    config.update(_config(INT4_G32))
    (tmp_path / "config.json").write_text(json.dumps(config))
    return reference, dequantized


def test_int4_checkpoint_loads_for_lora_on_the_cpu_path(tmp_path):
    peft = pytest.importorskip("peft")
    reference, dequantized = _int4_checkpoint(tmp_path)
    model = load_model(tmp_path, device="cpu", kernel="torch", progress=False)
    experts = model.model.layers[1].mlp.experts
    assert isinstance(experts, KTExperts) and experts.down_proj.dtype == torch.bfloat16
    torch.testing.assert_close(experts.down_proj[2], dequantized["model.layers.1.mlp.experts.2.down_proj.weight"])
    gate = dequantized["model.layers.1.mlp.experts.0.gate_proj.weight"]
    torch.testing.assert_close(experts.gate_up_proj[0, : gate.shape[0]], gate)
    torch.testing.assert_close(  # non-expert weights as stored (Kimi-K2 quantizes the routed experts only)
        model.model.layers[0].self_attn.q_a_proj.weight, reference.model.layers[0].self_attn.q_a_proj.weight
    )
    config = peft.LoraConfig(r=4, target_modules=["q_a_proj"], target_parameters=["mlp.experts.gate_up_proj"])
    model = peft.get_peft_model(model.train(), config)
    ids = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    lora = [p for n, p in model.named_parameters() if "lora" in n and p.grad is not None]
    assert lora and all(torch.isfinite(p.grad).all() for p in lora)


def test_missing_companion_is_named(tmp_path):
    _int4_checkpoint(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.mlp.experts.3.up_proj.weight_scale"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"experts\.3\.up_proj\.weight_packed: its companion tensor\(s\) "):
        load_model(tmp_path, device="cpu", kernel="torch", progress=False)
