"""Bad inputs through the real `llamafactory-cli train` with `use_kt: true`: each fails fast and says why.

One table of YAML inputs and the words the error must contain, for settings that used to run silently
wrong (a negative chunk size, full fine-tuning of frozen experts, a rule file that matches nothing, a GPU
budget or GPU rules without a GPU) and for inputs that already failed well and must keep doing so. The
unit-level rows of the same checks are in tests/test_settings.py. Then one good run checks that the log
says what runs (kernel, chunking, the expert-time share) and that a broken checkpoint is named on resume.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.integration

if importlib.util.find_spec("llamafactory") is None:
    pytest.skip("needs LLaMA-Factory: make setup installs it", allow_module_level=True)

from test_llamafactory import REPO, run_cli  # noqa: E402
from test_llamafactory import train_config as lf_train_config  # noqa: E402

NO_CUDA = not torch.cuda.is_available()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    sys.path.insert(0, str(REPO / "examples" / "tiny_moe"))
    from make_checkpoint import write_checkpoint

    root = tmp_path_factory.mktemp("ckpt")
    return write_checkpoint(root / "qwen3_moe", REPO / "examples" / "tiny_moe" / "qwen3_moe", dtype=torch.float32)


@pytest.fixture(scope="module")
def dense_checkpoint(tmp_path_factory) -> Path:
    """A tiny dense (non-MoE) Qwen3 checkpoint with the MoE checkpoint's tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = tmp_path_factory.mktemp("dense") / "qwen3"
    config = AutoConfig.for_model(
        "qwen3", hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, vocab_size=256,
    )  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


def train_config(model: Path, out: Path, **extra) -> dict:
    """test_llamafactory's training YAML with `use_kt`, two steps; a key given as None is left out."""
    config = lf_train_config(model, out, use_kt=True, **{"max_steps": 2, **extra})
    return {k: v for k, v in config.items() if v is not None}


def run_train(config: dict, workdir: Path) -> subprocess.CompletedProcess:
    return run_cli("train", config, workdir, check=False)


RULES_MATCHING_NOTHING = "- match: {name: '^model\\.blocks\\.\\d+\\.moe$'}\n  replace: {class: kt}\n"
MALFORMED_RULES = "- match: {name: experts}\n  replace: [kt\n"
BAD_REGEX_RULES = "- match: {name: 'experts('}\n  replace: {class: kt}\n"
LEGACY_GPU_RULES = "examples/kt_optimize_rules/DeepSeek-V3-Chat-sft-amx-multi-gpu.yaml"  # the README's example

# id -> (extra YAML keys; a rule file's text when the row writes one; words the error must contain).
ROWS = {
    # used to run silently wrong
    "chunk_size -5": ({"chunk_size": -5}, None, ["chunk_size: got -5, expected a positive integer"]),
    "finetuning_type full": (
        {"finetuning_type": "full"},
        None,
        ["finetuning_type: got 'full' with use_kt: true, expected 'lora'", "frozen"],
    ),
    "rules matching nothing": (
        {"kt_optimize_rule": "rules.yaml"},
        RULES_MATCHING_NOTHING,
        ["rules.yaml: no rule puts a routed-experts module", "on the CPU operator"],
    ),
    "GPU budget without a GPU": (
        {"kt_expert_gpu_memory": "10GiB"},
        None,
        ["kt_expert_gpu_memory: got '10GiB', but this process sees no CUDA GPU"],
    ),
    "GPU rules without a GPU": (
        {"kt_optimize_rule": LEGACY_GPU_RULES},
        None,
        ["multi-gpu.yaml: rule", "no CUDA device"],
    ),
    "cpu_infer true": ({"cpu_infer": True}, None, ["cpu_infer: got True, expected a positive integer"]),
    # already failed well: keep it so
    "unknown kt_ key": ({"kt_cpu_thread": 4}, None, ["unknown kt-plugins key(s) kt_cpu_thread", "cpu_infer"]),
    "cpu_infer four": ({"cpu_infer": "four"}, None, ["cpu_infer: got 'four', expected a positive integer"]),
    "malformed rule file": ({"kt_optimize_rule": "rules.yaml"}, MALFORMED_RULES, ["rules.yaml: not valid YAML"]),
    "bad regex": ({"kt_optimize_rule": "rules.yaml"}, BAD_REGEX_RULES, ["rules.yaml: rule 0: match.name", "regex"]),
    "fp16": ({"fp16": True}, None, ["use_kt: the CPU experts run in bf16 or fp32", "bf16: true"]),
}
GPU_ROWS = {"GPU budget without a GPU", "GPU rules without a GPU"}


@pytest.mark.parametrize("row", list(ROWS))
def test_bad_input_fails_naming_it(row, checkpoint, tmp_path):
    if row in GPU_ROWS and not NO_CUDA:
        pytest.skip("checks the refusal on a machine without CUDA")
    extra, rule_text, words = ROWS[row]
    if rule_text is not None:
        (tmp_path / "rules.yaml").write_text(rule_text)
        extra = {**extra, "kt_optimize_rule": str(tmp_path / "rules.yaml")}
    proc = run_train(train_config(checkpoint, tmp_path / "out", **extra), tmp_path)
    assert proc.returncode != 0, proc.stdout[-2000:]
    missing = [w for w in words if w not in proc.stderr]
    assert not missing, f"{missing} not in:\n{proc.stderr[-4000:]}"


def test_non_moe_architecture_fails_naming_it(dense_checkpoint, tmp_path):
    proc = run_train(train_config(dense_checkpoint, tmp_path / "out"), tmp_path)
    assert proc.returncode != 0
    assert "qwen3" in proc.stderr and "UnknownArchitectureError" in proc.stderr, proc.stderr[-3000:]


def test_logs_say_what_runs_and_a_broken_checkpoint_is_named(checkpoint, tmp_path):
    """A good run: the takeover line names the kernel and the chunking that run, the built model's line
    agrees, the expert-time share is logged, and PEFT's "Unsupported layer type" warning is absent. Then an
    empty `checkpoint-4` (a save killed half-way) is refused by name, pointing at `checkpoint-2`."""
    from kt_core.kernels import resolve_kernel

    out = tmp_path / "out"
    config = train_config(checkpoint, out, max_steps=2, save_strategy="steps", save_steps=2)
    proc = run_train(config, tmp_path)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    kernel = resolve_kernel("auto")
    assert f"kernel {kernel} (kt_kernel: auto); no chunking" in log
    assert f"on the CPU operator: kernel {kernel}; chunking: whole batch per call" in log
    assert "Unsupported layer type" not in log
    state = json.loads((out / "trainer_state.json").read_text())
    shares = [e["kt_cpu_expert_share"] for e in state["log_history"] if "kt_cpu_expert_share" in e]
    assert len(shares) == 2 and all(0 < s <= 1 for s in shares)

    (out / "checkpoint-4").mkdir()  # LLaMA-Factory resumes from the newest checkpoint-N by itself
    proc = run_train({**config, "max_steps": 6}, tmp_path)
    assert proc.returncode != 0
    assert f"cannot resume from {out / 'checkpoint-4'}: the folder is empty" in proc.stderr
    assert f"the newest complete checkpoint before it is {out / 'checkpoint-2'}" in proc.stderr
