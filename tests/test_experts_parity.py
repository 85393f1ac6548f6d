"""KTExperts against Hugging Face's own eager experts modules: forward, dx and d(routing weights)."""

from __future__ import annotations

import pytest
import torch
from hf_experts import FAMILIES, HIDDEN, NUM_EXPERTS, make_hf_experts, random_routing

from kt_core import KTExperts, available_kernels

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
KERNELS = available_kernels()


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm().clamp_min(1e-30)).item()


def run(module, x, ids, w, dy):
    """Output, dx and dw of one forward + backward."""
    x = x.clone().requires_grad_()
    w = w.clone().requires_grad_()
    y = module(x, ids, w)
    y.backward(dy)
    return y.detach(), x.grad, w.grad


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("T", [1, 13, 300])
def test_matches_hf_experts(family, dtype, kernel, T):
    hf = make_hf_experts(family, dtype, seed=T)
    ours = KTExperts.from_module(hf, kernel=kernel)
    K = 3
    # Only 5 of the 7 experts are routed to: two experts receive no tokens.
    ids, w = random_routing(T, K, seed=T + 1, experts_used=NUM_EXPERTS - 2)
    gen = torch.Generator().manual_seed(T + 2)
    x = torch.randn(T, HIDDEN, generator=gen).to(dtype)
    w = w.to(dtype)
    dy = torch.randn(T, HIDDEN, generator=gen).to(dtype)

    y_ref, dx_ref, dw_ref = run(hf, x, ids, w, dy)
    y, dx, dw = run(ours, x, ids, w, dy)

    tol = TOLERANCE[dtype]
    assert y.dtype == dtype and dx.dtype == dtype and dw.dtype == dtype
    assert rel_error(y, y_ref) < tol
    assert rel_error(dx, dx_ref) < tol
    assert rel_error(dw, dw_ref) < tol


@pytest.mark.parametrize("kernel", KERNELS)
def test_masked_slots_contribute_nothing(kernel):
    """Slots of -1 (experts owned elsewhere, as SGLang masks them) equal a zero routing weight."""
    hf = make_hf_experts("qwen3_moe", torch.float32)
    ours = KTExperts.from_module(hf, kernel=kernel)
    T, K = 9, 3
    ids, w = random_routing(T, K, seed=5)
    masked = ids.clone()
    masked[::2, 1] = -1
    masked[3] = -1  # a token with every slot masked gets zeros
    w_zeroed = w.clone()
    w_zeroed[masked == -1] = 0
    x = torch.randn(T, HIDDEN)
    dy = torch.randn(T, HIDDEN)

    y_ref, dx_ref, _ = run(hf, x, ids, w_zeroed, dy)
    y, dx, dw = run(ours, x, masked, w, dy)

    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-6)
    assert torch.all(dw[masked == -1] == 0)
    assert torch.all(y[3] == 0)


def test_kernels_agree_and_threads_do_not_change_results():
    hf = make_hf_experts("deepseek_v3", torch.float32)
    ids, w = random_routing(64, 4, seed=3)
    x = torch.randn(64, HIDDEN)
    results = []
    for cpu_infer in (1, 2, 3):
        ours = KTExperts.from_module(hf, kernel=KERNELS[0], cpu_infer=cpu_infer)
        results.append(ours(x, ids, w))
    # Each token sums its experts in slot order whatever the thread count: bitwise equal.
    assert all(torch.equal(results[0], r) for r in results[1:])
    outputs = [KTExperts.from_module(hf, kernel=k)(x, ids, w) for k in KERNELS]
    for out in outputs[1:]:
        torch.testing.assert_close(out, outputs[0], rtol=1e-5, atol=1e-6)


def test_empty_batch():
    ours = KTExperts.from_module(make_hf_experts("mixtral", torch.float32))
    x = torch.zeros(0, HIDDEN, requires_grad=True)
    ids = torch.zeros(0, 2, dtype=torch.int64)
    w = torch.zeros(0, 2, requires_grad=True)
    y = ours(x, ids, w)
    y.sum().backward()
    assert y.shape == (0, HIDDEN) and x.grad.shape == (0, HIDDEN)
