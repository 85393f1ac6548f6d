"""Which factor layout an adapter folder's expert LoRA has, told by the PEFT release recorded in adapter_config.json."""

from __future__ import annotations

import json

import pytest

from kt_core.peft import AdapterFolder, is_peft_param_wrapper
from kt_core.peft.layout import peft_layout_swapped, peft_version_layout_swapped
from tests.tiny_models import build_tiny_model


@pytest.mark.parametrize(
    ("version", "swapped"),
    [
        ("0.17.1", False),
        ("0.18.0", False),
        ("0.18.1", False),
        ("0.18.0.dev0", False),  # built before the last release without the swap
        ("0.18.1.dev0@0a1b2c3", None),  # PEFT's main between 0.18.0 and 0.19.0: before or after the swap
        ("0.19.0.dev0@UNKNOWN", None),
        ("0.19.0rc1", None),
        ("0.19.0", True),
        ("0.19.1", True),
        ("0.19.1.dev0@0a1b2c3", True),
        ("0.21.2", True),
        ("1.0.0", True),
        ("main", None),
        ("", None),
    ],
)  # fmt: skip
def test_version_tells_the_layout(version, swapped):
    assert peft_version_layout_swapped(version) is swapped


def _folder(tmp_path, **config) -> AdapterFolder:
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, **config}))
    return AdapterFolder(tmp_path)


def test_folder_reads_the_recorded_version(tmp_path):
    assert _folder(tmp_path / "old", peft_version="0.18.1").expert_layout_swapped() is False
    assert _folder(tmp_path / "new", peft_version="0.19.1").expert_layout_swapped() is True


@pytest.mark.parametrize(
    ("config", "found"),
    [
        ({}, "no `peft_version`"),
        ({"peft_version": None}, "no `peft_version`"),
        ({"peft_version": "0.19.0.dev0@UNKNOWN"}, "`peft_version` '0.19.0.dev0@UNKNOWN'"),
        ({"peft_version": 0.19}, "`peft_version` 0.19"),
    ],
    ids=["missing", "null", "dev-build", "not-a-string"],
)
def test_folder_refuses_what_does_not_tell_the_layout(tmp_path, config, found):
    folder = _folder(tmp_path, **config)
    with pytest.raises(ValueError) as info:
        folder.expert_layout_swapped()
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'adapter_config.json'}: {found}")
    assert 'the PEFT release that saved the adapter, as PEFT >= 0.18 records it, e.g. "0.18.1"' in message


def test_folder_agrees_with_the_installed_peft(tmp_path):
    """What the installed PEFT saves names the layout of its own wrappers (0.18 here, >= 0.19 where installed)."""
    peft = pytest.importorskip("peft")
    model = build_tiny_model("qwen3_moe", num_layers=1)
    config = peft.LoraConfig(r=2, target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    peft_model = peft.get_peft_model(model, config)
    peft_model.save_pretrained(tmp_path)
    layouts = {peft_layout_swapped(m) for m in peft_model.modules() if is_peft_param_wrapper(m)}
    assert layouts == {AdapterFolder(tmp_path).expert_layout_swapped()}
