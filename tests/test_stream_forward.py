"""kt_core._C.StreamForward, the experts forward that serving enqueues on a CUDA stream (CUDA graphs).

Here without a GPU: a stand-in for cuLaunchHostFunc runs the host function at once, so the operator's
arguments fixed at construction, the chunking, LoRA and the failure path (NaN and a recorded error) are
checked against KTExperts' ordinary forward. The CUDA path itself runs in tests/test_stream_ordered_gpu.py.

Legend: T = tokens, K = experts per token, H = hidden, r = LoRA rank.
"""

from __future__ import annotations

import ctypes

import pytest
import torch
from hf_experts import HIDDEN, NUM_EXPERTS, make_hf_experts, random_routing

from kt_core import KTExperts, available_kernels, get_thread_pool, kernels
from kt_core.experts import PinnedArenas

pytestmark = pytest.mark.skipif("torch" in available_kernels() and len(available_kernels()) == 1, reason="no _C")

HostFn = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
Launch = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)
LAUNCHED: list[int] = []  # streams the stand-in was given


@Launch
def _run_inline(stream, fn, data):
    LAUNCHED.append(stream or 0)
    HostFn(fn)(data)
    return 0


@Launch
def _refuse(stream, fn, data):
    return 700  # CUDA_ERROR_ILLEGAL_ADDRESS


RUN_INLINE = ctypes.cast(_run_inline, ctypes.c_void_p).value
REFUSE = ctypes.cast(_refuse, ctypes.c_void_p).value
KERNELS = [k for k in available_kernels() if k != "torch"]


def _stream_forward(experts, x, ids, w, y, lora=(), chunk=0):
    return experts.operator().stream_forward(
        get_thread_pool(experts.cpu_infer),
        x.shape[0],
        ids.shape[1],
        x.data_ptr(),
        kernels.dtype_name(x.dtype),
        ids.data_ptr(),
        w.data_ptr(),
        y.data_ptr(),
        kernels.lora_args(lora, experts),
        chunk,
    )


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("T, chunk", [(1, 0), (37, 0), (37, 8)])
def test_equals_the_ordinary_forward_on_every_run(kernel, dtype, T, chunk):
    experts = KTExperts.from_module(make_hf_experts("qwen3_moe", dtype, seed=T), kernel=kernel)
    ids, w = random_routing(T, 3, seed=T + 1, experts_used=NUM_EXPERTS - 2)  # two experts get no token
    ids[0, 1] = -1  # a slot computed elsewhere
    x = torch.randn(T, HIDDEN, generator=torch.Generator().manual_seed(T)).to(dtype)
    y = torch.full((T, HIDDEN), 7.0, dtype=dtype)
    call = _stream_forward(experts, x, ids, w.float().contiguous(), y, chunk=chunk)
    LAUNCHED.clear()
    call.enqueue(RUN_INLINE, 1234)
    assert LAUNCHED == [1234] and call.runs == 1 and call.error == ""
    expected, _ = kernels.experts_forward(experts, x, ids, w.float())
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    # A replay reads the buffers anew: new inputs in place, new result.
    x.copy_(torch.randn(T, HIDDEN, generator=torch.Generator().manual_seed(T + 9)).to(dtype))
    call.enqueue(RUN_INLINE, 1234)
    expected, _ = kernels.experts_forward(experts, x, ids, w.float())
    assert call.runs == 2
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


def test_applies_the_layers_lora():
    experts = KTExperts.from_module(make_hf_experts("qwen3_moe", torch.float32), kernel=KERNELS[0])
    lora = experts.add_lora(4, 8.0)
    with torch.no_grad():
        for p in lora.factors():
            p.normal_(0, 0.3)
    T = 11
    ids, w = random_routing(T, 2, seed=3)
    x = torch.randn(T, HIDDEN)
    y = torch.empty(T, HIDDEN)
    factors = experts.active_lora_factors()
    _stream_forward(experts, x, ids, w, y, lora=factors).enqueue(RUN_INLINE, 0)
    with_lora, _ = kernels.experts_forward(experts, x, ids, w, lora=factors)
    without, _ = kernels.experts_forward(experts, x, ids, w)
    torch.testing.assert_close(y, with_lora, rtol=0, atol=0)
    assert (with_lora - without).abs().max() > 1e-3  # the LoRA changes the answer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_failed_run_leaves_nan_and_says_why(dtype):
    experts = KTExperts.from_module(make_hf_experts("qwen3_moe", dtype), kernel=KERNELS[0])
    T = 5
    ids, w = random_routing(T, 2, seed=4)
    ids[2, 0] = NUM_EXPERTS + 3  # out of range: the operator refuses it inside the host function
    x, y = torch.randn(T, HIDDEN).to(dtype), torch.zeros(T, HIDDEN, dtype=dtype)
    call = _stream_forward(experts, x, ids, w, y)
    call.enqueue(RUN_INLINE, 0)
    assert call.runs == 0 and "out of range" in call.error
    assert torch.isnan(y).all()


def test_a_refused_launch_raises_with_the_cuda_code():
    experts = KTExperts.from_module(make_hf_experts("qwen3_moe", torch.float32), kernel=KERNELS[0])
    ids, w = random_routing(3, 2, seed=4)
    x, y = torch.randn(3, HIDDEN), torch.zeros(3, HIDDEN)
    call = _stream_forward(experts, x, ids, w, y)
    with pytest.raises(RuntimeError, match="CUresult 700"):
        call.enqueue(REFUSE, 0)
    with pytest.raises(ValueError, match="T >= 1"):
        _stream_forward(experts, x[:0], ids[:0], w[:0], y)


def test_pinned_buffers_grow_outside_captures_only(monkeypatch):
    arenas = PinnedArenas(HIDDEN, 2, torch.float32, max_tokens=64)
    first = arenas.for_tokens(4)
    assert arenas.for_tokens(3) is first
    grown = arenas.for_tokens(6)
    assert grown.max_tokens == 8 and arenas.for_tokens(8) is grown and first.x.data_ptr() != grown.x.data_ptr()
    assert arenas.serves(64, HIDDEN, 2, torch.float32) and not arenas.serves(65, HIDDEN, 2, torch.float32)
    assert not arenas.serves(4, HIDDEN, 3, torch.float32) and not arenas.serves(4, HIDDEN, 2, torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="no pinned buffers of that size were made before the capture"):
        arenas.for_tokens(9)
