"""KTExperts.release_host_weights / restore_host_weights: one copy of the experts in host RAM.

A packed kernel computes from its own tile copy (the backward's column blocks too, made from the forward's tiles), so
once packed the weights can go: forward and backward must give the same results bit for bit, the weights' memory must
be returned, everything that still reads the weights must refuse, naming the call, instead of computing from nothing,
and the weights must come back exactly when asked for (restore, LoRA merge).

Legend: T = tokens, K = experts per token, E = experts, H = hidden, I = expert intermediate, r = LoRA rank.
"""

from __future__ import annotations

import gc
import weakref
from types import SimpleNamespace

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


def train_step(module: KTExperts, T: int) -> list[torch.Tensor]:
    """Output, dx, d(routing weights) and the LoRA factors' gradients of one forward + backward."""
    x, ids, w = routing(T, idle=3)
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    for factor in module.lora.factors():
        factor.grad = None
    y = module(x, ids, w)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(T)).to(y.dtype))
    return [y.detach(), x.grad, w.grad, *(f.grad.clone() for f in module.lora.factors())]


@pytest.mark.parametrize("cached_columns", [False, True], ids=["columns-per-task", "columns-kept"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn], ids=["bf16", "fp8"])
@pytest.mark.parametrize("kernel", BF16_PACKED)
def test_training_after_release_is_bit_identical(kernel, dtype, cached_columns, monkeypatch):
    """The packed backward's column blocks come from the forward's tiles: releasing the weights changes nothing."""
    from kt_core import configure

    use(kernel, monkeypatch)
    configure(backward_weight_cache=cached_columns)
    try:
        kept, freed = layer(kernel, dtype, lora_rank=4), layer(kernel, dtype, lora_rank=4)
        freed.release_host_weights()
        for T in (1, 9, 40):
            for a, b in zip(train_step(kept, T), train_step(freed, T), strict=True):
                assert torch.equal(a, b), f"T={T}"
    finally:
        configure(backward_weight_cache=None)


@pytest.mark.parametrize("kernel", ["avx512_bf16_packed", "amx_bf16"])
def test_what_needs_the_weights_refuses_after_release(kernel, monkeypatch):
    module = layer(use(kernel, monkeypatch), lora_rank=4)
    module.release_host_weights()
    x, ids, w = routing(5)

    fp32 = r"fp32 activations reads the expert weights.*release_host_weights"
    with pytest.raises(RuntimeError, match=fp32), torch.no_grad():
        module(x.float(), ids, w)
    with pytest.raises(RuntimeError, match=r"backward of kernel .* torch.float32 activations reads the expert"):
        module(x.float().requires_grad_(), ids, w)
    with pytest.raises(RuntimeError, match=r"load_expert_: expert 2: .*released"):
        module.load_expert_(2, down=torch.zeros(H, I))
    with pytest.raises(ValueError, match=r"enable_streaming: 1 KTExperts layers released .* quantize='int8'"):
        enable_streaming(torch.nn.Sequential(module), device="cpu", expert_gpu_memory="1MiB", quantize="int8")
    rt = enable_streaming(torch.nn.Sequential(module), device="cpu", expert_gpu_memory="1MiB")
    assert rt.store.layers[0].tiles is not None  # streams from the packed copy (tests/test_stream_from_tiles.py)
    rt.disable()
    module.kernel = "avx512_bf16" if kernel.startswith("avx512") else "avx512_bf16_packed"
    with pytest.raises(RuntimeError, match=r"needs the expert weights, which were released"):
        module.operator()


@pytest.mark.parametrize("kernel", ["avx512_vnni_int8", "amx_int4"])
def test_quantized_kernels_train_from_the_weights_and_cannot_restore_them(kernel, monkeypatch):
    """int8 / int4 kernels train with the exact backward on the bf16 weights, and their quantized copy cannot give
    the weights back: after release, forward only."""
    module = layer(use(kernel, monkeypatch), lora_rank=4)
    expected = forward(module, 6)
    module.release_host_weights()
    assert torch.equal(forward(module, 6), expected)
    x, ids, w = routing(5)
    with pytest.raises(RuntimeError, match=rf"backward of kernel '{kernel}' with torch.bfloat16 activations reads"):
        module(x.clone().requires_grad_(), ids, w)
    with pytest.raises(RuntimeError, match=rf"restore_host_weights: kernel '{kernel}' keeps a quantized copy"):
        module.restore_host_weights()
    assert module.host_weights_released


def test_the_operator_itself_refuses_to_read_released_weights(monkeypatch):
    """The C++ operator refuses off the packed path (a caller that bypasses the module's checks)."""
    module = layer(use("avx512_bf16_packed", monkeypatch))
    op = module.operator()
    module.release_host_weights()
    assert op.weights_released and op.packed_backward("bfloat16") and not op.packed_backward("float32")
    x, ids, w = routing(3)
    x = x.float()
    dy, dx, dw = torch.ones(3, H), torch.empty(3, H), torch.empty(3, K)
    pool = kernels.get_thread_pool(None)
    with pytest.raises(RuntimeError, match=r"a backward with fp32 activations reads the expert weights"):
        op.backward(
            pool, 3, K, x.data_ptr(), "float32", ids.data_ptr(), w.data_ptr(), dy.data_ptr(), dx.data_ptr(),
            dw.data_ptr(), 0, None, None,
        )  # fmt: skip
    with pytest.raises(RuntimeError, match=r"packing reads the expert weights"):
        op.pack(pool)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn], ids=["bf16", "fp8"])
@pytest.mark.parametrize("kernel", BF16_PACKED)
def test_restore_gives_the_weights_back_exactly_without_packing_again(kernel, dtype, monkeypatch):
    module = layer(use(kernel, monkeypatch), dtype)
    original = (module.gate_up_proj.detach().clone(), module.down_proj.detach().clone())
    expected = forward(module, 9, idle=3)
    op = module.operator()
    packs = op.pack_count
    module.release_host_weights()

    assert module.restore_host_weights() == sum(t.numel() * t.element_size() for t in original)
    assert not module.host_weights_released and module.restore_host_weights() == 0
    for restored, weight in zip((module.gate_up_proj, module.down_proj), original, strict=True):
        assert restored.dtype == dtype and torch.equal(restored.view(torch.uint8), weight.view(torch.uint8))
    assert module.operator() is op and op.pack_count == packs and not op.weights_released
    assert torch.equal(forward(module, 9, idle=3), expected)
    if dtype == torch.bfloat16:  # and the weights take loads again
        module.load_expert_(2, down=torch.zeros(H, I))
        assert not bool(module.down_proj[2].float().abs().amax() > 0)


def test_peft_merge_after_release_merges_into_the_restored_weights(monkeypatch):
    from kt_core.peft.attach import merge_expert_lora_

    kept, freed = (layer(use("avx512_bf16_packed", monkeypatch), lora_rank=4) for _ in range(2))
    freed.release_host_weights()
    merge_expert_lora_(kept)
    merge_expert_lora_(freed)
    assert not freed.host_weights_released and freed.lora is None
    assert torch.equal(freed.gate_up_proj, kept.gate_up_proj) and torch.equal(freed.down_proj, kept.down_proj)
    assert torch.equal(forward(freed, 9), forward(kept, 9))


def test_restore_then_stream(monkeypatch):
    module = layer(use("avx512_bf16_packed", monkeypatch))
    module.release_host_weights()
    module.restore_host_weights()
    runtime = enable_streaming(torch.nn.Sequential(module), device="cpu", expert_gpu_memory="1MiB")
    runtime.disable()


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


def test_pack_experts_releases_the_layers_whose_packed_copy_trains(monkeypatch):
    """pack_experts(release=True) frees the weights of layers on a bf16-format packed kernel only; and a training
    run asks for it for a bf16 model unless the weights are kept."""
    from kt_core import pack_experts
    from kt_core.runtime.pack_cache import training_releases_weights

    packed = layer(use("avx512_bf16_packed", monkeypatch))
    others = [layer(k) for k in ("portable", "torch")]
    if "avx512_vnni_int8" in runnable():
        others.append(layer("avx512_vnni_int8"))
    model = torch.nn.ModuleList([packed, *others])
    assert pack_experts(model, progress=False, release=True) == len(model)
    assert packed.host_weights_released and not any(m.host_weights_released for m in others)

    class Model(torch.nn.Module):
        def __init__(self, dtype):
            super().__init__()
            self.embed = torch.nn.Embedding(4, 8, dtype=dtype)

        def get_input_embeddings(self):
            return self.embed

    assert training_releases_weights(Model(torch.bfloat16), keep_host_weights=False)
    assert not training_releases_weights(Model(torch.bfloat16), keep_host_weights=True)
    assert not training_releases_weights(Model(torch.float32), keep_host_weights=False)  # fp32 activations
    for engine in ({"fsdp": "full_shard"}, {"deepspeed": "ds.json"}):  # their state-dict gathering reads every tensor
        args = SimpleNamespace(**{"fsdp": "", "deepspeed": None, **engine})
        assert not training_releases_weights(Model(torch.bfloat16), keep_host_weights=False, args=args)
    assert training_releases_weights(Model(torch.bfloat16), False, SimpleNamespace(fsdp="", deepspeed=None))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert not training_releases_weights(Model(torch.bfloat16), keep_host_weights=False)


def test_release_after_packing_frees_at_the_first_forward_the_packed_copy_computes(monkeypatch):
    """Forward-only use (LLaMA-Factory's chat / api): the weights go at the first call the packed copy computes, not
    at a training forward nor at one with activations the packed kernel does not take."""
    module, reference = (layer(use("avx512_bf16_packed", monkeypatch), lora_rank=4) for _ in range(2))
    module.release_after_packing = True
    x, ids, w = routing(9)
    with torch.no_grad():
        module(x.float(), ids, w)  # fp32 activations: the exact path reads the weights
    assert not module.host_weights_released
    module(x.clone().requires_grad_(), ids, w).sum().backward()  # training keeps them
    assert not module.host_weights_released
    assert torch.equal(forward(module, 9), forward(reference, 9))
    assert module.host_weights_released
    assert torch.equal(forward(module, 9), forward(reference, 9))


def test_release_and_restore_with_the_pack_cache(monkeypatch, tmp_path):
    """A layer whose packed copy came from the pack cache file releases, trains and restores as one that packed."""
    use("avx512_bf16_packed", monkeypatch)
    monkeypatch.setenv("KT_PACK_CACHE", str(tmp_path))
    packed, cached = layer("avx512_bf16_packed", lora_rank=4), layer("avx512_bf16_packed", lora_rank=4)
    original = cached.gate_up_proj.detach().clone()
    assert packed.operator().pack_count == 1 and cached.operator().pack_count == 0  # the second one read the file
    for module in (packed, cached):
        module.release_host_weights()
    for a, b in zip(train_step(packed, 9), train_step(cached, 9), strict=True):
        assert torch.equal(a, b)
    cached.restore_host_weights()
    assert torch.equal(cached.gate_up_proj, original)


def test_pack_experts_refuses_before_packing_what_host_ram_cannot_hold(monkeypatch):
    """Packing makes a copy of every layer's experts: without room for it the host would run out of memory mid-way
    (the process killed without a word), so pack_experts refuses first, naming the bytes and what to change; with
    release only one layer's copy needs room at a time."""
    from kt_core import pack_experts
    from kt_core.loading import memory
    from kt_core.loading.memory import MemoryPlanError

    kernel = use("avx512_bf16_packed", monkeypatch)
    model = torch.nn.ModuleList([layer(kernel, seed=i) for i in range(3)])
    one = model[0].pending_pack_bytes()
    assert one >= 3 * E * H * I * 2  # the bf16 tiles of gate, up and down, padded
    monkeypatch.setattr(memory, "available_host_bytes", lambda: 2 * one)
    with pytest.raises(MemoryPlanError, match=r"needs .* more host RAM at layer 1 of 3 .*keeps its weights"):
        pack_experts(model, progress=False)
    assert all(m.pending_pack_bytes() == one for m in model)  # nothing was packed
    assert pack_experts(model, progress=False, release=True) == 3  # one layer's copy at a time
    assert all(m.host_weights_released and m.pending_pack_bytes() == 0 for m in model)
