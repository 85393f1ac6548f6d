"""LLaMA-Factory's `use_kt: true` under FSDP2, on the CPU with 2 gloo ranks: the run LLaMA-Factory documents
(`accelerate launch --config_file <fsdp2 config> src/train.py cfg.yaml`, with examples/llamafactory/fsdp2_config.yaml)
and the one its YAML can ask for (`fsdp` / `fsdp_config` keys, under torchrun as FORCE_TORCHRUN=1 runs it) give the
loss curve of one process at the same global batch, expert LoRA on (lora_target: all).

The experts reach FSDP2's ignored params through LLaMA-Factory's Trainer: the plugin's training callback calls
kt_core.distributed.prepare_fsdp2 at the end of Trainer.__init__, as KTCallback does under the stock Trainer. Each
rank runs this file as LLaMA-Factory's src/train.py does (`run_exp()`), after giving the CPU run the accelerator state
a GPU run gets (tests.distributed_helpers.fsdp_on_the_cpu: accelerate 1.11 runs DDP instead of FSDP on the CPU).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
FSDP2_CONFIG = ROOT / "examples" / "llamafactory" / "fsdp2_config.yaml"
GLOBAL_BATCH = 2
STEPS = 4

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llamafactory") is None, reason="needs LLaMA-Factory")


def _checkpoint(folder: Path) -> Path:
    sys.path.insert(0, str(ROOT / "examples" / "tiny_moe"))
    try:
        from make_checkpoint import write_checkpoint
    finally:
        sys.path.pop(0)
    return write_checkpoint(folder, ROOT / "examples" / "tiny_moe" / "qwen3_moe", dtype=torch.float32)


def _config(model: Path, out: Path, *, ranks: int, **extra) -> dict:
    """integration_tests/test_llamafactory.py's training run with use_kt (expert LoRA on) at the same global batch,
    each rank on its share of the CPUs."""
    from integration_tests.test_llamafactory import train_config

    config = train_config(model, out, use_kt=True, max_steps=STEPS, per_device_train_batch_size=GLOBAL_BATCH // ranks,
                          plot_loss=False)  # fmt: skip
    del config["cpu_infer"]
    if ranks > 1:
        config["ddp_backend"] = "gloo"
    config.update(extra)
    return config


def _losses(out: Path) -> list[float]:
    records = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    for name in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    env.update(
        PYTHONPATH=str(ROOT),
        DISABLE_VERSION_CHECK="1",
        OMP_NUM_THREADS="1",
        PATH=f"{BIN}{os.pathsep}{env['PATH']}",
    )
    return env


def _train(config: dict, workdir: Path, name: str, launcher: list[str], script: str = __file__, **env) -> str:
    """Runs `script` (this file's __main__ or another rank script) under `launcher` on `config`; returns the log."""
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.run(
        [*launcher, script, str(path)], cwd=workdir, capture_output=True, text=True, timeout=600, env=_env() | env
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-8000:]
    return log


def _accelerate(ranks: int) -> list[str]:
    from tests.distributed_helpers import free_port

    return [
        str(BIN / "accelerate"),
        "launch",
        "--config_file",
        str(FSDP2_CONFIG),
        "--num_processes",
        str(ranks),
        "--main_process_port",
        str(free_port()),
        "--mixed_precision",
        "no",  # the tiny checkpoint is fp32, as the one-process run
    ]


def _torchrun(ranks: int) -> list[str]:
    from tests.distributed_helpers import free_port

    run = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks)]
    return [*run, "--master-port", str(free_port())]


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(out / "adapter_model.safetensors")


def _check_fsdp2_run(log: str, out: Path, one: tuple[Path, list[float], Path]) -> None:
    """The same loss curve, FSDP2 ran with the experts ignored, and the adapter saved through FSDP2's full state
    dict (torch.distributed.checkpoint) is the one-process adapter, expert LoRA included."""
    assert "FSDP2 leaves the 4 routed-experts modules unsharded (ignored_params)" in log
    assert "expert LoRA under FSDP2: the experts are unsharded" in log
    assert "expert LoRA on 4 layers" in log
    torch.testing.assert_close(torch.tensor(_losses(out)), torch.tensor(one[1]), rtol=1e-4, atol=0)
    ours, reference = _adapter(out), _adapter(one[2])
    assert ours.keys() == reference.keys()
    assert sum(".experts." in k for k in ours) == 16  # 4 layers x (gate_up, down) x (A, B)
    for key in ours:
        torch.testing.assert_close(ours[key], reference[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> tuple[Path, list[float], Path]:
    work = tmp_path_factory.mktemp("lf-fsdp")
    model = _checkpoint(work / "ckpt")
    _train(_config(model, work / "one", ranks=1), work, "one", [sys.executable])
    one = _losses(work / "one")
    assert len(one) == STEPS and one[-1] != one[0]  # the curve moves: the comparison means something
    return model, one, work / "one"


def test_accelerate_launch_fsdp2_matches_one_process(one_process, tmp_path):
    """accelerate launch with examples/llamafactory/fsdp2_config.yaml (fp32 here, as the tiny checkpoint)."""
    log = _train(_config(one_process[0], tmp_path / "two", ranks=2), tmp_path, "two", _accelerate(2))
    _check_fsdp2_run(log, tmp_path / "two", one_process)


def test_fsdp_keys_in_the_yaml_match_one_process(one_process, tmp_path):
    """`fsdp` / `fsdp_config` in LLaMA-Factory's YAML (its TrainingArguments), under torchrun. TrainingArguments
    pass no state_dict_type to accelerate, whose FSDP2 default (SHARDED_STATE_DICT) makes the Trainer's final
    save_model write no adapter: FSDP_STATE_DICT_TYPE=FULL_STATE_DICT asks for the whole adapter."""
    fsdp = {"fsdp": "full_shard", "fsdp_config": {"fsdp_version": 2}}
    config = _config(one_process[0], tmp_path / "two", ranks=2, **fsdp)
    log = _train(config, tmp_path, "two", _torchrun(2), FSDP_STATE_DICT_TYPE="FULL_STATE_DICT")
    _check_fsdp2_run(log, tmp_path / "two", one_process)


if __name__ == "__main__":  # each rank: LLaMA-Factory's src/train.py, on the CPU with the state of a GPU FSDP run
    import logging

    from tests.distributed_helpers import fsdp_on_the_cpu

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    logging.getLogger("kt_core.distributed").addHandler(handler)  # which engine ran the experts' LoRA
    logging.getLogger("kt_core.distributed").setLevel(logging.INFO)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        fsdp_on_the_cpu()
    from llamafactory.train.tuner import run_exp

    run_exp()
