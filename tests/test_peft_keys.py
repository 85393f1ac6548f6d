"""The one grammar of PEFT's LoRA keys and the adapter-folder reader, against what PEFT itself writes."""

from __future__ import annotations

import pytest
import torch

from kt_core.peft import AdapterFolder, LoraKey, parse_lora_key
from kt_core.peft.keys import lora_key
from tests.tiny_models import build_tiny_model

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.filterwarnings("ignore:Unsupported layer type")

EXPERTS = "model.layers.1.mlp.experts"
Q_PROJ = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        (f"base_model.model.{EXPERTS}.base_layer.lora_A.weight", LoraKey(EXPERTS, 1, "A", None)),
        (f"base_model.model.{EXPERTS}.lora_B.default.weight", LoraKey(EXPERTS, 0, "B", "default")),
        (f"base_model.model.{Q_PROJ}.lora_A.weight", LoraKey(Q_PROJ, 0, "A", None)),
        ("base_layer.base_layer.lora_B.other.weight", LoraKey("", 2, "B", "other")),  # relative to the module
        ("lora_A.weight", LoraKey("", 0, "A", None)),
        (f"base_model.model.{EXPERTS}.base_layer.gate_up_proj", None),
        ("base_model.model.model.embed_tokens.lora_embedding_A.default", None),
        (f"base_model.model.{Q_PROJ}.base_layer.weight", None),
    ],
)  # fmt: skip
def test_grammar(key, expected):
    assert parse_lora_key(key) == expected
    if expected is not None:
        relative = key.removeprefix("base_model.model.").removeprefix(f"{expected.module}.")
        assert lora_key(expected.depth, expected.which, expected.adapter) == relative


@pytest.mark.parametrize("safe_serialization", [True, False], ids=["safetensors", "bin"])
def test_folder_reads_what_peft_saves(tmp_path, safe_serialization):
    model = build_tiny_model("qwen3_moe", num_layers=2)
    targets = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    config = peft.LoraConfig(r=4, lora_alpha=16, use_rslora=True, target_modules=["q_proj"], target_parameters=targets)
    peft_model = peft.get_peft_model(model, config)
    peft_model.save_pretrained(tmp_path, safe_serialization=safe_serialization)
    saved = peft.get_peft_model_state_dict(peft_model)
    modules = dict(peft_model.get_base_model().named_modules())

    folder = AdapterFolder(tmp_path)
    assert folder.weights_file.name == ("adapter_model.safetensors" if safe_serialization else "adapter_model.bin")
    assert folder.rank_and_scaling() == (4, pytest.approx(16 / 2.0))  # rsLoRA: alpha / sqrt(r)
    shapes = {key: (parsed, shape) for key, parsed, shape in folder.lora_shapes()}
    assert shapes.keys() == saved.keys()
    for key, (parsed, shape) in shapes.items():
        assert parsed.module in modules and parsed.adapter is None
        assert shape == tuple(saved[key].shape)
    depths = sorted(parsed.depth for parsed, _ in shapes.values() if parsed.module.endswith("layers.1.mlp.experts"))
    assert depths == [0, 0, 1, 1]  # two nested wrappers, lora_A and lora_B each

    experts = folder.load_lora(lambda key: key.module.endswith("mlp.experts"))
    assert len(experts) == 8  # 2 layers x 2 parameters x (A, B)
    for parsed, tensor in experts:
        key = f"base_model.model.{parsed.module}.{'base_layer.' * parsed.depth}lora_{parsed.which}.weight"
        assert torch.equal(tensor, saved[key])


def test_folder_without_files_says_what_is_missing(tmp_path):
    folder = AdapterFolder(tmp_path)
    assert folder.weights_file is None
    with pytest.raises(FileNotFoundError, match=r"adapter_config\.json not found"):
        folder.config()
    with pytest.raises(FileNotFoundError, match=r"no adapter_model\.safetensors or adapter_model\.bin"):
        list(folder.lora_shapes())
