"""Packed-weight variants (AMX, AVX512-BF16 packed, int8, int4) against the fp32 reference, and chunking."""

from __future__ import annotations

import pytest
import torch

from kt_core import KTExperts, kernels
from kt_core.reference import experts_reference

E, H, I, K = 5, 100, 70, 3  # odd sizes: every packed dimension is padded
AMX_EMULATED = "amx" not in "".join(kernels.available_kernels())  # no native AMX: its scalar model runs (any CPU)


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def make_layer(seed: int, **kwargs) -> KTExperts:
    gen = torch.Generator().manual_seed(seed)
    gate_up = (torch.randn(E, 2 * I, H, generator=gen) / H**0.5).to(torch.bfloat16)
    down = (torch.randn(E, H, I, generator=gen) / I**0.5).to(torch.bfloat16)
    return KTExperts.from_tensors(gate_up, down, **kwargs)


def batch(T: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
    w = torch.softmax(torch.randn(T, K, generator=gen), dim=-1)
    x = torch.randn(T, H, generator=gen).to(torch.bfloat16)
    return x, ids, w


def packed_kernels(quantized: bool, bits: int = 8) -> list[str]:
    if quantized:
        return [k for k in kernels.quantized_kernels() if k.endswith(f"int{bits}")]
    return [k for k in kernels.available_kernels() if "amx" in k or "packed" in k]


@pytest.fixture(params=[False, True], ids=["native", "amx-emulated"])
def amx_mode(request, monkeypatch):
    """Runs a test as is, and again with the AMX tile code on its scalar model (CPUs without AMX)."""
    if request.param:
        if not AMX_EMULATED:
            pytest.skip("AMX runs natively here")
        monkeypatch.setenv("KT_AMX_EMULATE", "1")
    return request.param


@pytest.mark.parametrize("T", [1, 3, 40, 300])
def test_packed_bf16_forward_backward(amx_mode, T):
    names = packed_kernels(quantized=False)
    if not names:
        pytest.skip("no packed bf16 variant runs here")
    x, ids, w = batch(T, seed=T)
    dy = torch.randn(T, H, generator=torch.Generator().manual_seed(9)).to(torch.bfloat16)
    for kernel in names:
        layer = make_layer(0, kernel=kernel, lora_rank=4)
        with torch.no_grad():
            layer.lora.gate_up_B.normal_(0, 0.05)
            layer.lora.down_B.normal_(0, 0.05)
        factors = [t.detach() for t in layer.lora.factors()]
        ref_x, ref_w = x.float().requires_grad_(), w.clone().requires_grad_()
        ref_f = [t.clone().requires_grad_() for t in factors]
        gu, dn = layer.gate_up_proj.float(), layer.down_proj.float()
        y_ref = experts_reference(ref_x, ids, ref_w, gu, dn, ref_f, layer.lora.scaling)
        y_ref.backward(dy.float())
        y, cache = kernels.experts_forward(layer, x, ids, w, lora=factors, save_for_backward=True)
        dx, dw, grads = kernels.experts_backward(layer, x, ids, w, dy, cache=cache, lora=factors)
        assert rel_error(y, y_ref) < 1e-2, kernel
        assert rel_error(dx, ref_x.grad) < 1e-2, kernel
        assert rel_error(dw, ref_w.grad) < 1e-2, kernel
        for g, r in zip(grads, ref_f, strict=True):
            assert rel_error(g, r.grad) < 1e-2, kernel


@pytest.mark.parametrize("T", [3, 300])
def test_bf16_cache_shrinks_the_pre_activations_and_matches_recomputation(amx_mode, T):
    """bf16 activations cache the gate_up pre-activations in 24 bits: [S, 2I] in 3/4 of the fp32 bytes, then xa, ha."""
    names = packed_kernels(quantized=False)
    if not names:
        pytest.skip("no packed bf16 variant runs here")
    x, ids, w = batch(T, seed=T + 1)
    dy = torch.randn(T, H, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    R = 4
    for kernel in names:
        layer = make_layer(1, kernel=kernel, lora_rank=R)
        with torch.no_grad():
            layer.lora.gate_up_B.normal_(0, 0.05)
            layer.lora.down_B.normal_(0, 0.05)
        factors = [t.detach() for t in layer.lora.factors()]
        _, cache = kernels.experts_forward(layer, x, ids, w, lora=factors, save_for_backward=True)
        assert cache.dtype == torch.float32 and cache.numel() == T * K * (I + (I + 1) // 2 + 2 * R)
        cached = kernels.experts_backward(layer, x, ids, w, dy, cache=cache, lora=factors)
        recomputed = kernels.experts_backward(layer, x, ids, w, dy, cache=None, lora=factors)
        # Without a cache the backward runs the same forward into the same layout: the same numbers.
        for a, b in zip(cached[:2] + cached[2], recomputed[:2] + recomputed[2], strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    fp32_layer = make_layer(1, kernel=names[0], lora_rank=R)
    _, fp32_cache = kernels.experts_forward(
        fp32_layer, x.float(), ids, w, lora=[t.detach() for t in fp32_layer.lora.factors()], save_for_backward=True
    )
    assert fp32_cache.numel() == T * K * (2 * I + 2 * R)  # fp32 activations keep fp32 pre-activations


@pytest.mark.parametrize("T", [1, 5, 64])
def test_int8_error_bounds(amx_mode, T):
    names = packed_kernels(quantized=True)
    if not names:
        pytest.skip("no int8 variant runs here")
    x, ids, w = batch(T, seed=T + 1)
    for kernel in names:
        layer = make_layer(1, kernel=kernel)
        gate_up_err, down_err = kernels.quantization_error(layer)
        # Per-output-channel int8 of Gaussian weights: about 0.7% (measured), never above 1%.
        assert 0 < gate_up_err < 1e-2 and 0 < down_err < 1e-2, kernel
        y, _ = kernels.experts_forward(layer, x, ids, w)
        y_ref = experts_reference(x.float(), ids, w, layer.gate_up_proj.float(), layer.down_proj.float(), None, 1.0)
        # Weights and per-row activations both int8: about 2% on these layers.
        assert rel_error(y, y_ref) < 4e-2, kernel


def test_int8_variants_agree(amx_mode):
    names = packed_kernels(quantized=True)
    if len(names) < 2:
        pytest.skip("one int8 variant here")
    x, ids, w = batch(50, seed=3)
    outs = [kernels.experts_forward(make_layer(2, kernel=k), x, ids, w)[0] for k in names]
    for out in outs[1:]:  # same integers, same scales: only the fp32 rounding of the epilogue differs
        assert rel_error(out, outs[0]) < 1e-2


@pytest.mark.parametrize("T", [1, 5, 64])
def test_int4_error_bounds(amx_mode, T):
    names = packed_kernels(quantized=True, bits=4)
    if not names:
        pytest.skip("no int4 variant runs here")
    x, ids, w = batch(T, seed=T + 1)
    for kernel in names:
        layer = make_layer(1, kernel=kernel)
        gate_up_err, down_err = kernels.quantization_error(layer)
        # Asymmetric int4 in groups of 128 inputs of Gaussian weights: about 10% (16 levels over the group's
        # range); the bound leaves room for the short last group of these padded shapes.
        assert 0.05 < gate_up_err < 0.14 and 0.05 < down_err < 0.14, kernel
        y, _ = kernels.experts_forward(layer, x, ids, w)
        y_ref = experts_reference(x.float(), ids, w, layer.gate_up_proj.float(), layer.down_proj.float(), None, 1.0)
        # Two int4 projections in sequence plus int8 activations: 16-19% measured here.
        assert rel_error(y, y_ref) < 0.25, kernel


def test_int4_matches_its_dequantized_weights(amx_mode):
    """The kernel computes exactly with the dequantized weights: only activation rounding (int8) remains."""
    names = packed_kernels(quantized=True, bits=4)
    if not names:
        pytest.skip("no int4 variant runs here")
    x, ids, w = batch(40, seed=7)
    for kernel in names:
        layer = make_layer(4, kernel=kernel)
        gu, dn = dequantized_int4(layer.gate_up_proj.float()), dequantized_int4(layer.down_proj.float())
        y, _ = kernels.experts_forward(layer, x, ids, w)
        y_ref = experts_reference(x.float(), ids, w, gu, dn, None, 1.0)
        # int8 activations (and the int8 re-quantization of h): about 1-2%.
        assert rel_error(y, y_ref) < 4e-2, kernel


def test_int4_variants_agree(amx_mode):
    names = packed_kernels(quantized=True, bits=4)
    if len(names) < 2:
        pytest.skip("one int4 variant here")
    x, ids, w = batch(50, seed=3)
    outs = [kernels.experts_forward(make_layer(2, kernel=k), x, ids, w)[0] for k in names]
    for out in outs[1:]:  # same integers, same scales: only the order of the fp32 group sums differs
        assert rel_error(out, outs[0]) < 1e-3


def dequantized_int4(w: torch.Tensor, group: int = 128) -> torch.Tensor:
    """The packing's int4 rule, in torch: per output and group of inputs, [min(w, 0), max(w, 0)] onto 0..15."""
    E_, N, K_ = w.shape
    pad = (-K_) % group
    wp = torch.nn.functional.pad(w, (0, pad)).view(E_, N, -1, group)
    valid = torch.nn.functional.pad(torch.ones(K_), (0, pad)).view(-1, group).bool()
    lo = torch.where(valid, wp, torch.zeros(())).amin(-1, keepdim=True).clamp(max=0)
    hi = torch.where(valid, wp, torch.zeros(())).amax(-1, keepdim=True).clamp(min=0)
    scale = torch.where(hi > lo, (hi - lo) / 15, torch.ones(()))
    zero = torch.round(-lo / scale).clamp(0, 15)
    q = (torch.round(wp / scale) + zero).clamp(0, 15)
    return (scale * (q - zero)).view(E_, N, -1)[..., :K_]


def test_quantized_variants_are_never_chosen_automatically():
    assert not set(kernels.quantized_kernels()) & set(kernels.available_kernels())
    assert kernels.resolve_kernel("auto") in kernels.available_kernels()


@pytest.mark.parametrize("kernel", [*kernels.available_kernels()[:2], *kernels.quantized_kernels()[:1]])
def test_chunk_size_gives_the_same_result(kernel):
    T = 37
    x, ids, w = batch(T, seed=4)
    dy = torch.randn(T, H, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    results = []
    layer = make_layer(3, kernel=kernel, lora_rank=2)
    factors = [t.detach() for t in layer.lora.factors()]
    for chunk in (None, 8):
        layer.chunk_size = chunk
        y, cache = kernels.experts_forward(layer, x, ids, w, lora=factors, save_for_backward=True)
        results.append((y, *kernels.experts_backward(layer, x, ids, w, dy, cache=cache, lora=factors)))
    (y0, dx0, dw0, g0), (y1, dx1, dw1, g1) = results
    # Rows are independent: chunking changes only the order of fp32 sums (an expert's rows may take the
    # tile path in one and the few-rows path in the other) and of LoRA-gradient sums.
    for a, b in ((y0, y1), (dx0, dx1), (dw0, dw1)):
        assert rel_error(a, b) < 1e-3
    for a, b in zip(g0, g1, strict=True):
        assert rel_error(a, b) < 1e-5
