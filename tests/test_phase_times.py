"""Per-phase wall times of the packed kernels (kt_core.kernels.phase_times): off by default, complete when on."""

from __future__ import annotations

import pytest
import torch

from kt_core import KTExperts, kernels

pytestmark = pytest.mark.skipif(
    "avx512_bf16_packed" not in kernels.available_kernels(), reason="needs the AVX512-BF16 packed kernel"
)

E, H, I, K, T = 4, 96, 40, 2, 7


def train_step(lora_rank: int) -> None:
    gen = torch.Generator().manual_seed(0)
    layer = KTExperts.from_tensors(
        (torch.randn(E, 2 * I, H, generator=gen) * 0.1).to(torch.bfloat16),
        (torch.randn(E, H, I, generator=gen) * 0.1).to(torch.bfloat16),
        kernel="avx512_bf16_packed",
    )
    lora = tuple(t.detach() for t in layer.add_lora(lora_rank, 2 * lora_rank).factors()) if lora_rank else None
    x = torch.randn(T, H, generator=gen).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
    w = torch.softmax(torch.randn(T, K, generator=gen), dim=-1)
    _, cache = kernels.experts_forward(layer, x, ids, w, lora=lora, save_for_backward=True)
    dy = torch.randn(T, H, generator=gen).to(torch.bfloat16)
    kernels.experts_backward(layer, x, ids, w, dy, cache=cache, lora=lora)


@pytest.fixture
def recording():
    kernels.phase_times(reset=True)
    kernels.record_phase_times(True)
    yield
    kernels.record_phase_times(False)
    kernels.phase_times(reset=True)


def test_off_by_default_records_nothing():
    kernels.record_phase_times(False)
    kernels.phase_times(reset=True)
    train_step(4)
    assert kernels.phase_times() == {}


def test_every_phase_of_a_training_step_is_booked_once(recording):
    train_step(4)
    times = kernels.phase_times(reset=True)
    forward = [n for n in times if n.startswith("forward.")]
    backward = [n for n in times if n.startswith("backward.")]
    assert forward[0] == "forward.gather x" and forward[-1] == "forward.combine" and len(forward) == 6
    assert backward[0].startswith("backward.gather dy") and backward[-1] == "backward.lora factor grads"
    assert all(calls == 1 and seconds >= 0.0 for seconds, calls in times.values())
    assert kernels.phase_times() == {}  # reset after reading


def test_without_lora_the_factor_gradients_are_not_booked(recording):
    train_step(0)
    assert "backward.lora factor grads" not in kernels.phase_times()
