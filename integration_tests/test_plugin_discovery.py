"""A third-party family installed with pip is discovered through the `kt` entry-point group.

Installs integration_tests/fake_plugin into this environment, runs a fresh interpreter that loads a
tiny OLMoE checkpoint (a family kt-plugins does not ship) through the plugin, and uninstalls it.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

FAKE_PLUGIN = Path(__file__).parent / "fake_plugin"

CHILD = textwrap.dedent(
    """
    import sys, torch, transformers
    from kt_core.architectures import get_architecture
    from kt_core.experts import KTExperts
    from kt_core.loading import load_model
    from kt_core.placement import parse_rules
    from kt_core.plugins import loaded_plugins

    assert "kt_fake_family" in loaded_plugins(), loaded_plugins()
    assert get_architecture("olmoe").name == "fake_olmoe"
    config = transformers.AutoConfig.for_model(
        "olmoe", hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, vocab_size=64)
    torch.manual_seed(0)
    reference = transformers.AutoModelForCausalLM.from_config(config).eval()
    reference.save_pretrained(sys.argv[1])
    rules = parse_rules([{"match": {"name": "mlp\\\\.experts$"}, "replace": {"class": "fake_experts"}}])
    model = load_model(sys.argv[1], device="cpu", rules=rules, kernel="torch", progress=False)
    experts = model.model.layers[1].mlp.experts
    assert type(experts).__name__ == "FakeExperts" and isinstance(experts, KTExperts)
    ids = torch.randint(0, 64, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits)
    print("discovered")
    """
)


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args], check=True)


def test_installed_plugin_is_discovered(tmp_path):
    _pip("install", "--no-build-isolation", "--no-deps", str(FAKE_PLUGIN))
    try:
        result = subprocess.run(
            [sys.executable, "-c", CHILD, str(tmp_path / "olmoe")], capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, result.stderr[-4000:]
        assert "discovered" in result.stdout
    finally:
        _pip("uninstall", "-y", "kt-fake-plugin")
