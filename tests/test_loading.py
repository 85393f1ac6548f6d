"""The loader: checkpoint reading, memory plan, streaming, FP8, conversion and the multi-device split."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import build_tiny_model

from kt_core.experts import KTExperts
from kt_core.loading import (
    Checkpoint,
    CheckpointError,
    MemoryPlan,
    MemoryPlanError,
    convert_model,
    dequantize_fp8_blockwise,
    layer_devices_from_transfer_map,
    load_model,
    parse_size,
    quantize_fp8_blockwise,
    split_layers,
)


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


@pytest.fixture
def qwen3_dir(tmp_path):
    reference = build_tiny_model("qwen3_moe")
    reference.save_pretrained(tmp_path / "ckpt")
    return reference, tmp_path / "ckpt"


def test_sharded_checkpoint_with_index(tmp_path, tokens):
    reference = build_tiny_model("deepseek_v3")
    reference.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    model = load_model(tmp_path, device="cpu", kernel="torch", progress=False)
    torch.testing.assert_close(_logits(model, tokens), _logits(reference, tokens))


def test_experts_live_on_the_cpu_as_kt_experts(qwen3_dir):
    _, path = qwen3_dir
    model = load_model(path, device="cpu", kernel="torch", progress=False)
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, KTExperts)
    assert experts.gate_up_proj.shape == (4, 32, 32) and experts.down_proj.shape == (4, 32, 16)
    assert experts.gate_up_proj.dtype == torch.float32 and not experts.gate_up_proj.requires_grad
    assert not any(p.device.type == "meta" for p in model.parameters())
    assert not model.training


def test_bf16_checkpoint_loads_bf16(tmp_path, tokens):
    reference = build_tiny_model("mixtral", dtype=torch.bfloat16)
    reference.save_pretrained(tmp_path)
    model = load_model(tmp_path, device="cpu", kernel="torch", progress=False)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.bfloat16
    torch.testing.assert_close(_logits(model, tokens), _logits(reference, tokens), rtol=2e-2, atol=2e-2)


def test_mtp_layer_and_stray_tensors_are_skipped(tmp_path, tokens):
    reference = build_tiny_model("deepseek_v3", num_layers=2)
    reference.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.layers.2.mlp.experts.0.gate_proj.weight"] = torch.zeros(16, 32)  # DeepSeek's MTP layer
    tensors["model.layers.2.eh_proj.weight"] = torch.zeros(32, 64)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    model = load_model(tmp_path, device="cpu", kernel="torch", progress=False)
    torch.testing.assert_close(_logits(model, tokens), _logits(reference, tokens))


def test_missing_expert_weight_is_named(qwen3_dir):
    _, path = qwen3_dir
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.experts.2.up_proj.weight"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.experts\.2\.up"):
        load_model(path, device="cpu", kernel="torch", progress=False)


def test_missing_non_expert_weight_is_named(qwen3_dir):
    _, path = qwen3_dir
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.0.self_attn.q_proj.weight"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"not in the checkpoint, e\.g\. model\.layers\.0\.self_attn\.q_proj"):
        load_model(path, device="cpu", kernel="torch", progress=False)


def test_checkpoint_errors_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"config\.json is missing"):
        Checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors"):
        Checkpoint(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "shard-1.safetensors"}}))
    with pytest.raises(CheckpointError, match=r"missing: shard-1\.safetensors"):
        Checkpoint(tmp_path)
    (tmp_path / "model.safetensors.index.json").unlink()
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt safetensors header"):
        Checkpoint(tmp_path)
    save_file({"w": torch.zeros(64)}, tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match="truncated download"):
        Checkpoint(tmp_path)


def test_memory_plan_refuses_before_loading(qwen3_dir, monkeypatch):
    _, path = qwen3_dir

    def no_reads(self, key):
        raise AssertionError(f"tensor {key} read before the memory plan was checked")

    monkeypatch.setattr(Checkpoint, "get", no_reads)
    with pytest.raises(MemoryPlanError, match=r"host RAM needs .* is available \(host_memory_limit\)"):
        load_model(path, device="cpu", kernel="torch", host_memory_limit=1000, progress=False)


def test_memory_plan_numbers_and_gpu_refusal():
    plan = MemoryPlan(device_bytes={"cuda:0": 3 * 2**30, "cpu": 2**20}, expert_bytes=10 * 2**30, staging_bytes=2**28)
    assert plan.host_bytes == 10 * 2**30 + 2**28 + 2**20
    assert plan.gpu_bytes == {"cuda:0": 3 * 2**30}
    plan.check(gpu_memory_limit="4GiB", host_memory_limit="11GiB")
    with pytest.raises(
        MemoryPlanError, match=r"cuda:0 needs 3.00 GiB .* but 2.00 GiB is available \(gpu_memory_limit\)"
    ):
        plan.check(gpu_memory_limit={"cuda:0": "2GiB"}, host_memory_limit="64GiB")
    assert "experts 10.00 GiB" in str(plan)


def test_parse_size():
    assert parse_size(123) == 123
    assert parse_size("80GB") == 80 * 10**9
    assert parse_size("70GiB") == 70 * 2**30
    assert parse_size("1.5 MiB") == int(1.5 * 2**20)
    with pytest.raises(ValueError, match="expected a size"):
        parse_size("lots")


def test_fp8_blockwise_round_trip():
    w = torch.randn(200, 300)
    q, scale_inv = quantize_fp8_blockwise(w)
    assert q.dtype == torch.float8_e4m3fn and scale_inv.shape == (2, 3)
    back = dequantize_fp8_blockwise(q, scale_inv, dtype=torch.float32)
    torch.testing.assert_close(back, w, rtol=0.07, atol=0.02)
    with pytest.raises(ValueError, match="does not match"):
        dequantize_fp8_blockwise(q, scale_inv[:1])


def test_fp8_checkpoint_is_dequantized_at_load(tmp_path, tokens):
    reference = build_tiny_model("deepseek_v3")
    reference.save_pretrained(tmp_path)
    block = [16, 16]
    tensors = load_file(tmp_path / "model.safetensors")
    dequantized = {}
    for key in list(tensors):
        if key.endswith("proj.weight") and tensors[key].dim() == 2:
            q, scale_inv = quantize_fp8_blockwise(tensors[key], tuple(block))
            tensors[key], tensors[key + "_scale_inv"] = q, scale_inv
            dequantized[key] = dequantize_fp8_blockwise(q, scale_inv, tuple(block), torch.bfloat16)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": block, "fmt": "e4m3"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = load_model(tmp_path, device="cpu", kernel="torch", progress=False)
    assert model.model.layers[0].self_attn.q_a_proj.weight.dtype == torch.bfloat16
    torch.testing.assert_close(
        model.model.layers[0].self_attn.q_a_proj.weight, dequantized["model.layers.0.self_attn.q_a_proj.weight"]
    )
    experts = model.model.layers[1].mlp.experts
    torch.testing.assert_close(experts.down_proj[2], dequantized["model.layers.1.mlp.experts.2.down_proj.weight"])
    reference_bf16 = _logits(reference.to(torch.bfloat16), tokens).float()
    assert (_logits(model, tokens).float() - reference_bf16).abs().mean() < 0.05


def test_convert_model_swaps_experts_in_place(tokens):
    reference = build_tiny_model("deepseek_v2")
    expected = _logits(reference, tokens)
    gate_up = reference.model.layers[1].mlp.experts.gate_up_proj
    model = convert_model(reference, kernel="torch")
    experts = model.model.layers[1].mlp.experts
    assert isinstance(experts, KTExperts)
    assert experts.gate_up_proj.data_ptr() == gate_up.data_ptr()  # zero-copy on the CPU
    torch.testing.assert_close(_logits(model, tokens), expected)


def test_split_layers_balances_bytes():
    devices = ["cuda:0", "cuda:1"]
    assert split_layers([10] * 4, devices) == ["cuda:0", "cuda:0", "cuda:1", "cuda:1"]
    assert split_layers([30, 10, 10, 10], devices) == ["cuda:0", "cuda:1", "cuda:1", "cuda:1"]
    assert split_layers([10] * 4, devices, head_weight=20) == ["cuda:0", "cuda:1", "cuda:1", "cuda:1"]
    four = split_layers([1] * 61, [f"cuda:{i}" for i in range(4)])
    assert four == sorted(four) and {four.count(f"cuda:{i}") for i in range(4)} <= {15, 16}
    assert split_layers([5, 5], ["cpu"]) == ["cpu", "cpu"]


def test_transfer_map_expands_to_layer_devices():
    devices = layer_devices_from_transfer_map(61, {30: "cuda:1"}, "cuda:0")
    assert devices[:30] == ["cuda:0"] * 30 and devices[30:] == ["cuda:1"] * 31
    assert layer_devices_from_transfer_map(4, {"1": "cuda:1", 3: "cuda:2"}, "cuda:0") == [
        "cuda:0",
        "cuda:1",
        "cuda:1",
        "cuda:2",
    ]
    with pytest.raises(ValueError, match="out of range"):
        layer_devices_from_transfer_map(4, {9: "cuda:1"}, "cuda:0")


def test_split_over_two_devices_hooks_activations(qwen3_dir, tokens):
    reference, path = qwen3_dir
    model = load_model(path, device=["cpu", "cpu"], kernel="torch", progress=False)
    assert model.kt_placement.layer_devices == ["cpu", "cpu", "cpu"]
    assert model.kt_device_hooks  # installed because the plan names several placements
    torch.testing.assert_close(_logits(model, tokens), _logits(reference, tokens))


def test_missing_cuda_device_is_refused(qwen3_dir):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    _, path = qwen3_dir
    with pytest.raises(ValueError, match="CUDA is not available here"):
        load_model(path, device="cuda:0", progress=False)


@pytest.mark.gpu
def test_gpu_load_keeps_experts_on_the_cpu(qwen3_dir, tokens):
    reference, path = qwen3_dir
    model = load_model(path, device="cuda:0", progress=False)
    assert model.model.embed_tokens.weight.device.type == "cuda"
    assert model.model.layers[0].mlp.experts.gate_up_proj.device.type == "cpu"
    torch.testing.assert_close(_logits(model, tokens.cuda()).cpu(), _logits(reference, tokens), rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpu_split(qwen3_dir, tokens):
    reference, path = qwen3_dir
    model = load_model(path, device=["cuda:0", "cuda:1"], progress=False)
    assert set(model.kt_placement.layer_devices) == {"cuda:0", "cuda:1"}
    torch.testing.assert_close(_logits(model, tokens.cuda()).cpu(), _logits(reference, tokens), rtol=1e-4, atol=1e-4)
