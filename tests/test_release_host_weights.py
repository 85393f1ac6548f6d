"""KTExperts.release_host_weights: one copy of the experts in host RAM for forward-only use (serving).

A packed kernel computes the forward from its own tile copy, so once packed the weights can go: the forward must
give the same result bit for bit, the weights' memory must be returned, and everything that reads the weights
afterwards must refuse, naming the call, instead of computing from nothing.

Legend: T = tokens, K = experts per token, E = experts, H = hidden, I = expert intermediate, r = LoRA rank.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from kt_core import KTExperts, enable_streaming, kernels

E, H, I, K = 6, 256, 96, 2  # H, I whole fp8 blocks of 32 x 32 (the packed fp8 tiles need blocks of 16)
BF16_PACKED = ("avx512_bf16_packed", "amx_bf16")
QUANTIZED = ("avx512_vnni_int8", "avx512_vnni_int4", "amx_int8", "amx_int4")


def runnable() -> set[str]:
    return set(kernels.available_kernels()) | set(kernels.quantized_kernels())


def use(kernel: str, monkeypatch) -> str:
    if kernel.startswith("amx") and kernel not in runnable():
        monkeypatch.setenv("KT_AMX_EMULATE", "1")  # the AMX tile code on its scalar model
    if kernel not in runnable():
        pytest.skip(f"{kernel} does not run here")
    return kernel


def layer(kernel: str, dtype=torch.bfloat16, seed: int = 0, lora_rank: int = 0) -> KTExperts:
    gen = torch.Generator().manual_seed(seed)
    gate_up = torch.randn(E, 2 * I, H, generator=gen) / H**0.5  # [E, 2I, H]
    down = torch.randn(E, H, I, generator=gen) / I**0.5  # [E, H, I]
    extra = {"weight_block_size": (32, 32)} if dtype == torch.float8_e4m3fn else {}
    module = KTExperts.from_tensors(gate_up, down, dtype=dtype, kernel=kernel, lora_rank=lora_rank, **extra)
    if lora_rank:
        with torch.no_grad():
            for factor in module.lora.factors():  # B = 0 would hide the LoRA term
                factor.normal_(0.0, 0.05, generator=gen)
    return module


def routing(T: int, seed: int = 1, idle: int | None = None):
    """x [T, H] bf16, ids [T, K], w [T, K]; expert `idle` gets no token."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=gen)  # [T, E]
    if idle is not None:
        logits[:, idle] = float("-inf")
    w, ids = torch.softmax(logits, dim=-1).topk(K, dim=-1)  # [T, K]
    return torch.randn(T, H, generator=gen).to(torch.bfloat16), ids, w


def forward(module: KTExperts, T: int, idle: int | None = None) -> torch.Tensor:
    x, ids, w = routing(T, idle=idle)
    with torch.no_grad():
        return module(x, ids, w).clone()  # [T, H]


@pytest.mark.parametrize("lora_rank", [0, 4], ids=["base", "lora"])
@pytest.mark.parametrize(
    ("kernel", "dtype"),
    [*((k, torch.bfloat16) for k in BF16_PACKED), *((k, torch.float8_e4m3fn) for k in BF16_PACKED)]
    + [(k, torch.bfloat16) for k in QUANTIZED],
    ids=lambda v: str(v).replace("torch.", ""),
)
def test_forward_after_release_is_bit_identical_and_memory_goes(kernel, dtype, lora_rank, monkeypatch):
    module = layer(use(kernel, monkeypatch), dtype, lora_rank=lora_rank)
    before = {T: forward(module, T, idle=3) for T in (1, 9, 40)}
    weights = (weakref.ref(module.gate_up_proj), weakref.ref(module.down_proj))
    expected_bytes = sum(t.numel() * t.element_size() for t in (module.gate_up_proj, module.down_proj))

    assert module.release_host_weights() == expected_bytes
    gc.collect()
    assert all(ref() is None for ref in weights)  # nothing else held them: their memory is back
    assert module.host_weights_released and module.gate_up_proj.is_meta and module.down_proj.is_meta
    assert module.gate_up_proj.shape == (E, 2 * I, H) and module.gate_up_proj.dtype == dtype
    assert "host weights released" in repr(module)
    for T, expected in before.items():
        assert torch.equal(forward(module, T, idle=3), expected), f"T={T}"
    assert module.release_host_weights() == 0  # twice: nothing left to release


@pytest.mark.parametrize("kernel", ["avx512_bf16_packed", "amx_bf16"])
def test_what_needs_the_weights_refuses_after_release(kernel, monkeypatch):
    module = layer(use(kernel, monkeypatch), lora_rank=4)
    module.release_host_weights()
    x, ids, w = routing(5)

    with pytest.raises(RuntimeError, match=r"training needs the expert weights.*release_host_weights"):
        module(x.clone().requires_grad_(), ids, w)
    fp32 = r"fp32 activations reads the expert weights.*release_host_weights"
    with pytest.raises(RuntimeError, match=fp32), torch.no_grad():
        module(x.float(), ids, w)
    with pytest.raises(RuntimeError, match=r"load_expert_: expert 2: .*released"):
        module.load_expert_(2, down=torch.zeros(H, I))
    with pytest.raises(ValueError, match=r"enable_streaming: 1 KTExperts layers released their host weights"):
        enable_streaming(torch.nn.Sequential(module), device="cpu", expert_gpu_memory="1MiB")
    module.kernel = "avx512_bf16" if kernel.startswith("avx512") else "avx512_bf16_packed"
    with pytest.raises(RuntimeError, match=r"needs the expert weights, which were released"):
        module.operator()


def test_the_backward_refuses_in_the_operator_too(monkeypatch):
    """The C++ operator itself refuses to read released weights (a caller that bypasses the module's check)."""
    module = layer(use("avx512_bf16_packed", monkeypatch))
    op = module.operator()
    module.release_host_weights()
    assert op.weights_released
    x, ids, w = routing(3)
    dy, dx, dw = torch.ones(3, H, dtype=torch.bfloat16), torch.empty(3, H, dtype=torch.bfloat16), torch.empty(3, K)
    pool = kernels.get_thread_pool(None)
    with pytest.raises(RuntimeError, match=r"the backward reads the expert weights"):
        op.backward(
            pool, 3, K, x.data_ptr(), "bfloat16", ids.data_ptr(), w.data_ptr(), dy.data_ptr(), dx.data_ptr(),
            dw.data_ptr(), 0, None, None,
        )  # fmt: skip
    with pytest.raises(RuntimeError, match=r"packing reads the expert weights"):
        op.pack(pool)


@pytest.mark.parametrize("kernel", ["torch", "portable", "avx512_bf16"])
def test_kernels_that_read_the_weights_keep_them(kernel, monkeypatch):
    module = layer(use(kernel, monkeypatch))
    expected = forward(module, 7)
    with pytest.raises(ValueError, match=rf"kernel '{kernel}' computes from the weights themselves"):
        module.release_host_weights()
    assert not module.host_weights_released and torch.equal(forward(module, 7), expected)


def test_fp32_weights_on_a_bf16_format_keep_them(monkeypatch):
    """bf16 packing would round fp32 weights, so the packed bf16 kernels leave them unpacked: nothing to release."""
    module = layer(use("avx512_bf16_packed", monkeypatch), torch.float32)
    with pytest.raises(ValueError, match=r"computes from the weights themselves \(torch.float32\)"):
        module.release_host_weights()
    assert not module.host_weights_released
