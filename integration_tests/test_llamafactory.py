"""Stock LLaMA-Factory (0.9.5) with `use_kt: true`, driven through its real CLI in subprocesses.

The `.pth` boot line of the installed kt-plugins does the takeover; nothing here imports our plugin into
LLaMA-Factory by hand. Tiny random-init fp32 checkpoints (examples/tiny_moe) keep every run under a minute.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml

pytestmark = pytest.mark.integration

if importlib.util.find_spec("llamafactory") is None:
    pytest.skip("needs LLaMA-Factory: make setup installs it", allow_module_level=True)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples" / "tiny_moe"))
from make_checkpoint import write_checkpoint  # noqa: E402

CLI = str(Path(sys.executable).with_name("llamafactory-cli"))
DATA = REPO / "examples" / "llamafactory" / "data"
FAMILIES = {"qwen3_moe": "qwen3_nothink", "deepseek_v3": "qwen3_nothink"}


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return {f: write_checkpoint(root / f, REPO / "examples" / "tiny_moe" / f, dtype=torch.float32) for f in FAMILIES}


def run_cli(command: str, config: dict, workdir: Path, *, check: bool = True, env: dict | None = None):
    path = workdir / f"{command}-{len(list(workdir.glob('*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.run(
        [CLI, command, str(path)],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "USE_KT": "1", "DISABLE_VERSION_CHECK": "1", **(env or {})},
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"llamafactory-cli {command} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def train_config(model: Path, out: Path, *, use_kt: bool, **extra) -> dict:
    config = {
        "model_name_or_path": str(model),
        "stage": "sft",
        "do_train": True,
        "finetuning_type": "lora",
        "lora_rank": 4,
        "lora_alpha": 8,
        "lora_target": "all",
        "dataset": "kt_identity",
        "dataset_dir": str(DATA),
        "template": FAMILIES["qwen3_moe"],
        "cutoff_len": 64,
        "output_dir": str(out),
        "logging_steps": 1,
        "max_steps": 4,
        "per_device_train_batch_size": 2,
        "learning_rate": 1.0e-3,
        "report_to": "none",
        "seed": 0,
        "plot_loss": True,
        "save_strategy": "no",
    }
    if use_kt:
        config.update({"use_kt": True, "cpu_infer": 2})
    config.update(extra)
    return config


def losses(out: Path) -> list[float]:
    lines = (out / "trainer_log.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if "loss" in json.loads(line)]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_train_matches_stock_llamafactory(family, checkpoints, tmp_path):
    """Same LoRA targets (expert LoRA off): the loss curve equals LLaMA-Factory's own run."""
    ours, stock = tmp_path / "ours", tmp_path / "stock"
    # chunk_size 5 splits every CPU-experts call into pieces of 5 tokens: the result must not change.
    ours_config = train_config(checkpoints[family], ours, use_kt=True, kt_expert_lora=False, chunk_size=5)
    run_cli("train", ours_config, tmp_path)
    run_cli("train", train_config(checkpoints[family], stock, use_kt=False), tmp_path)
    assert len(losses(ours)) == 4
    assert losses(ours) == pytest.approx(losses(stock), rel=1e-4)
    assert (ours / "training_loss.png").is_file()


def test_bf16_run_on_a_packed_kernel_frees_the_weights_once_packed(checkpoints, tmp_path):
    """bf16 with a packed kernel: the routed experts' weights are freed once packed at train start (host RAM holds
    the packed copy only) and the loss curve equals that of `kt_keep_host_weights: true`, bit for bit."""
    freed, kept = tmp_path / "freed", tmp_path / "kept"
    extra = {"bf16": True, "use_cpu": True, "kt_kernel": "amx_bf16"}
    env = {"KT_AMX_EMULATE": "1"}  # amx_bf16 on its scalar model where the CPU has no AMX
    proc = run_cli("train", train_config(checkpoints["qwen3_moe"], freed, use_kt=True, **extra), tmp_path, env=env)
    assert "weights released once packed" in proc.stdout + proc.stderr
    config = train_config(checkpoints["qwen3_moe"], kept, use_kt=True, kt_keep_host_weights=True, **extra)
    proc = run_cli("train", config, tmp_path, env=env)
    assert "weights released once packed" not in proc.stdout + proc.stderr
    assert len(losses(freed)) == 4 and losses(freed) == losses(kept)


def dpo_config(model: Path, out: Path, *, use_kt: bool, **extra) -> dict:
    """DPO with LoRA and no separate reference model: LLaMA-Factory's reference pass runs the policy inside
    `model.disable_adapter()`, which must switch the expert LoRA off as well."""
    return train_config(model, out, use_kt=use_kt, stage="dpo", dataset="kt_dpo", pref_beta=0.1, **extra)


def test_dpo_matches_stock_llamafactory(checkpoints, tmp_path):
    """stage: dpo (expert LoRA off, as stock LLaMA-Factory cannot target the experts): the same loss curve."""
    ours, stock = tmp_path / "ours", tmp_path / "stock"
    run_cli("train", dpo_config(checkpoints["qwen3_moe"], ours, use_kt=True, kt_expert_lora=False), tmp_path)
    run_cli("train", dpo_config(checkpoints["qwen3_moe"], stock, use_kt=False), tmp_path)
    assert len(losses(ours)) == 4
    assert losses(ours) == pytest.approx(losses(stock), rel=1e-4)


def test_dpo_with_expert_lora_starts_at_log_2_and_learns(checkpoints, tmp_path):
    """With expert LoRA the policy equals the reference at step 1 (B = 0): the sigmoid loss is ln 2 there, and
    the preference margin grows as the adapter (experts included) trains against the adapter-free reference."""
    out = tmp_path / "ours"
    config = dpo_config(checkpoints["qwen3_moe"], out, use_kt=True, max_steps=6, learning_rate=5.0e-3)
    run_cli("train", config, tmp_path)
    records = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    loss = [r["loss"] for r in records if "loss" in r]
    assert len(loss) == 6 and loss[0] == pytest.approx(0.693147, abs=1e-4)
    assert loss[-1] < loss[0]


@pytest.fixture(scope="session")
def trained_adapter(checkpoints, tmp_path_factory) -> Path:
    """A tiny Qwen3-MoE adapter with expert LoRA (lora_target: all)."""
    work = tmp_path_factory.mktemp("adapter")
    run_cli("train", train_config(checkpoints["qwen3_moe"], work / "out", use_kt=True, max_steps=6), work)
    return work / "out"


def test_adapter_is_stock_peft(trained_adapter, checkpoints):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = json.loads((trained_adapter / "adapter_config.json").read_text())
    assert sorted(config["target_parameters"]) == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    base = AutoModelForCausalLM.from_pretrained(checkpoints["qwen3_moe"], dtype=torch.float32)
    ids = torch.arange(3, 40)[None]
    before = base(ids).logits
    model = PeftModel.from_pretrained(base, trained_adapter)
    after = model(ids).logits
    assert not torch.allclose(before, after)  # the expert and attention LoRA were trained and loaded
    expert_keys = [k for k in model.state_dict() if "experts" in k and "lora_B" in k]
    assert expert_keys and all(model.state_dict()[k].abs().sum() > 0 for k in expert_keys)


def test_export_merges_expert_lora(trained_adapter, checkpoints, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    export_dir = tmp_path / "merged"
    config = {
        "model_name_or_path": str(checkpoints["qwen3_moe"]),
        "adapter_name_or_path": str(trained_adapter),
        "template": FAMILIES["qwen3_moe"],
        "finetuning_type": "lora",
        "export_dir": str(export_dir),
        "use_kt": True,
    }
    run_cli("export", config, tmp_path)
    merged = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(checkpoints["qwen3_moe"], dtype=torch.float32)
    reference = PeftModel.from_pretrained(base, trained_adapter).merge_and_unload()
    ids = torch.arange(3, 40)[None]
    # The export is written in the checkpoint's dtype (fp32 here): equal to stock PEFT's merge.
    torch.testing.assert_close(merged(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# packed-bf16: a bf16 model on a packed kernel, whose routed experts' weights are freed at their first forward
# (inference holds them once in host RAM; KT_AMX_EMULATE runs amx_bf16 on any CPU).
@pytest.mark.parametrize("packed", [False, True], ids=["default", "packed-bf16"])
def test_api_answers_chat_and_stream(trained_adapter, checkpoints, tmp_path, packed):
    port = _free_port()
    config = {
        "model_name_or_path": str(checkpoints["qwen3_moe"]),
        "adapter_name_or_path": str(trained_adapter),
        "template": FAMILIES["qwen3_moe"],
        "infer_backend": "ktransformers",
        "use_kt": True,
        "kt_maxlen": 16,
    }
    if packed:  # a bf16 checkpoint: the bf16 packed format leaves fp32 weights unpacked (it would round them)
        bf16 = write_checkpoint(tmp_path / "bf16", REPO / "examples" / "tiny_moe" / "qwen3_moe", dtype=torch.bfloat16)
        config.update(model_name_or_path=str(bf16), infer_dtype="bfloat16", kt_kernel="amx_bf16")
    path = tmp_path / "api.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "API_PORT": str(port), "API_HOST": "127.0.0.1", "PYTHONUNBUFFERED": "1"}  # (log read below)
    if packed:
        env["KT_AMX_EMULATE"] = "1"
    server = subprocess.Popen(
        [CLI, "api", str(path)], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        body = {"model": "tiny", "messages": [{"role": "user", "content": "Who are you?"}], "max_tokens": 8}
        for _ in range(120):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2):
                    break
            except OSError:
                assert server.poll() is None, server.stdout.read().decode()[-4000:]
                time.sleep(1)
        request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = json.loads(response.read())
        assert answer["choices"][0]["message"]["role"] == "assistant"
        assert answer["usage"]["completion_tokens"] > 0
        stream = urllib.request.Request(
            url, json.dumps({**body, "stream": True}).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(stream, timeout=120) as response:
            events = [line for line in response.read().decode().splitlines() if line.startswith("data: ")]
        assert len(events) >= 3 and events[-1] == "data: [DONE]"
    finally:
        server.terminate()
        server.wait(timeout=30)
    freed = server.stdout.read().decode().count("weights freed once packed (forward only)")
    assert freed == (4 if packed else 0)  # each of the 4 MoE layers once, at its first forward


def test_unknown_kt_key_is_refused(checkpoints, tmp_path):
    proc = run_cli(
        "train",
        train_config(checkpoints["qwen3_moe"], tmp_path / "o", use_kt=True, kt_cpu_thread=4),
        tmp_path,
        check=False,
    )
    assert proc.returncode != 0
    assert "unknown kt-plugins key(s) kt_cpu_thread" in proc.stderr and "cpu_infer" in proc.stderr


def test_missing_model_path_is_refused(tmp_path):
    proc = run_cli("train", train_config(tmp_path / "nope", tmp_path / "o", use_kt=True), tmp_path, check=False)
    assert proc.returncode != 0
    assert "model_name_or_path" in proc.stderr and "does not exist" in proc.stderr


def test_adapter_of_another_model_is_refused(trained_adapter, checkpoints, tmp_path):
    config = {
        "model_name_or_path": str(checkpoints["deepseek_v3"]),
        "adapter_name_or_path": str(trained_adapter),
        "template": FAMILIES["deepseek_v3"],
        "finetuning_type": "lora",
        "export_dir": str(tmp_path / "merged"),
        "use_kt": True,
    }
    proc = run_cli("export", config, tmp_path, check=False)
    assert proc.returncode != 0
    assert "this adapter was trained for another model" in proc.stderr


def test_rule_file_relative_to_the_yaml(checkpoints, tmp_path):
    """kt_optimize_rule resolves against the YAML's folder (here: a copy of our CPU-only rules)."""
    rules = tmp_path / "my_rules.yaml"
    rules.write_text((REPO / "rules" / "cpu-only.yaml").read_text())
    elsewhere = tmp_path / "run"
    elsewhere.mkdir()
    config = train_config(
        checkpoints["qwen3_moe"], tmp_path / "o", use_kt=True, kt_optimize_rule="my_rules.yaml", max_steps=1
    )
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.run(
        [CLI, "train", str(path)],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "USE_KT": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"placement rules: {rules}" in proc.stdout + proc.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="streaming needs a CUDA GPU")
def test_streaming_budget_keeps_the_loss_curve(checkpoints, tmp_path):
    """kt_expert_gpu_memory turns on the CPU / GPU split of each MoE layer; results must not change."""
    ours, stock = tmp_path / "ours", tmp_path / "stock"
    streamed = train_config(
        checkpoints["qwen3_moe"],
        ours,
        use_kt=True,
        kt_expert_lora=False,
        kt_expert_gpu_memory="64MiB",
        kt_stream_keep_bytes="64KiB",
    )
    proc = run_cli("train", streamed, tmp_path)
    run_cli("train", train_config(checkpoints["qwen3_moe"], stock, use_kt=False), tmp_path)
    assert "expert streaming on" in proc.stdout + proc.stderr
    assert "64KiB of recomputed expert intermediates kept" in proc.stdout + proc.stderr
    assert losses(ours) == pytest.approx(losses(stock), rel=2e-4)
