"""Expert LoRA is exact whichever side computes an expert and whatever updates the factors.

The same toy MoE (tests/test_streaming.py's ToyMoE: routers, KTExperts with expert LoRA, gradient
checkpointing) trains under every optimizer flavour a user may pick (torch's fused / foreach / for-loop
AdamW, SGD), with every split of the experts (all on the CPU, all streamed, half streamed, resident, int8
streamed), with gradient accumulation, and with the factors edited in place or loaded between steps. The
loss curves must equal the CPU-only run. Fused optimizers update parameters without bumping their version
counters: a device copy of the factors that trusted those counters trained with stale factors silently.

Streaming runs with the CPU standing in for the GPU (device="cpu"): the split, the staging, the device copy
of the factors and the gradient return are the same code as on a GPU.
"""

from __future__ import annotations

import pytest
import torch

from kt_core.streaming import enable_streaming
from tests.test_streaming import SPLITS, ToyMoE, lora_params

STEPS = 6
LR = 0.05


def _optimizer(name: str, params):
    kinds = {
        "adamw-fused": lambda: torch.optim.AdamW(params, lr=LR, fused=True),
        "adamw-foreach": lambda: torch.optim.AdamW(params, lr=LR, foreach=True),
        "adamw-for-loop": lambda: torch.optim.AdamW(params, lr=LR, foreach=False),
        "sgd-fused": lambda: torch.optim.SGD(params, lr=LR * 4, momentum=0.9, fused=True),
        "sgd": lambda: torch.optim.SGD(params, lr=LR * 4, momentum=0.9),
    }
    return kinds[name]()


def _train(model, optimizer: str, *, accumulate: int = 1, edit_at: int | None = None, steps: int = STEPS):
    """Loss of every step; `edit_at`: halve every expert-LoRA factor in place (no version bump) before that step."""
    params = lora_params(model) + list(model.routers.parameters())
    opt = _optimizer(optimizer, params)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for step in range(steps):
        if step == edit_at:
            for p in lora_params(model):
                p.data.mul_(0.5)  # as user code that edits `.data` would: the version counter does not move
        total = 0.0
        for _ in range(accumulate):
            loss = model(torch.randn(24, 32, generator=gen)) / accumulate
            loss.backward()
            total += loss.item()
        opt.step()
        opt.zero_grad()
        losses.append(total)
    return losses


@pytest.fixture(scope="module")
def cpu_runs():
    """{(optimizer, accumulate, edit_at): losses} of the all-CPU model, computed on demand."""
    cache = {}

    def run(optimizer, accumulate=1, edit_at=None):
        key = (optimizer, accumulate, edit_at)
        if key not in cache:
            cache[key] = _train(ToyMoE(3), optimizer, accumulate=accumulate, edit_at=edit_at)
        return cache[key]

    return run


def _assert_same_curve(losses, ref):
    # fp32 sums in another order on each side, amplified by the optimizer over the steps.
    assert losses == pytest.approx(ref, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("split", ["all-streamed", "half-streamed", "resident", "planner"])
@pytest.mark.parametrize("optimizer", ["adamw-fused", "adamw-foreach", "adamw-for-loop", "sgd-fused", "sgd"])
def test_every_optimizer_and_split_gives_the_cpu_loss_curve(optimizer, split, cpu_runs):
    model = ToyMoE(3)
    rt = enable_streaming(model, device="cpu", **SPLITS[split])
    losses = _train(model, optimizer)
    _assert_same_curve(losses, cpu_runs(optimizer))
    # The expert LoRA moved the loss: a run that froze it (stale device factors) would not match.
    frozen = ToyMoE(3)
    for p in lora_params(frozen):
        p.requires_grad_(False)
    assert abs(_train(frozen, optimizer)[-1] - losses[-1]) > 1e-3
    rt.disable()


@pytest.mark.parametrize("split", ["all-streamed", "half-streamed"])
def test_gradient_accumulation_and_in_place_edits(split, cpu_runs):
    model = ToyMoE(3)
    enable_streaming(model, device="cpu", **SPLITS[split])
    _assert_same_curve(_train(model, "adamw-fused", accumulate=2, edit_at=3), cpu_runs("adamw-fused", 2, 3))


def test_load_state_dict_between_steps_is_seen():
    """Factors loaded from a state dict (copied in place) reach the GPU side at the next call."""
    ref, ours = ToyMoE(3), ToyMoE(3)
    enable_streaming(ours, device="cpu", mode="gpu")
    _train(ours, "adamw-fused", steps=2)
    trained = ToyMoE(3)  # same frozen base weights, other factors
    _train(trained, "sgd", steps=3)
    ref.load_state_dict(trained.state_dict())
    ours.load_state_dict(trained.state_dict())
    x = torch.randn(24, 32, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-6)


def test_int8_streaming_trains_the_factors_it_computes_with():
    """int8-streamed weights change the numbers, so compare a fused optimizer with a for-loop one: the same
    curve unless the device side misses the fused updates."""
    curves = {}
    for optimizer in ("adamw-fused", "adamw-for-loop"):
        model = ToyMoE(3)
        enable_streaming(model, device="cpu", mode="gpu", quantize="int8")
        curves[optimizer] = _train(model, optimizer)
    _assert_same_curve(curves["adamw-fused"], curves["adamw-for-loop"])
