"""Placement rules: validation errors name file and index, first match wins, legacy KTransformers files."""

from __future__ import annotations

import glob
import logging
import warnings
from pathlib import Path

import pytest
import torch
from tiny_models import build_tiny_model, tiny_config

from kt_core.architectures import get_architecture
from kt_core.architectures.builtin import BUILTIN_ARCHITECTURES
from kt_core.experts import KTExperts
from kt_core.loading import load_model
from kt_core.loading.meta import build_meta_model
from kt_core.placement import (
    PlacementRule,
    RuleError,
    RuleMatch,
    UnmatchedRuleWarning,
    files,
    load_rules,
    match_rules,
    parse_rules,
    resolve_placement,
    resolve_rule_file,
)
from kt_core.placement.legacy import legacy_backend_to_kernel, resolve_legacy_rule_name

REPO = Path(__file__).resolve().parents[1]

# Mirrors KTransformers' archive/kt-sft/.../optimize_rules/DeepSeek-V3-Chat-sft-amx-multi-gpu.yaml, with
# the layer ranges scaled from 61 layers split at 30 to 4 layers split at 2.
LEGACY_DEEPSEEK_V3_MULTI_GPU = r"""
- match:
    name: "^model\\.embed_tokens"
  replace:
    class: "default"
    kwargs: {generate_device: "cpu", prefill_device: "cpu"}
- match:
    name: "^model\\.layers\\.([0-9])\\."
    class: ktransformers.models.modeling_deepseek_v3.DeepseekV3YarnRotaryEmbedding
  replace:
    class: ktransformers.operators.RoPE.YarnRotaryEmbeddingV3
    kwargs: {generate_device: "cuda:0", prefill_device: "cuda:0"}
- match:
    name: "^model\\.layers\\.(0|1)\\.(?!self_attn\\.kv_b_proj).*$"
    class: torch.nn.Linear
  replace:
    class: ktransformers.operators.linear.KTransformersLinear
    kwargs: {generate_device: "cuda:0", prefill_device: "cuda:0", generate_op: "KLinearTorch"}
- match:
    name: "^model\\.layers\\.(0|1)\\.mlp$"
    class: ktransformers.models.modeling_deepseek_v3.DeepseekV3MoE
  replace:
    class: ktransformers.operators.experts.KDeepseekV3MoE
    kwargs: {generate_device: "cuda:0", prefill_device: "cuda:0"}
- match:
    name: "^model\\.layers\\.(0|1)\\.mlp\\.gate$"
    class: ktransformers.models.modeling_deepseek_v3.MoEGate
  replace:
    class: ktransformers.operators.gate.KMoEGate
    kwargs: {generate_device: "cuda:0", prefill_device: "cuda:0"}
- match:
    name: "^model\\.layers\\.(0|[1-9]|[12][0-9])\\.mlp\\.experts$"
  replace:
    class: ktransformers.operators.experts.KTransformersExperts
    kwargs: {prefill_device: "cuda:0", prefill_op: "KExpertsTorch", generate_device: "cpu",
             generate_op: "KSFTExpertsCPU", out_device: "cuda:0", backend: "AMXInt8"}
  recursive: False
- match:
    name: "^model\\.layers\\.(0|1)\\.self_attn$"
  replace:
    class: ktransformers.operators.attention.KDeepseekV2Attention
    kwargs: {generate_device: "cuda:0", prefill_device: "cuda:0"}
- match:
    name: "^model$"
  replace:
    class: "ktransformers.operators.models.KDeepseekV2Model"
    kwargs:
      per_layer_prefill_intput_threshold: 0
      transfer_map:
        2: "cuda:1"
- match:
    name: "^lm_head"
    class: torch.nn.Linear
  replace:
    class: ktransformers.operators.linear.KTransformersLinear
    kwargs: {generate_device: "cuda:1", prefill_device: "cuda:1", generate_op: "KLinearTorch"}
- match:
    name: "^model\\.layers\\.([23])\\.self_attn$"
  replace:
    class: ktransformers.operators.attention.KDeepseekV2Attention
    kwargs: {generate_device: "cuda:1", prefill_device: "cuda:1"}
"""


def _meta(family: str, **overrides):
    return build_meta_model(tiny_config(family, **overrides), torch.float32)


def _write(tmp_path, text: str, name="rules.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{a: 1}", "expected a YAML list"),
        ("- match: {name: x}\n- 3\n", "rule 1: expected a mapping"),
        ("- replace: {class: default}\n", "rule 0: 'match' must be a mapping"),
        ("- match: {name: '(unclosed'}\n", "rule 0: match.name '(unclosed' is not a valid regex"),
        ("- match: {name: x, kind: y}\n", "rule 0: unknown match keys ['kind']"),
        ("- match: {name: x}\n  recursive: maybe\n", "rule 0: 'recursive' must be true or false"),
        ("- match: {name: x}\n  replace: {class: default, kwargs: [1]}\n", "rule 0: replace.kwargs must be"),
        ("- match: {name: x}\n- match: {name: y}\n  replcae: {}\n", "rule 1: unknown keys ['replcae']"),
    ],
)
def test_validation_errors_name_file_and_rule_index(tmp_path, text, message):
    path = _write(tmp_path, text)
    with pytest.raises(RuleError) as info:
        load_rules(path)
    assert str(path) in str(info.value)
    assert message in str(info.value)


def test_bad_yaml_names_the_file(tmp_path):
    path = _write(tmp_path, "- match: {name: [\n")
    with pytest.raises(RuleError, match="not valid YAML"):
        load_rules(path)


def test_unknown_replace_class_and_kwargs_name_the_rule(tmp_path):
    model, arch = _meta("qwen3_moe"), get_architecture("qwen3_moe")
    bad_class = parse_rules([{"match": {"name": "experts$"}, "replace": {"class": "my.Missing"}}], "r.yaml")
    with pytest.raises(RuleError, match=r"r.yaml: rule 0: replace.class 'my.Missing'"):
        resolve_placement(model, bad_class, arch=arch, default_device="cpu")
    bad_kwarg = parse_rules(
        [{"match": {"name": "experts$"}, "replace": {"class": "kt_core.experts.KTExperts", "kwargs": {"kernal": 1}}}],
        "r.yaml",
    )
    with pytest.raises(RuleError, match=r"rule 0: unknown kwargs \['kernal'\]"):
        resolve_placement(model, bad_kwarg, arch=arch, default_device="cpu")
    not_experts = parse_rules([{"match": {"name": r"self_attn$"}, "replace": {"class": "kt"}}], "r.yaml")
    with pytest.raises(RuleError, match="not a routed-experts module"):
        resolve_placement(model, not_experts, arch=arch, default_device="cpu")


def test_unmatched_rule_warns_with_file_and_index(tmp_path):
    path = _write(tmp_path, '- match: {name: "experts$"}\n  recursive: false\n- match: {name: "^nothing$"}\n')
    rules = load_rules(path)
    with pytest.warns(UnmatchedRuleWarning, match=rf"{path}: rule 1 \(name='\^nothing\$'\) matched no module"):
        match_rules(_meta("qwen3_moe"), rules)


def test_first_match_wins_and_recursive_false_hides_children():
    model = _meta("qwen3_moe", num_layers=2)
    rules = parse_rules(
        [
            {"match": {"name": r"^model\.layers\.0$"}, "replace": {"kwargs": {"device": "cpu"}}, "recursive": False},
            {"match": {"name": r"mlp\.experts$"}, "replace": {"class": "kt"}},
            {"match": {"name": r"experts$"}, "replace": {"kwargs": {"device": "meta"}}},
        ]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # rule 2 never wins but is not the question here
        with pytest.raises(UnmatchedRuleWarning):
            match_rules(model, rules)
    matches = match_rules(model, rules, warn_unmatched=False)
    assert matches["model.layers.0"] is rules[0]
    assert not any(n.startswith("model.layers.0.") for n in matches)  # hidden by recursive: false
    assert matches["model.layers.1.mlp.experts"] is rules[1]  # the first of two matching rules


def test_class_match_uses_dotted_path_or_class_name():
    model = _meta("deepseek_v3", num_layers=2)
    by_path = parse_rules([{"match": {"class": "torch.nn.modules.linear.Linear", "name": "q_a_proj"}}])
    by_name = parse_rules([{"match": {"class": "ktransformers.models.modeling_deepseek_v3.DeepseekV3MoE"}}])
    assert set(match_rules(model, by_path)) == {
        "model.layers.0.self_attn.q_a_proj",
        "model.layers.1.self_attn.q_a_proj",
    }
    assert set(match_rules(model, by_name)) == {"model.layers.1.mlp"}  # layer 0 is dense


def test_legacy_deepseek_v3_multi_gpu_rules(tmp_path, caplog):
    path = _write(tmp_path, LEGACY_DEEPSEEK_V3_MULTI_GPU, "DeepSeek-V3-Chat-sft-amx-multi-gpu.yaml")
    model = _meta("deepseek_v3", num_layers=4)
    with caplog.at_level(logging.WARNING, logger="kt_core"), warnings.catch_warnings():
        warnings.simplefilter("ignore", UnmatchedRuleWarning)  # rotary and MoEGate: KTransformers' own classes
        plan = resolve_placement(model, load_rules(path), arch=get_architecture("deepseek_v3"), default_device="cuda:0")
    assert set(plan.experts) == {
        "model.layers.1.mlp.experts",
        "model.layers.2.mlp.experts",
        "model.layers.3.mlp.experts",
    }
    placement = plan.experts["model.layers.1.mlp.experts"]
    assert placement.cls is KTExperts and placement.backend == "kt"
    assert placement.options.get("kernel", "auto").startswith(("amx", "auto"))
    assert plan.layer_devices == ["cuda:0", "cuda:0", "cuda:1", "cuda:1"]  # transfer_map {2: cuda:1}
    assert caplog.text.count("asks for AMX") <= 1  # one notice per rule, not per module
    assert plan.device_of("model.embed_tokens.weight") == "cpu"
    assert plan.device_of("model.layers.1.self_attn.q_a_proj.weight") == "cuda:0"
    assert plan.device_of("model.layers.3.self_attn.q_a_proj.weight") == "cuda:1"
    assert plan.device_of("model.norm.weight") == "cuda:1"
    assert plan.device_of("lm_head.weight") == "cuda:1"
    assert plan.expert_module_of("model.layers.2.mlp.experts.gate_up_proj") == "model.layers.2.mlp.experts"
    assert plan.expert_module_of("model.layers.2.mlp.shared_experts.up_proj.weight") is None


def test_legacy_backend_names_map_to_kernels(caplog):
    with caplog.at_level(logging.WARNING):
        amx = legacy_backend_to_kernel("AMXBF16", where="f.yaml: rule 3")
    from kt_core import kernels

    if any(k.startswith("amx") for k in kernels.available_kernels()):
        assert amx.startswith("amx")
    else:
        assert amx == "auto" and "f.yaml: rule 3: backend AMXBF16 asks for AMX" in caplog.text
    assert legacy_backend_to_kernel("llamafile", where="x") == "auto"
    assert legacy_backend_to_kernel(None, where="x") == "auto"


def test_legacy_rule_names_resolve_to_shipped_rules():
    assert resolve_legacy_rule_name("DeepSeek-V3-Chat-sft-amx-multi-gpu.yaml") == "deepseek_v3/multi-gpu.yaml"
    assert resolve_legacy_rule_name("DeepSeek-V3-Chat-sft-amx-multi-gpu-4.yaml") == "deepseek_v3/multi-gpu-4.yaml"
    assert resolve_legacy_rule_name("DeepSeek-V2-Lite-Chat-sft-amx.yaml") == "deepseek_v2/single-gpu.yaml"
    assert resolve_legacy_rule_name("Qwen3Moe-sft-amx.yaml") == "qwen3_moe/single-gpu.yaml"
    assert resolve_legacy_rule_name("Mixtral-sft-amx-multi-gpu.yaml") == "mixtral/multi-gpu.yaml"
    assert resolve_legacy_rule_name("Llama-sft.yaml") is None
    resolved = resolve_rule_file("examples/kt_optimize_rules/DeepSeek-V3-Chat-sft-amx-multi-gpu.yaml")
    assert resolved == REPO / "rules" / "multi-gpu.yaml"
    resolved = resolve_rule_file("examples/kt_optimize_rules/DeepSeek-V3-Chat-sft-amx-multi-gpu-4.yaml")
    assert resolved == REPO / "rules" / "multi-gpu-4.yaml"
    assert resolve_rule_file("examples/kt_optimize_rules/Qwen3Moe-sft-amx.yaml") == REPO / "rules" / "single-gpu.yaml"
    with pytest.raises(FileNotFoundError, match="not found"):
        resolve_rule_file("examples/kt_optimize_rules/Llama-sft.yaml")


def test_family_rule_names_resolve_to_generic_rules_unless_the_family_ships_its_own(tmp_path, monkeypatch):
    assert resolve_rule_file("cpu-only.yaml") == REPO / "rules" / "cpu-only.yaml"
    assert resolve_rule_file("qwen3_moe/cpu-only.yaml") == REPO / "rules" / "cpu-only.yaml"
    with pytest.raises(FileNotFoundError, match="not found"):
        resolve_rule_file("no_such_family/cpu-only.yaml")  # only registered families fall back
    (tmp_path / "mixtral").mkdir()
    (tmp_path / "mixtral" / "cpu-only.yaml").write_text("[]\n")
    monkeypatch.setattr(files, "rules_dirs", lambda: [tmp_path, REPO / "rules"])
    assert resolve_rule_file("mixtral/cpu-only.yaml") == tmp_path / "mixtral" / "cpu-only.yaml"
    assert resolve_rule_file("qwen3_moe/cpu-only.yaml") == REPO / "rules" / "cpu-only.yaml"


def _shipped_rule_files() -> list[tuple[str, str]]:
    """(path, family): each generic file for every built-in family, each family folder's files for its family."""
    generic = sorted(glob.glob(str(REPO / "rules" / "*.yaml")))
    own = sorted(glob.glob(str(REPO / "rules" / "*" / "*.yaml")))
    families = [arch.name for arch in BUILTIN_ARCHITECTURES]
    return [(path, family) for path in generic for family in families] + [(p, Path(p).parent.name) for p in own]


@pytest.mark.parametrize(("path", "family"), _shipped_rule_files())
def test_shipped_rules_validate_and_match_their_family(path, family):
    text = Path(path).read_text()
    assert text.startswith("# ") and "Launch:" in text.split("\n- ")[0]
    for line in text.splitlines():
        if ":" in line and not line.lstrip().startswith(("#", "- match:", "match:", "replace:", "kwargs:")):
            assert "#" in line, f"{path}: knob without an inline comment: {line!r}"
    model = _meta(family, num_layers=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnmatchedRuleWarning)
        plan = resolve_placement(model, load_rules(path), arch=get_architecture(family), default_device="cpu")
    assert plan.experts
    if "multi-gpu" in path:
        gpus = int(Path(path).stem.rpartition("-")[2]) if Path(path).stem[-1].isdigit() else 2
        assert len(set(plan.layer_devices)) == min(gpus, 4)
        assert plan.device_of("lm_head.weight") == plan.layer_devices[-1]


def test_cpu_only_rules_load_and_match_hf(tmp_path, tokens):
    reference = build_tiny_model("glm4_moe")
    reference.save_pretrained(tmp_path)
    model = load_model(tmp_path, rules="glm4_moe/cpu-only.yaml", kernel="torch", progress=False)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, reference(tokens).logits)


def test_rules_can_keep_some_experts_as_hf_modules(tmp_path, tokens):
    reference = build_tiny_model("qwen3_moe")
    reference.save_pretrained(tmp_path)
    rules = [
        PlacementRule(match=RuleMatch(name=r"^model\.layers\.0\.mlp\.experts$"), recursive=False),
        *load_rules("qwen3_moe/cpu-only.yaml"),
    ]
    model = load_model(tmp_path, device="cpu", rules=rules, kernel="torch", progress=False)
    assert not isinstance(model.model.layers[0].mlp.experts, KTExperts)
    assert isinstance(model.model.layers[1].mlp.experts, KTExperts)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, reference(tokens).logits)
