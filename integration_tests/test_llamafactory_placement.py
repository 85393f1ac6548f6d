"""`lora_target: all` with a `kt_optimize_rule` that keeps one layer's routed experts as transformers' module:
the take-over after LLaMA-Factory's PEFT setup uses the placement kt_core.load_model made from the rules, and
does not plan again (which would move the kept layer onto the CPU operator too).

The kept layer's experts sit on the device of the rest of the model: on the CPU here (what a CPU-only machine
can express besides the CPU operator, whose GPU rules are refused), on the GPU with CUDA. That layer's expert
LoRA is PEFT's own, the other layers' ours; the loss curve equals the run with every layer on the CPU operator.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from test_llamafactory import REPO, losses, run_cli, train_config

from tests.test_peft_takeover import write_kept_layer_rules

pytestmark = pytest.mark.integration

LAYERS = 4  # examples/tiny_moe/qwen3_moe/config.json
KEPT = 1


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from make_checkpoint import write_checkpoint  # examples/tiny_moe, on sys.path through test_llamafactory

    config = REPO / "examples" / "tiny_moe" / "qwen3_moe"
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "qwen3_moe", config, dtype=torch.float32)


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda:0",
            marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")],
        ),
    ],
)
def test_take_over_keeps_the_rules_placement(checkpoint, tmp_path, device):
    rules = write_kept_layer_rules(tmp_path / "kept.yaml", KEPT, device)
    kept, everywhere = tmp_path / "kept", tmp_path / "everywhere"
    proc = run_cli("train", train_config(checkpoint, kept, use_kt=True, kt_optimize_rule=str(rules)), tmp_path)
    run_cli("train", train_config(checkpoint, everywhere, use_kt=True), tmp_path)

    log = proc.stdout + proc.stderr
    cpu = LAYERS - 1
    assert f"{cpu} routed-experts layers on the CPU operator" in log
    assert f"expert LoRA on {cpu} layers" in log

    # Every layer's expert LoRA is in the adapter, the kept layer's written by PEFT itself.
    with safe_open(str(kept / "adapter_model.safetensors"), framework="pt") as f:
        layers = {int(k.split("layers.")[1].split(".")[0]) for k in f.keys() if ".mlp.experts." in k}  # noqa: SIM118
    assert layers == set(range(LAYERS))
    config = json.loads((kept / "adapter_config.json").read_text())
    assert sorted(config["target_parameters"]) == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]

    assert len(losses(kept)) == 4
    rel = 1e-4 if device == "cpu" else 2e-4  # the kept layer on cuBLAS (fp32) against the CPU operator
    assert losses(kept) == pytest.approx(losses(everywhere), rel=rel)
