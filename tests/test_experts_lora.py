"""Expert-LoRA gradients of the C++ backward against torch autograd on the plain-torch reference."""

from __future__ import annotations

import pytest
import torch
from hf_experts import HIDDEN, make_hf_experts, random_routing
from test_experts_parity import TOLERANCE, rel_error

from kt_core import KTExperts, available_kernels, experts_reference


def randomize_lora(module: KTExperts, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.lora.factors():  # B is zero at init: give it values so every gradient is non-trivial
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


@pytest.mark.parametrize("kernel", available_kernels())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("T", [1, 29])
def test_lora_gradients_match_autograd(kernel, dtype, T):
    hf = make_hf_experts("qwen3_moe", dtype, seed=T)
    ours = KTExperts.from_module(hf, kernel=kernel, lora_rank=3, lora_alpha=7)
    randomize_lora(ours, seed=T)
    ids, w = random_routing(T, 2, seed=T, experts_used=5)  # experts 5 and 6 get no tokens
    x = torch.randn(T, HIDDEN).to(dtype).requires_grad_()
    w = w.to(dtype).requires_grad_()
    dy = torch.randn(T, HIDDEN).to(dtype)

    y = ours(x, ids, w)
    y.backward(dy)

    x_ref = x.detach().float().requires_grad_()
    w_ref = w.detach().float().requires_grad_()
    factors = [p.detach().clone().requires_grad_() for p in ours.lora.factors()]
    y_ref = experts_reference(x_ref, ids, w_ref, hf.gate_up_proj, hf.down_proj, factors, ours.lora.scaling)
    y_ref.backward(dy.float())

    tol = TOLERANCE[dtype]
    assert rel_error(y, y_ref) < tol
    assert rel_error(x.grad, x_ref.grad) < tol
    assert rel_error(w.grad, w_ref.grad) < tol
    for ours_p, ref_p in zip(ours.lora.factors(), factors, strict=True):
        assert rel_error(ours_p.grad, ref_p.grad) < tol
        assert torch.all(ours_p.grad[5:] == 0)  # experts without tokens get exactly zero


def test_fresh_lora_leaves_output_unchanged():
    hf = make_hf_experts("mixtral", torch.float32)
    plain = KTExperts.from_module(hf)
    with_lora = KTExperts.from_module(hf, lora_rank=4)
    ids, w = random_routing(11, 2, seed=0)
    x = torch.randn(11, HIDDEN)
    torch.testing.assert_close(with_lora(x, ids, w), plain(x, ids, w))


def test_lora_trains_in_place():
    """An optimizer step changes the host factors in place; the base weights stay frozen."""
    ours = KTExperts.from_module(make_hf_experts("qwen3_moe", torch.float32), lora_rank=2)
    base = ours.gate_up_proj.clone()
    before = ours.lora.gate_up_B.data_ptr()
    opt = torch.optim.SGD(ours.parameters(), lr=0.1)
    ids, w = random_routing(16, 2, seed=1)
    ours(torch.randn(16, HIDDEN), ids, w).square().sum().backward()
    opt.step()
    assert ours.lora.gate_up_B.abs().sum() > 0
    assert ours.lora.gate_up_B.data_ptr() == before
    assert torch.equal(ours.gate_up_proj, base) and ours.gate_up_proj.grad is None


def test_recycled_caches_of_live_graphs_stay_apart(monkeypatch):
    """Two forwards whose graphs are both alive get distinct cache buffers; a freed one is reused."""
    from kt_core.runtime.buffers import host_buffers

    if not host_buffers._enabled:
        pytest.skip("this torch lacks the storage use count the pool relies on")
    monkeypatch.setattr(host_buffers, "_min_bytes", 0)  # pool even these tiny caches
    hf = make_hf_experts("qwen3_moe", torch.bfloat16, seed=3)
    ours = KTExperts.from_module(hf, lora_rank=3, lora_alpha=7)
    randomize_lora(ours, seed=3)
    T = 17
    ids, w = random_routing(T, 2, seed=3)
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    xs = [torch.randn(T, HIDDEN, generator=g).bfloat16().requires_grad_() for g in gens]
    ys = [ours(x, ids, w) for x in xs]  # both caches saved for backward at once
    for y in reversed(ys):
        y.float().sum().backward()
    grads = [x.grad.clone() for x in xs]
    for x in xs:  # the same again, one graph at a time: buffers are now recycled
        x.grad = None
        ours(x, ids, w).float().sum().backward()
    for x, g in zip(xs, grads, strict=True):
        torch.testing.assert_close(x.grad, g, rtol=0, atol=0)
