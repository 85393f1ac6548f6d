"""FP8 experts on the packed kernels (amx_bf16, avx512_bf16_packed): the e4m3 bytes packed into the tile layout
with their block scales, converted to bf16 right before the dot products. Against the unpacked fp8 kernel and the
plain-torch reference on the fp32-dequantized weights: forward, dx, d(routing weights), LoRA gradients; storage;
the pack cache; what still runs elsewhere or is refused.

The AMX variant runs on its scalar tile model (KT_AMX_EMULATE=1) on any CPU without AMX; avx512_bf16_packed is
skipped where the CPU lacks AVX512-BF16 / VNNI.
"""

from __future__ import annotations

import pytest
import torch
from test_fp8_experts import pair, random_fp8_experts, rel_error, routing, run

from kt_core import KTExperts, kernels
from kt_core.loading.fp8 import dequantize_experts_fp8

FP8 = torch.float8_e4m3fn
E = 6
PACKED = ("amx_bf16", "avx512_bf16_packed")


def unpacked_fp8_kernel() -> str:
    """The best unpacked fp8 kernel here (avx512_bf16, avx512, avx2 or portable)."""
    return next(k for k in kernels.fp8_kernels() if k not in PACKED)


@pytest.fixture(params=PACKED)
def kernel(request, monkeypatch):
    name = request.param
    if name.startswith("amx") and name not in kernels.available_kernels():
        monkeypatch.setenv("KT_AMX_EMULATE", "1")  # the AMX tile code on its scalar model
    if name not in kernels.fp8_kernels():
        pytest.skip(f"{name} does not run here")
    return name


def packed_layer(kernel: str, H: int, I: int, block=(128, 128), seed: int = 0, **kwargs) -> KTExperts:
    q_gu, s_gu, q_d, s_d = random_fp8_experts(H, I, block, seed)
    return KTExperts.from_tensors(
        q_gu,
        q_d,
        gate_up_proj_scale_inv=s_gu,
        down_proj_scale_inv=s_d,
        weight_block_size=block,
        kernel=kernel,
        **kwargs,
    )


# bf16 activations: y and dx are rounded to bf16 on both sides (as tests/test_fp8_experts.py). The packed backward
# also rounds dgu and h to bf16 where a bf16 autograd graph does (the bf16 packed kernels do the same), which the
# LoRA gradients see: ~2e-3 where the unpacked fp8 kernel, all in fp32, stays under 2e-3.
TOLERANCE = {"y": 8e-3, "dx": 8e-3, "dw": 2e-3, "lora": 5e-3}
NAMES = ["y", "dx", "dw", "d gate_up_A", "d gate_up_B", "d down_A", "d down_B"]


def check(got, want, what: str) -> None:
    for name, a, b in zip(NAMES, got, want, strict=False):
        assert a.dtype == b.dtype, (what, name)
        tol = TOLERANCE.get(name, TOLERANCE["lora"])
        assert rel_error(a, b) < tol, (what, name, rel_error(a, b))


@pytest.mark.parametrize("rank", [0, 4], ids=["no-lora", "lora"])
@pytest.mark.parametrize(
    ("H", "I", "T", "block"),
    [
        (256, 128, 13, (128, 128)),
        (200, 72, 1, (128, 128)),
        (130, 100, 40, (32, 48)),
        (96, 50, 7, (128, 128)),
        (64, 40, 37, (16, 16)),
    ],
    ids=["whole-blocks", "odd-T1", "odd-small-blocks", "odd-one-block", "16x16-blocks"],
)
def test_matches_unpacked_and_dequantized_reference(kernel, H, I, T, block, rank):
    ours, ref = pair(H, I, kernel, block, rank=rank, seed=H + I + T)
    unpacked, _ = pair(H, I, unpacked_fp8_kernel(), block, rank=rank, seed=H + I + T)
    assert ours.operator().packs and not unpacked.operator().packs
    ids, w = routing(T, 2, seed=T + 1, experts_used=E - 2)  # two experts receive no tokens
    gen = torch.Generator().manual_seed(H * T)
    x = torch.randn(T, H, generator=gen).to(torch.bfloat16)
    dy = torch.randn(T, H, generator=gen).to(torch.bfloat16)
    got = run(ours, x, ids, w, dy)
    check(got, run(ref, x, ids, w, dy), "vs dequantized fp32 reference")
    check(got, run(unpacked, x, ids, w, dy), "vs unpacked fp8 kernel")
    for g in got[3:]:  # the unused experts' factor gradients are zero
        assert g[E - 2 :].abs().max() == 0


def test_many_rows_per_expert(kernel):
    """Rows per expert past a 32-row tile block and past the 128-row chunk: every tile loop, and a slot of -1."""
    H, I, T = 256, 136, 300
    ours, ref = pair(H, I, kernel, rank=8, seed=5)
    ids, w = routing(T, 3, seed=6, experts_used=E)
    ids[3, 1] = -1
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(T, H, generator=gen).to(torch.bfloat16)
    dy = torch.randn(T, H, generator=gen).to(torch.bfloat16)
    check(run(ours, x, ids, w, dy), run(ref, x, ids, w, dy), "T=300")


def test_backward_without_the_forward_cache(kernel):
    """A backward that recomputes what the forward keeps (the packed forward, run again for its cache)."""
    H, I, T = 130, 100, 21
    ours, ref = pair(H, I, kernel, (32, 48), rank=4, seed=8)
    ids, w = routing(T, 2, seed=9, experts_used=E)
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(T, H, generator=gen).to(torch.bfloat16)
    dy = torch.randn(T, H, generator=gen).to(torch.bfloat16)
    lora = ours.lora.factors()
    dx, dw, grads = kernels.experts_backward(ours, x, ids, w, dy, cache=None, lora=lora)
    want = run(ref, x, ids, w, dy)
    check((want[0], dx, dw, *grads), want, "no cache")


def test_fp32_activations_run_the_unpacked_fp8_kernel(kernel):
    """fp32 activations are not rounded to bf16: the calls take the exact fp8 kernels, within fp32 rounding."""
    H, I, T = 200, 72, 9
    ours, ref = pair(H, I, kernel, seed=11)
    ids, w = routing(T, 2, seed=12, experts_used=E)
    gen = torch.Generator().manual_seed(13)
    x, dy = torch.randn(T, H, generator=gen), torch.randn(T, H, generator=gen)
    for name, a, b in zip(NAMES, run(ours, x, ids, w, dy), run(ref, x, ids, w, dy), strict=True):
        assert rel_error(a, b) < 1e-5, name


def test_packed_fp8_takes_half_the_bf16_bytes(kernel):
    """No bf16 copy: the layer keeps its e4m3 stores, and the packed tiles take one byte a weight."""
    H, I = 256, 128
    layer = packed_layer(kernel, H, I)
    op = layer.operator()
    assert layer.gate_up_proj.dtype == FP8 and layer.down_proj.dtype == FP8
    q_gu, s_gu, q_d, s_d = random_fp8_experts(H, I)
    bf16 = KTExperts.from_tensors(*dequantize_experts_fp8(q_gu, s_gu, q_d, s_d), kernel=kernel)
    assert op.packed_bytes * 2 == bf16.operator().packed_bytes == E * 3 * H * I * 2
    assert "fp8" in op.packed_format and "b128x128" in op.packed_format


def test_blocks_of_no_whole_tile_run_unpacked(kernel):
    """Blocks that do not hold whole 16 x 16 tiles keep the unpacked fp8 kernels, with the same results."""
    ours, ref = pair(160, 96, kernel, (8, 8), rank=4, seed=14)
    assert not ours.operator().packs
    ids, w = routing(5, 2, seed=15, experts_used=E)
    gen = torch.Generator().manual_seed(16)
    x = torch.randn(5, 160, generator=gen).to(torch.bfloat16)
    dy = torch.randn(5, 160, generator=gen).to(torch.bfloat16)
    check(run(ours, x, ids, w, dy), run(ref, x, ids, w, dy), "8x8 blocks")


def test_auto_takes_the_packed_kernel_first():
    available = kernels.fp8_kernels()
    assert kernels.resolve_kernel("auto", FP8) == available[0]
    runnable = [k for k in PACKED if k in kernels.available_kernels()]
    assert all(k in available for k in runnable)
    if runnable:
        assert available.index(runnable[0]) < available.index(unpacked_fp8_kernel())


def test_pack_cache_reloads_fp8_and_follows_the_scales(kernel, tmp_path):
    H, I = 130, 100
    x = torch.randn(7, H, generator=torch.Generator().manual_seed(17)).to(torch.bfloat16)
    ids, w = routing(7, 2, seed=18, experts_used=E)
    fresh = packed_layer(kernel, H, I, (32, 48))
    first = packed_layer(kernel, H, I, (32, 48), pack_cache=tmp_path)
    first.operator()
    second = packed_layer(kernel, H, I, (32, 48), pack_cache=tmp_path)
    assert second.operator().pack_count == 0  # loaded
    assert torch.equal(second(x, ids, w), fresh(x, ids, w))
    # The same e4m3 bytes with other scales are another layer: packed again, into another file.
    other = packed_layer(kernel, H, I, (32, 48), pack_cache=tmp_path)
    with torch.no_grad():
        other.down_proj_scale_inv.mul_(2)
    assert other.operator().pack_count == 1
    assert len(list(tmp_path.glob("*.safetensors"))) == 2


@pytest.mark.parametrize("quantized", ["amx_int8", "amx_int4", "avx512_vnni_int8", "avx512_vnni_int4"])
def test_quantized_kernels_refuse_fp8(quantized, monkeypatch):
    if quantized.startswith("amx") and quantized not in kernels.quantized_kernels():
        monkeypatch.setenv("KT_AMX_EMULATE", "1")
    if quantized not in kernels.quantized_kernels():
        pytest.skip(f"{quantized} does not run here")
    with pytest.raises(ValueError, match=rf"kernel='{quantized}' takes no fp8 .*int8 / int4"):
        KTExperts(2, 64, 32, dtype=FP8, kernel=quantized)
    from kt_core import _C

    q = torch.zeros(2, 64, 32, dtype=FP8)
    s = torch.ones(2, 1, 1)
    with pytest.raises(ValueError, match=rf"kernel '{quantized}' takes no fp8 weights \(dtype float8_e4m3fn\)"):
        _C.ExpertsOp(
            quantized, 2, 32, 16, q.data_ptr(), q.data_ptr(), "float8_e4m3fn", s.data_ptr(), s.data_ptr(), (128, 128)
        )
