"""Every built-in family loads from both checkpoint namings and matches Hugging Face's logits."""

from __future__ import annotations

import pytest
import torch
from tiny_models import FAMILIES, build_tiny_model, save_fused_checkpoint, tiny_config

from kt_core.architectures import (
    Architecture,
    UnknownArchitectureError,
    get_architecture,
    list_architectures,
    register_architecture,
    unregister_architecture,
)
from kt_core.experts import KTExperts
from kt_core.loading import load_model


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_per_expert_checkpoint_matches_hf(family, tmp_path, tokens):
    reference = build_tiny_model(family)
    reference.save_pretrained(tmp_path)  # transformers 5 saves per-expert names (Mixtral: w1/w3/w2)
    model = load_model(tmp_path, device="cpu", kernel="torch", progress=False)
    experts = [m for m in model.modules() if isinstance(m, KTExperts)]
    assert len(experts) == sum(1 for n, _ in reference.named_modules() if n.endswith("mlp.experts"))
    torch.testing.assert_close(_logits(model, tokens), _logits(reference, tokens))


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_checkpoint_matches_hf(family, tmp_path, tokens):
    reference = build_tiny_model(family, seed=3)
    save_fused_checkpoint(reference, tmp_path)
    model = load_model(tmp_path, device="cpu", kernel="torch", progress=False)
    torch.testing.assert_close(_logits(model, tokens), _logits(reference, tokens))


def test_compiled_kernel_matches_hf(tmp_path, tokens):
    reference = build_tiny_model("qwen3_moe")
    reference.save_pretrained(tmp_path)
    model = load_model(tmp_path, device="cpu", progress=False)  # kernel "auto": the best this CPU runs
    torch.testing.assert_close(_logits(model, tokens), _logits(reference, tokens), rtol=1e-4, atol=1e-4)


def test_builtin_families_are_registered():
    names = set(list_architectures())
    assert {"deepseek_v2", "deepseek_v3", "qwen2_moe", "qwen3_moe", "mixtral", "glm4_moe"} <= names
    assert get_architecture("kimi_k2").name == "deepseek_v3"
    assert get_architecture(tiny_config("mixtral")).name == "mixtral"


def test_kimi_k2_config_builds_deepseek_v3():
    config = tiny_config("deepseek_v3").to_dict()
    config.update(model_type="kimi_k2", auto_map={"AutoConfig": "configuration_deepseek.DeepseekV3Config"})
    built = get_architecture(config).build_config(config)
    assert type(built).__name__ == "DeepseekV3Config"
    assert built.n_routed_experts == 4


def test_unknown_architecture_lists_supported_and_how_to_add():
    with pytest.raises(UnknownArchitectureError) as info:
        get_architecture({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    message = str(info.value)
    assert "'llama'" in message and "LlamaForCausalLM" in message
    for name in ("deepseek_v3", "qwen3_moe", "mixtral", "glm4_moe"):
        assert name in message
    assert "register_architectures" in message and "entry-point group 'kt'" in message


def test_unknown_architecture_when_loading(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(UnknownArchitectureError, match="Supported families"):
        load_model(tmp_path, device="cpu", progress=False)


def test_registry_validates_names_and_duplicates():
    with pytest.raises(ValueError, match="lowercase"):
        Architecture(name="MyMoE", model_types=("my_moe",))
    with pytest.raises(ValueError, match="model_types"):
        Architecture(name="my_moe", model_types=())
    with pytest.raises(ValueError, match="already registered"):
        register_architecture(get_architecture("qwen3_moe"))
    arch = Architecture(name="my_moe", model_types=("qwen3_moe",))
    with pytest.raises(ValueError, match="already handled by 'qwen3_moe'"):
        register_architecture(arch)


def test_register_and_unregister_in_process():
    arch = Architecture(name="my_moe", model_types=("my_moe_type",))
    register_architecture(arch)
    try:
        assert get_architecture("my_moe_type") is arch
        assert get_architecture("my_moe") is arch
    finally:
        unregister_architecture("my_moe")
    with pytest.raises(UnknownArchitectureError):
        get_architecture("my_moe_type")


def test_mixtral_checkpoint_names_are_renamed():
    arch = get_architecture("mixtral")
    key = "model.layers.0.block_sparse_moe.experts.3.w1.weight"
    assert arch.rename_checkpoint_key(key) == "model.layers.0.mlp.experts.3.w1.weight"
    assert arch.projections.gate == "w1" and arch.projections.up == "w3" and arch.projections.down == "w2"
