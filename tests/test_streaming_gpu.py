"""Streaming on a real GPU: bf16 weights, grouped GEMMs, pinned host memory, side-stream copies."""

from __future__ import annotations

import pytest
import torch
from test_streaming import SPLITS, ToyMoE, lora_params, train

from kt_core import KTExperts
from kt_core.streaming import enable_streaming

pytestmark = pytest.mark.gpu


def to_bf16_experts(model: ToyMoE) -> ToyMoE:
    """Same model with bf16 expert weights (the routers and head stay fp32), on the GPU."""
    for i, m in enumerate(model.experts):
        bf = KTExperts.from_tensors(
            m.gate_up_proj.to(torch.bfloat16), m.down_proj.to(torch.bfloat16), lora_rank=m.lora.rank,
            lora_alpha=m.lora.alpha,
        )  # fmt: skip
        with torch.no_grad():
            for dst, src in zip(bf.lora.factors(), m.lora.factors(), strict=True):
                dst.copy_(src)
        model.experts[i] = bf
    return model.cuda()


def train_gpu(model, steps=4):
    return train(model, steps, lr=0.02, tokens=64, device="cuda")


@pytest.mark.parametrize("split", ["all-streamed", "pieces", "half-streamed", "resident", "int8"])
def test_bf16_loss_curve_matches_cpu_only(split):
    ref = train_gpu(to_bf16_experts(ToyMoE(3)))
    model = to_bf16_experts(ToyMoE(3))
    kw = dict(mode="gpu", quantize="int8") if split == "int8" else dict(SPLITS.get(split, SPLITS["all-streamed"]))
    if split == "pieces":  # 40-slot pieces, two of the recomputation's kept for the backward (bf16: 2 bytes)
        kw["keep_bytes"] = 2 * 40 * (32 + 3 * 16) * 2
    if split == "half-streamed":
        kw["expert_gpu_memory"] //= 2  # bf16 experts take half the bytes of the fp32 figure
    rt = enable_streaming(model, device="cuda", **kw)
    if split == "pieces":
        rt.piece_rows = 40
    try:
        assert rt.store.pin_ok and all(t.is_pinned() for t in rt.store.pinned)
        losses = train_gpu(model)
        tol = 5e-2 if split == "int8" else 2e-2
        assert losses == pytest.approx(ref, rel=tol)
        assert rt.history[-1]["gpu_s"] > 0
        if split == "resident":  # every expert fits: after the first step nothing crosses PCIe
            assert rt.history[-1]["resident_per_layer"] == [8, 8, 8] and rt.history[-1]["pcie_gb"] == 0
        else:
            assert rt.history[-1]["pcie_gb"] > 0
    finally:
        rt.disable()


def test_gradients_bf16_one_pass():
    ref, ours = to_bf16_experts(ToyMoE(2, seed=3)), to_bf16_experts(ToyMoE(2, seed=3))
    rt = enable_streaming(ours, device="cuda", mode="gpu", expert_gpu_memory=4 * 3 * 32 * 16 * 2 * 2)
    x = torch.randn(96, 32, device="cuda")
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref(xr).backward()
    try:
        ours(xo).backward()
    finally:
        rt.disable()
    rel = ((xo.grad - xr.grad).norm() / xr.grad.norm()).item()
    assert rel < 2e-2
    for a, b in zip(lora_params(ours), lora_params(ref), strict=True):
        assert ((a.grad - b.grad).norm() / b.grad.norm().clamp_min(1e-12)).item() < 2e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_steps_match_plain_torch(monkeypatch, dtype):
    """The Triton kernels of the device path against the plain-torch steps, odd sizes, one-row pieces."""
    from kt_core.streaming import fused

    if fused.triton is None:
        pytest.skip("Triton is not installed")
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype).cuda()

    def both(fn, *args, **kwargs):
        monkeypatch.setenv("KT_STREAM_TRITON", "1")
        fast = fn(*args, **kwargs)
        monkeypatch.setenv("KT_STREAM_TRITON", "0")
        return fast, fn(*args, **kwargs)

    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1.6e-2)
    for S, I in [(1, 5), (37, 1408), (300, 768)]:
        gu, dh, add_gu, add_dh = rand(S, 2 * I), rand(S, I), rand(S, 2 * I), rand(S, I)
        torch.testing.assert_close(*both(fused.silu_mul, gu), **tol)
        torch.testing.assert_close(*(d for d, _ in both(fused.swiglu_backward, dh, gu)), **tol)
        torch.testing.assert_close(*(d for d, _ in both(fused.swiglu_backward, dh, gu, add_dh)), **tol)
        w = torch.rand(S, generator=gen).cuda()  # the rows' routing weights: scaled rows and <dh (+ add), h>
        for add in (None, add_dh):
            (fast, fast_dots), (plain, plain_dots) = both(fused.swiglu_backward, dh, gu, add, w=w)
            torch.testing.assert_close(fast, plain, **tol)
            # bf16: h may round the other way where the two sigmoids differ in the last bit (one ulp of h, times dh)
            dots_tol = dict(rtol=1e-4, atol=1e-3) if dtype == torch.float32 else dict(rtol=2e-3, atol=0.1)
            torch.testing.assert_close(fast_dots, plain_dots, **dots_tol)
        # the LoRA term added in the pass: the sum rounded to gu's dtype, written into gu only when asked
        for into in (False, True):
            fast_gu, plain_gu = gu.clone(), gu.clone()
            monkeypatch.setenv("KT_STREAM_TRITON", "1")
            fast = fused.silu_mul(fast_gu, add_gu, sum_into_gu=into)
            monkeypatch.setenv("KT_STREAM_TRITON", "0")
            plain = fused.silu_mul(plain_gu, add_gu, sum_into_gu=into)
            torch.testing.assert_close(fast, plain, **tol)
            assert torch.equal(fast_gu, plain_gu) and torch.equal(fast_gu, gu + add_gu if into else gu)
    T, K, H = 33, 6, 2048
    order = torch.randperm(T * K, generator=gen).cuda()
    inv = torch.empty_like(order)
    inv[order] = torch.arange(T * K, device="cuda")
    tok, w = order // K, torch.rand(T * K, generator=gen).cuda()
    rows = rand(T * K, H)
    for a, b in [(0, T * K), (1, 2), (50, 120)]:
        for weighted in (True, False):
            weights = dict(w_tok=w, w_sorted=w[order][a:b]) if weighted else {}
            kw = dict(inv=inv, tok=tok[a:b], **weights)
            fast, plain = torch.zeros(T, H, device="cuda"), torch.zeros(T, H, device="cuda")
            monkeypatch.setenv("KT_STREAM_TRITON", "1")
            fused.combine(fast, rows[a:b], a, **kw)
            monkeypatch.setenv("KT_STREAM_TRITON", "0")
            fused.combine(plain, rows[a:b], a, **kw)
            torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("split", ["all-streamed", "half-streamed"])
def test_expert_lora_on_the_gpu_trains_as_in_host_memory(split):
    """Factors on the GPU (gradients, clipping and Adam there; the CPU share reads host copies) against factors in
    host memory: the same loss curve and factors; the same Parameter objects throughout, back on the host after."""
    kw = dict(SPLITS[split])
    if split == "half-streamed":
        kw["expert_gpu_memory"] //= 2  # bf16 experts take half the bytes of the fp32 figure
    runs = {}
    for on_gpu in (False, True):
        model = to_bf16_experts(ToyMoE(3))
        factors = lora_params(model)
        rt = enable_streaming(model, device="cuda", expert_lora_on_gpu=on_gpu, **kw)
        try:
            assert {f.device.type for f in factors} == {"cuda" if on_gpu else "cpu"}
            losses = train_gpu(model)
            assert lora_params(model)[0] is factors[0] and factors[0].grad is None  # zero_grad: set to None
            share = rt.history[-1]["cpu_slot_share"]
            assert (0 < share < 1) if split == "half-streamed" else share == 0  # the CPU share reads host copies
            runs[on_gpu] = losses, [f.detach().cpu().clone() for f in factors]
        finally:
            rt.disable()
        assert {f.device.type for f in factors} == {"cpu"}
    (host_losses, host_factors), (gpu_losses, gpu_factors) = runs[False], runs[True]
    assert gpu_losses == pytest.approx(host_losses, rel=1e-3)
    for a, b in zip(gpu_factors, host_factors, strict=True):
        assert ((a - b).norm() / b.norm()).item() < 1e-3  # Adam moves a near-zero element either way


def test_factors_on_the_gpu_upload_without_a_host_round_trip():
    """Device copies of factors already on the GPU are device-to-device: no host copy, no synchronisation."""
    from kt_core.experts.staging import to_device, upload_factors

    factors = [torch.randn(4, 8, 16, device="cuda") for _ in range(4)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        copies = upload_factors(factors, torch.bfloat16, torch.device("cuda", torch.cuda.current_device()))
        same = to_device(factors[0], factors[0].device)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert same is factors[0]
    for f, c in zip(factors, copies, strict=True):
        assert c.is_cuda and c.dtype == torch.bfloat16 and c.data_ptr() != f.data_ptr()
        torch.testing.assert_close(c.float(), f, rtol=1e-2, atol=1e-2)
