"""LLaMA-Factory's `use_kt: true` under DeepSpeed ZeRO-2 and ZeRO-3, on the CPU with 2 gloo ranks: the run its YAML
asks for (`deepspeed: examples/llamafactory/deepspeed_z{2,3}_config.json`, under torchrun as FORCE_TORCHRUN=1 runs
it) gives the loss curve and the adapter of one process at the same global batch, expert LoRA on (lora_target: all),
with LLaMA-Factory's default gradient clipping (max_grad_norm 1.0, below this model's gradient norms).

The experts leave DeepSpeed through LLaMA-Factory's Trainer: the plugin's training callback calls
kt_core.distributed.prepare_deepspeed at the end of Trainer.__init__, as KTCallback does under the stock Trainer.
Each rank runs this file as LLaMA-Factory's src/train.py does (`run_exp()`), on DeepSpeed's CPU accelerator.
Skipped where LLaMA-Factory or DeepSpeed is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from tests.test_distributed_llamafactory_fsdp import _adapter, _config, _losses, _torchrun, _train, one_process

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "llamafactory"

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llamafactory") is None or importlib.util.find_spec("deepspeed") is None,
    reason="needs LLaMA-Factory and DeepSpeed",
)
__all__ = ["one_process"]  # the one-process run both tests compare with (a pytest fixture)


def _grad_norms(out: Path) -> list[float]:
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return [r["grad_norm"] for r in history if "grad_norm" in r]


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_in_the_yaml_matches_one_process(one_process, tmp_path, stage):
    model, losses, one_out = one_process
    config = _config(model, tmp_path / "two", ranks=2, deepspeed=str(EXAMPLES / f"deepspeed_z{stage}_config.json"))
    log = _train(config, tmp_path, "two", _torchrun(2), script=__file__, DS_ACCELERATOR="cpu")

    assert "DeepSpeed leaves the 4 routed-experts modules alone" in log
    assert "expert LoRA on 4 layers" in log
    out = tmp_path / "two"
    torch.testing.assert_close(torch.tensor(_losses(out)), torch.tensor(losses), rtol=1e-4, atol=0)
    # LLaMA-Factory's max_grad_norm (1.0) clips: the norm of every trainable parameter, the expert LoRA's included.
    norms, one_norms = _grad_norms(out), _grad_norms(one_out)
    assert min(one_norms) > 1.0, one_norms  # every step clips: the comparison covers clipping
    torch.testing.assert_close(torch.tensor(norms), torch.tensor(one_norms), rtol=1e-4, atol=0)
    ours, reference = _adapter(out), _adapter(one_out)  # ZeRO-3: the gathered save
    assert ours.keys() == reference.keys() and sum(".experts." in k for k in ours) == 16
    for key in ours:
        torch.testing.assert_close(ours[key], reference[key], rtol=1e-4, atol=1e-5, msg=key)


if __name__ == "__main__":  # each rank: LLaMA-Factory's src/train.py
    import logging

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    logging.getLogger("kt_core.distributed").addHandler(handler)  # which engine ran the experts' LoRA
    logging.getLogger("kt_core.distributed").setLevel(logging.INFO)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from llamafactory.train.tuner import run_exp

    run_exp()
