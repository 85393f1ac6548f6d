"""FP8 experts streamed as FP8: e4m3 bytes and fp32 block scales in the pinned host store, the device slots and the
residents, dequantized on the device into a bf16 working buffer of a fixed number of experts, a group at a time, right
before the expert GEMMs.

What runs here without CUDA: the block-scaled dequantization (bit for bit the formula, partial blocks included), the
store's FP8 slots / residents / working buffer and their bytes, the planner's PCIe bytes, and the memory plan. With the
layer's FP8 share support (KTExperts.attach_gpu_share taking a share with `takes_fp8`, the factors uploaded in the
share's `compute_dtype`), the whole split also runs on the CPU standing in for the GPU ("fake device"): streamed FP8
equals the streamed bf16-dequantized model. tests/test_fp8_streaming.py::*gpu* repeat that on CUDA.

Legend: E experts, H hidden, I expert intermediate, K experts per token, R LoRA rank, C slot capacity.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from kt_core import KTExperts
from kt_core.loading.fp8 import (
    dequantize_experts_fp8,
    dequantize_experts_fp8_,
    dequantize_fp8_blockwise,
    expert_scale_bytes,
    expert_scale_shapes,
    quantize_experts_fp8,
)
from kt_core.streaming import CostModel, ExpertStore, enable_streaming, plan_layer
from kt_core.streaming import memory_plan as mp
from kt_core.streaming.planner import (
    DEQUANT_BYTES,
    dequant_buffer_bytes,
    dequant_group,
    slot_bytes_per_expert,
    stored_expert_bytes,
)
from kt_core.streaming.store import GroupedWeight

FP8 = torch.float8_e4m3fn
E, H, I, K, R = 8, 40, 24, 2, 4
BLOCK = (16, 16)  # H = 2.5 blocks, I = 1.5 blocks: every dequantization has partial blocks
FP8_EXPERT = 3 * H * I + expert_scale_bytes(H, I, BLOCK)  # one expert as stored and streamed
BF16_EXPERT = 3 * H * I * 2


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def formula(q: torch.Tensor, scale: torch.Tensor, block, dtype) -> torch.Tensor:
    """[O, I] weight.float() * scale expanded over its blocks, the last ones cut: the layout's definition."""
    b0, b1 = block
    O, In = q.shape
    full = scale.repeat_interleave(b0, 0)[:O].repeat_interleave(b1, 1)[:, :In]
    return (q.float() * full).to(dtype)


def random_fp8(n: int, h: int, i: int, block, seed: int):
    """Quantized as DeepSeek's release quantizes (gate and up apart), from random weights of unit-variance outputs."""
    gen = torch.Generator().manual_seed(seed)
    gate_up, down = torch.randn(n, 2 * i, h, generator=gen) / h**0.5, torch.randn(n, h, i, generator=gen) / i**0.5
    return quantize_experts_fp8(gate_up, down, block)


# ---- the dequantization -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    ("h", "i", "block"),
    [(256, 128, (128, 128)), (200, 72, (128, 128)), (40, 24, (16, 16)), (130, 100, (32, 48)), (96, 50, (128, 128))],
    ids=["whole-blocks", "partial", "partial-small", "odd-blocks", "one-block"],
)
def test_dequantization_is_the_formula_bit_for_bit(dtype, h, i, block):
    q_gu, s_gu, q_d, s_d = random_fp8(3, h, i, block, seed=h + i)
    half = s_gu.shape[1] // 2
    gu = torch.full((3, 2 * i, h), float("nan"), dtype=dtype)
    d = torch.full((3, h, i), float("nan"), dtype=dtype)
    dequantize_experts_fp8_(gu, d, q_gu, s_gu, q_d, s_d, block)
    for e in range(3):
        want_gu = torch.cat([formula(q_gu[e, :i], s_gu[e, :half], block, dtype),
                             formula(q_gu[e, i:], s_gu[e, half:], block, dtype)])  # fmt: skip
        assert torch.equal(gu[e], want_gu)
        assert torch.equal(d[e], formula(q_d[e], s_d[e], block, dtype))
        assert torch.equal(dequantize_fp8_blockwise(q_d[e], s_d[e], block, dtype), d[e])
    gu2, d2 = dequantize_experts_fp8(q_gu, s_gu, q_d, s_d, block, dtype)
    assert torch.equal(gu2, gu) and torch.equal(d2, d)
    # a slice of a larger buffer, as the store fills its working buffer after a slot's experts
    buf = torch.zeros(5, 2 * i, h, dtype=dtype), torch.zeros(5, h, i, dtype=dtype)
    dequantize_experts_fp8_(buf[0][2:5], buf[1][2:5], q_gu, s_gu, q_d, s_d, block)
    assert torch.equal(buf[0][2:], gu) and torch.equal(buf[1][2:], d) and not buf[0][:2].any()


def test_dequantization_leaves_its_input_alone():
    w = torch.randn(20, 30)
    scale = torch.rand(2, 2) + 1
    before = w.clone()
    dequantize_fp8_blockwise(w, scale, (16, 16), torch.float32)
    assert torch.equal(w, before)


# ---- the store ----------------------------------------------------------------------------------------------------


def fp8_store(
    capacity: int, layers: int = 2, dequant_bytes: int = DEQUANT_BYTES
) -> tuple[ExpertStore, list[tuple[torch.Tensor, ...]]]:
    store = ExpertStore("cpu", capacity, dequant_bytes=dequant_bytes)
    weights = []
    for layer in range(layers):
        q_gu, s_gu, q_d, s_d = random_fp8(E, H, I, BLOCK, seed=10 + layer)
        store.add_layer(q_gu, q_d, scales=(s_gu, s_d), block=BLOCK)
        weights.append(dequantize_experts_fp8(q_gu, s_gu, q_d, s_d, BLOCK, torch.bfloat16))
    return store, weights


def dense(w: GroupedWeight) -> torch.Tensor:
    """All experts of a GroupedWeight, taken group by group (each copied out before the next overwrites it)."""
    n = len(w)
    return torch.cat([w.take(lo, min(n, lo + w.group)).clone() for lo in range(0, n, w.group)])


def assert_weights(got: tuple, want: tuple, experts) -> None:
    idx = torch.tensor(list(experts))
    got = [dense(w) if isinstance(w, GroupedWeight) else w for w in got]
    assert got[0].dtype == got[1].dtype == torch.bfloat16
    assert torch.equal(got[0], want[0][idx]) and torch.equal(got[1], want[1][idx])


def test_store_streams_fp8_bytes_and_scales():
    store, weights = fp8_store(capacity=4)
    assert store.fp8 and store.compute_dtype == torch.bfloat16
    w13, w2, s13, s2 = store.slots[0].bufs
    assert (w13.dtype, w2.dtype, s13.dtype, s2.dtype) == (FP8, FP8, torch.float32, torch.float32)
    gu_shape, d_shape = expert_scale_shapes(4, H, I, BLOCK)
    assert (tuple(s13.shape), tuple(s2.shape)) == (gu_shape, d_shape)
    # PCIe and residents: the real bytes of an FP8 expert, half of bf16's and the scales
    assert store.expert_bytes(0) == store.resident_bytes(0) == FP8_EXPERT == stored_expert_bytes(H, I, 1, BLOCK)
    assert FP8_EXPERT < BF16_EXPERT / 2 + 3 * H * I // 20
    # device memory: two FP8 slots and one bf16 working buffer (here the whole slot), as the planner counts them
    assert slot_bytes_per_expert(H, I, 1, block=BLOCK) == 2 * FP8_EXPERT
    assert dequant_buffer_bytes(H, I, 4, block=BLOCK) == 4 * BF16_EXPERT
    assert store.gpu_bytes() == 4 * (2 * FP8_EXPERT + BF16_EXPERT)
    store.load(0, [5, 2, 7])
    assert store.take_pcie()[1] == 3 * FP8_EXPERT
    experts, *got = store.acquire(0)
    assert experts == [5, 2, 7]
    assert_weights(got, weights[0], experts)
    store.load(1, [0, 1, 2, 3], avoid=0)  # a prefix: one copy per tensor
    experts, *got = store.acquire(1)
    assert_weights(got, weights[1], range(4))
    store.close()


def test_residents_stay_fp8_and_share_the_working_buffer():
    store, weights = fp8_store(capacity=E)
    store.set_resident(0, [1, 3])
    store.set_resident(1, [6])
    lw = store.layers[0]
    assert [t.dtype for t in lw.res] == [FP8, FP8, torch.float32, torch.float32]
    assert store.gpu_bytes() == E * (2 * FP8_EXPERT + BF16_EXPERT) + 3 * FP8_EXPERT
    store.load(0, [0, 2, 4])
    _, *slot_w = store.acquire(0)
    res_w = store.resident_weights(0)
    assert_weights(slot_w, weights[0], [0, 2, 4])  # still intact: the residents went after them
    assert_weights(res_w, weights[0], [1, 3])
    assert res_w[0].take(0, 2).data_ptr() == store.scratch[0][3:].data_ptr()
    store.load(1, [0, 5], avoid=0)
    assert_weights(store.acquire(1)[1:], weights[1], [0, 5])
    assert_weights(store.resident_weights(1), weights[1], [6])
    assert_weights(store.resident_weights(0), weights[0], [1, 3])  # layer 0 again, at the front: layer 1's go stale
    assert_weights(store.acquire(1)[1:], weights[1], [0, 5])  # so they are dequantized again
    assert_weights(store.acquire(0)[1:], weights[0], [0, 2, 4])
    assert_weights(store.resident_weights(0), weights[0], [1, 3])
    store.close()


def test_whole_layer_slot_copies_fp8_residents_on_the_device():
    store, weights = fp8_store(capacity=E, layers=1)
    store.set_resident(0, [1, 3])
    rest = [e for e in range(E) if e not in (1, 3)]
    store.load(0, rest)
    assert store.take_pcie()[1] == len(rest) * FP8_EXPERT  # the residents cross no PCIe
    experts, *got = store.acquire(0)
    assert experts == list(range(E))
    assert_weights(got, weights[0], range(E))


def test_store_refuses_mixed_formats():
    q_gu, s_gu, q_d, s_d = random_fp8(E, H, I, BLOCK, seed=0)
    with pytest.raises(ValueError, match="block scales"):
        ExpertStore("cpu", 2).add_layer(q_gu, q_d)
    with pytest.raises(ValueError, match="FP8 experts already stream as FP8"):
        ExpertStore("cpu", 2, quantize="int8").add_layer(q_gu, q_d, scales=(s_gu, s_d), block=BLOCK)
    store = ExpertStore("cpu", 2)
    store.add_layer(q_gu, q_d, scales=(s_gu, s_d), block=BLOCK)
    with pytest.raises(ValueError, match="same format"):
        store.add_layer(torch.zeros(E, 2 * I, H, dtype=torch.bfloat16), torch.zeros(E, H, I, dtype=torch.bfloat16))


# ---- planner and memory plan ----------------------------------------------------------------------------------------


def test_planner_counts_the_real_bytes_per_expert():
    # DeepSeek-V3: H 7168, I 2048, 128 x 128 blocks: 44.05 MB per expert streamed instead of 88.08 MB
    v3 = stored_expert_bytes(7168, 2048, 1, (128, 128))
    assert v3 == 3 * 7168 * 2048 + 4 * (2 * 16 * 56 + 56 * 16) and round(v3 / 1e4) == 4405
    assert stored_expert_bytes(7168, 2048, 2) == 2 * 3 * 7168 * 2048
    assert slot_bytes_per_expert(7168, 2048, 1, block=(128, 128)) == 2 * v3  # both slots; the bf16 buffer is fixed
    assert dequant_group(7168, 2048) == 6  # 512 MiB of 88 MB bf16 experts
    for capacity in (6, 100, 256):
        assert dequant_buffer_bytes(7168, 2048, capacity, block=(128, 128)) == 6 * 2 * 3 * 7168 * 2048
    assert dequant_buffer_bytes(7168, 2048, 256, block=None) == dequant_buffer_bytes(7168, 2048, 0, block=(1, 1)) == 0
    # A PCIe-bound layer streams more FP8 experts than bf16 ones at the same speeds, each costing its real bytes.
    cost = CostModel(pcie_bytes_per_s=2e9, cpu_flops=0.3e12, gpu_flops=300e12, cpu_expert_s=0.0)
    counts = [200.0] * 64
    kw = dict(hidden=2048, intermediate=1408, capacity=64, cost=cost)
    fp8 = plan_layer(counts, expert_bytes=stored_expert_bytes(2048, 1408, 1, (128, 128)), **kw)
    bf16 = plan_layer(counts, expert_bytes=stored_expert_bytes(2048, 1408, 2), **kw)
    assert len(fp8.stream) > len(bf16.stream) > 0
    assert fp8.pcie_s == pytest.approx(
        cost.pcie_passes * len(fp8.stream) * stored_expert_bytes(2048, 1408, 1, (128, 128)) / cost.pcie_bytes_per_s
    )


# E 4, top-2, two MoE layers, H 200 and I 72 with 128 x 128 blocks (partial in both dims)
DIMS = mp.ModelDims(hidden=200, vocab=64, heads=4, layers=(mp.LayerDims(linear=800, widest=200, moe=True),) * 2,
                    experts=4, top_k=2, expert_intermediate=72, expert_item=1, moe_layers=2,
                    expert_block=(128, 128))  # fmt: skip
DIMS_STORED = 3 * 200 * 72 + 4 * (2 * 1 * 2 + 2 * 1)  # e4m3 weights; gate and up: 1 x 2 blocks each, down 2 x 1
DIMS_BF16 = 2 * 3 * 200 * 72  # one expert in the bf16 working buffer
DIMS_SLOT = 2 * DIMS_STORED + DIMS_BF16  # both slots, and the buffer while it holds the whole slot


def test_memory_plan_counts_fp8_slots_scales_and_working_buffer():
    assert DIMS.expert_bytes == DIMS_STORED
    streaming = mp.StreamingSizes(expert_gpu_memory=4 * DIMS_SLOT + 2 * 2 * DIMS_STORED + 5, mode="gpu")
    inputs = mp.PlanInputs(DIMS, mp.RunShape(batch=2, seq_len=8), weights_bytes=1000, streaming=streaming)
    plan = mp.plan_gpu_memory(inputs, limit=2**30)
    assert (plan.capacity, plan.residents) == (4, 2)
    assert plan.parts["streaming slots"] == 4 * DIMS_SLOT
    assert plan.parts["resident experts"] == 2 * 2 * DIMS_STORED
    assert "fp8 + bf16 dequantization buffer of 4" in plan.table()
    # a buffer of one expert: counted once, so the same budget holds more residents
    one = dataclasses.replace(streaming, dequant_bytes=DIMS_BF16)
    small = mp.plan_gpu_memory(dataclasses.replace(inputs, streaming=one), limit=2**30)
    assert small.capacity == 4 and small.parts["streaming slots"] == 4 * 2 * DIMS_STORED + DIMS_BF16
    assert small.residents == 4 and "buffer of 1" in small.table()  # the 3 experts it saves: 2 more residents
    bf16_dims = dataclasses.replace(DIMS, expert_item=2, expert_block=None)
    bf16 = mp.plan_gpu_memory(dataclasses.replace(inputs, dims=bf16_dims), limit=2**30)
    assert bf16.capacity == 4 and bf16.residents == 1  # the same budget holds half as many bf16 residents
    assert bf16.parts["streaming slots"] == 4 * 2 * 3 * 200 * 72 * 2


def test_model_dims_and_checkpoint_inputs_see_fp8_experts(tmp_path, monkeypatch):
    from test_fp8_experts import write_fp8_deepseek

    from kt_core.loading import load_model

    path = write_fp8_deepseek(tmp_path / "ckpt")  # 16 x 16 blocks, I = 24
    model = load_model(path, device="cpu", progress=False, expert_dtype="fp8")
    dims = mp.model_dims(model)
    first = next(m for m in model.modules() if isinstance(m, KTExperts))
    assert (dims.expert_item, dims.expert_block) == (1, (16, 16))
    stored = (first.gate_up_proj, first.down_proj, first.gate_up_proj_scale_inv, first.down_proj_scale_inv)
    held = sum(p[0].numel() * p.element_size() for p in stored)
    assert dims.expert_bytes == held
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # planned for a GPU; nothing is allocated
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    run = mp.RunShape(batch=1, seq_len=8)
    planned = mp.checkpoint_inputs(path, run, device="cuda:0", expert_dtype="fp8").dims
    assert (planned.expert_item, planned.expert_block, planned.expert_bytes) == (1, (16, 16), held)
    assert mp.checkpoint_inputs(path, run, device="cuda:0").dims.expert_block is None  # dequantized at load


# ---- the split on the CPU standing in for the GPU -------------------------------------------------------------------


def _assert_groups_identical(results: dict) -> None:
    """results: {group size: (gradients, losses, experts streamed per layer)}; every group size gives the result of
    the whole-slot dequantization (key None) bit for bit."""
    want_grads, want_losses, want_streamed = results[None]
    for group, (grads, losses, streamed) in results.items():
        assert streamed == want_streamed, group
        for a, b in zip(grads, want_grads, strict=True):
            assert torch.equal(a, b), group
        assert losses == want_losses, group


def fp8_experts(seed: int, block=BLOCK, h=H, i=I) -> KTExperts:
    q_gu, s_gu, q_d, s_d = random_fp8(E, h, i, block, seed)
    m = KTExperts.from_tensors(q_gu, q_d, gate_up_proj_scale_inv=s_gu, down_proj_scale_inv=s_d,
                               weight_block_size=block, lora_rank=R, lora_alpha=2 * R)  # fmt: skip
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in m.lora.factors():  # B starts at zero: give every factor values so all gradients matter
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return m


def bf16_twin(m: KTExperts) -> KTExperts:
    """The same layer with its weights dequantized to bf16 (the values the FP8 run computes with) and its factors."""
    gu, d = dequantize_experts_fp8(m.gate_up_proj, m.gate_up_proj_scale_inv, m.down_proj, m.down_proj_scale_inv,
                                   m.weight_block_size, torch.bfloat16)  # fmt: skip
    twin = KTExperts.from_tensors(gu, d, lora_rank=m.lora.rank, lora_alpha=m.lora.alpha)
    with torch.no_grad():
        for dst, src in zip(twin.lora.factors(), m.lora.factors(), strict=True):
            dst.copy_(src)
    return twin


class Fp8MoE(nn.Module):
    """Layers of router (softmax top-K) -> FP8 experts, residual, gradient checkpointing; `bf16=True` builds the
    same model with the experts dequantized to bf16."""

    def __init__(self, layers: int, seed: int = 0, *, bf16: bool = False, block=BLOCK, h=H, i=I):
        super().__init__()
        torch.manual_seed(seed)
        self.routers = nn.ModuleList(nn.Linear(h, E, bias=False) for _ in range(layers))
        self.head = nn.Linear(h, 1)
        experts = [fp8_experts(seed + j, block, h, i) for j in range(layers)]  # (LoRA init draws from torch's RNG)
        self.experts = nn.ModuleList(bf16_twin(m) if bf16 else m for m in experts)

    def block(self, j, x):
        w, ids = self.routers[j](x).softmax(-1).topk(K, dim=-1)
        return x + self.experts[j](x, ids, w)

    def forward(self, x):
        for j in range(len(self.experts)):
            x = checkpoint(self.block, j, x, use_reentrant=False)
        return self.head(x.float()).pow(2).mean()


def lora_params(model):
    return [p for m in model.experts for p in m.lora.factors()]


def train(model, steps: int = 3, *, device="cpu", tokens: int = 40) -> list[float]:
    opt = torch.optim.Adam(lora_params(model) + list(model.routers.parameters()), lr=0.02)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        loss = model(torch.randn(tokens, model.head.in_features, generator=gen).to(device))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


# Splits on the FP8 model: budgets in its own bytes (both slots and the working buffer per expert of capacity).
SLOT = 2 * FP8_EXPERT + BF16_EXPERT
FP8_SPLITS = {
    "all-streamed": dict(mode="gpu"),
    "half-streamed": dict(mode="gpu", expert_gpu_memory=4 * SLOT),
    "resident": dict(mode="gpu", expert_gpu_memory=E * SLOT + 3 * 2 * FP8_EXPERT),  # 3 residents per layer (2 layers)
    "resident-and-cpu": dict(
        mode="auto",
        expert_gpu_memory=E * SLOT + 3 * 2 * FP8_EXPERT,
        cost=CostModel(
            pcie_bytes_per_s=2e7, cpu_flops=1e9, gpu_flops=1e12, cpu_expert_s=0.0, cpu_call_s=0.0, smoothing=0.0
        ),  # these speeds, not the measured ones: the split stays mixed
    ),
}
# The bf16 twin gets the same split: the same capacity and residents, from its own bytes.
BF16_SLOT = 2 * BF16_EXPERT
BF16_SPLITS = {
    "all-streamed": dict(mode="gpu"),
    "half-streamed": dict(mode="gpu", expert_gpu_memory=4 * BF16_SLOT),
    "resident": dict(mode="gpu", expert_gpu_memory=E * BF16_SLOT + 3 * 2 * BF16_EXPERT),
    "resident-and-cpu": dict(FP8_SPLITS["resident-and-cpu"], expert_gpu_memory=E * BF16_SLOT + 3 * 2 * BF16_EXPERT),
}
EXACT = ("all-streamed", "resident")  # the GPU side computes every expert: no CPU kernel in either run


def test_int8_on_fp8_experts_is_refused():
    with pytest.raises(ValueError, match="FP8"):
        enable_streaming(Fp8MoE(1), device="cpu", quantize="int8")


@pytest.mark.parametrize("split", sorted(FP8_SPLITS))
def test_streamed_fp8_equals_streamed_bf16_dequantized(split):
    """One pass's dx and LoRA gradients, then the loss curve: bit for bit where the GPU side computes everything (same
    bf16 weights, same kernels); within bf16 where the CPU computes some experts (its FP8 kernel dequantizes to fp32,
    the bf16 twin's reads the bf16-rounded weights)."""
    fp8, bf16 = Fp8MoE(2, seed=1), Fp8MoE(2, seed=1, bf16=True)
    rt8 = enable_streaming(fp8, device="cpu", **FP8_SPLITS[split])
    rt16 = enable_streaming(bf16, device="cpu", **BF16_SPLITS[split])
    assert rt8.store.capacity == rt16.store.capacity and rt8.resident_per_layer == rt16.resident_per_layer
    x = torch.randn(48, H, generator=torch.Generator().manual_seed(9))
    x8, x16 = x.clone().requires_grad_(), x.clone().requires_grad_()
    fp8(x8).backward()
    bf16(x16).backward()
    got = [x8.grad, *(p.grad for p in lora_params(fp8))]
    want = [x16.grad, *(p.grad for p in lora_params(bf16))]
    for model in (fp8, bf16):
        model.zero_grad(set_to_none=True)
    losses8, losses16 = train(fp8), train(bf16)
    if split in EXACT:
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b)
        assert losses8 == losses16
    else:
        for a, b in zip(got, want, strict=True):
            assert rel(a, b) < 5e-2
        assert losses8 == pytest.approx(losses16, rel=3e-2)  # (Adam amplifies the difference over the steps)
    r8, r16 = rt8.history[-1], rt16.history[-1]
    assert r8["resident_per_layer"] == r16["resident_per_layer"]
    if split.startswith("resident"):
        assert r8["resident_per_layer"] == [3, 3]
        assert all(t.dtype in (FP8, torch.float32) for lw in rt8.store.layers for t in lw.res)
    if split == "resident-and-cpu":  # residents as a weight set of their own, beside a slot and the CPU
        assert 0 < r8["cpu_slot_share"] < 1 and all(n + 3 < E for n in r8["streamed_per_layer"])
    if split in EXACT:  # the same loads, each expert at its real size
        assert r8["streamed_per_layer"] == r16["streamed_per_layer"]
        gb8, gb16 = (sum(r["pcie_gb"] for r in rt.history) for rt in (rt8, rt16))
        assert gb16 > 0 and gb8 / gb16 == pytest.approx(FP8_EXPERT / BF16_EXPERT, rel=1e-9)
    rt8.disable()
    rt16.disable()


def test_mixed_split_matches_the_cpu_only_fp8_run():
    """Against the FP8 model with every expert on the CPU (fp32 dequantization): within bf16 rounding."""
    ours, ref = Fp8MoE(2, seed=2), Fp8MoE(2, seed=2)
    rt = enable_streaming(ours, device="cpu", **FP8_SPLITS["half-streamed"])
    x = torch.randn(48, H, generator=torch.Generator().manual_seed(3))
    xo, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    lo, lr = ours(xo), ref(xr)
    lo.backward()
    lr.backward()
    assert lo.item() == pytest.approx(lr.item(), rel=1e-2)
    for a, b in zip([xo.grad, *(p.grad for p in lora_params(ours))], [xr.grad, *(p.grad for p in lora_params(ref))],
                    strict=True):  # fmt: skip
        assert rel(a, b) < 2e-2
    assert 0 < rt.end_step()["cpu_slot_share"] < 1  # both sides computed


@pytest.mark.parametrize("kernel", [False, True])
def test_enable_streaming_sizes_fp8_as_the_memory_plan_does(monkeypatch, kernel):
    """Slots, working buffer and residents as the plan counts them; where the GEMMs multiply from e4m3 (`kernel`,
    CUDA with Triton at kernel widths: simulated here) no working buffer is made or planned, and its bytes hold
    experts instead."""
    from kt_core.streaming import fp8_gemm

    monkeypatch.setattr(fp8_gemm, "takes", lambda *a: kernel)
    for budget in (None, FP8_SPLITS["half-streamed"]["expert_gpu_memory"], FP8_SPLITS["resident"]["expert_gpu_memory"]):
        model = Fp8MoE(2)
        rt = enable_streaming(model, device="cpu", mode="gpu", expert_gpu_memory=budget)
        assert (rt.store.scratch is None) == kernel
        dims = mp.model_dims(_with_config(model))
        assert (dims.expert_item, dims.expert_block, dims.expert_bytes) == (1, BLOCK, FP8_EXPERT)
        streaming = mp.StreamingSizes(expert_gpu_memory=budget, mode="gpu")
        plan = mp.plan_gpu_memory(
            mp.PlanInputs(dims, mp.RunShape(batch=1, seq_len=None), weights_bytes=0, streaming=streaming), limit=2**30
        )
        assert (plan.capacity, plan.residents) == (rt.store.capacity, rt.resident_per_layer)
        assert plan.parts["streaming slots"] == rt.store.gpu_bytes()
        assert ("multiplied from e4m3" in plan.table()) == kernel
        if kernel and budget == FP8_SPLITS["resident"]["expert_gpu_memory"]:  # the buffer's bytes hold residents
            assert rt.resident_per_layer > 3
        p = rt.plan(0, 40)  # the planner's PCIe time: the streamed experts at their FP8 bytes
        assert rt.store.expert_bytes(0) == FP8_EXPERT
        assert p.pcie_s == pytest.approx(rt.cost.pcie_passes * len(p.stream) * FP8_EXPERT / rt.cost.pcie_bytes_per_s)
        rt.disable()


@pytest.mark.parametrize("split", ["all-streamed", "resident"])
def test_streamed_fp8_without_a_working_buffer_trains_the_same(monkeypatch, split):
    """Where the GEMMs multiply from e4m3 (simulated on the CPU: fp8_gemm.takes says yes, and grouped_mm multiplies
    each group's dequantized weights by its rows), no working buffer is made, slots and residents reach the GEMMs
    as FP8 weight sets, and training equals the run through the working buffer (tests/test_fp8_streaming.py::
    test_gpu_fp8_* run the kernel itself)."""
    from kt_core.streaming import fp8_gemm
    from kt_core.streaming.store import _dequantize_into

    def each_group(x, w, offs, *, transposed):
        dense = _dequantize_into(torch.empty(w.shape, dtype=x.dtype), w.q, w.scale, w.which, w.store.block)
        y, a = x.new_empty((x.shape[0], w.shape[1] if transposed else w.shape[2])), 0
        for g, end in enumerate(offs.tolist()):
            y[a:end] = x[a:end] @ (dense[g].t() if transposed else dense[g])
            a = end
        return y

    runs = {}
    for kernel in (False, True):
        calls = []
        monkeypatch.setattr(fp8_gemm, "takes", lambda *a, k=kernel: k)
        monkeypatch.setattr(fp8_gemm, "grouped_mm", lambda *a, c=calls, **k: c.append(1) or each_group(*a, **k))
        model = Fp8MoE(2, seed=1)
        rt = enable_streaming(model, device="cpu", **FP8_SPLITS[split])
        assert (rt.store.scratch is None) == kernel
        runs[kernel] = train(model)
        assert bool(calls) == kernel
        rt.disable()
    assert runs[True] == pytest.approx(runs[False], rel=1e-5)


# ---- the working buffer, a group of experts at a time ---------------------------------------------------------------


def fp8_budget(capacity: int, group: int, residents: int = 0, layers: int = 2) -> int:
    """expert_gpu_memory for this capacity and residents per layer: both slots, the working buffer once, residents."""
    return capacity * 2 * FP8_EXPERT + min(capacity, group) * BF16_EXPERT + residents * layers * FP8_EXPERT


MIXED = FP8_SPLITS["resident-and-cpu"]["cost"]
GROUP_SPLITS = {  # (capacity, residents per layer, enable_streaming arguments but the budget, piece rows)
    "all-streamed": (E, 0, dict(mode="gpu"), None),
    "all-streamed-pieces": (E, 0, dict(mode="gpu"), 20),  # 96 slots in 5 pieces: groups cut by pieces
    "five-streamed": (5, 0, dict(mode="gpu"), None),  # 5 = 3 + 2: a partial last group
    "resident": (E, 3, dict(mode="gpu"), None),
    "resident-and-cpu": (E, 3, dict(mode="auto", cost=MIXED), None),
}


@pytest.mark.parametrize("split", sorted(GROUP_SPLITS))
def test_group_sizes_give_identical_results(split):
    """Groups of 1, 3 and at least a slot's experts (the whole slot at once): dx, the LoRA gradients and the loss curve
    bit for bit, with the same split (budgets for the same capacity and residents whatever the buffer takes)."""
    capacity, residents, kwargs, piece_rows = GROUP_SPLITS[split]
    x = torch.randn(48, H, generator=torch.Generator().manual_seed(9))
    results = {}
    for group in (1, 3, None):  # None: the default dequant_bytes (512 MiB: every slot whole)
        dequant = DEQUANT_BYTES if group is None else group * BF16_EXPERT
        g = dequant_group(H, I, dequant)
        budget = None if split.startswith("all") else fp8_budget(capacity, g, residents)
        model = Fp8MoE(2, seed=1)
        rt = enable_streaming(model, device="cpu", expert_gpu_memory=budget, dequant_bytes=dequant, **kwargs)
        if piece_rows:
            rt.piece_rows = piece_rows
        assert (rt.store.capacity, rt.resident_per_layer) == (capacity, residents)
        assert rt.store.group == rt.store.scratch[0].shape[0] == min(capacity, g)
        xg = x.clone().requires_grad_()
        model(xg).backward()
        grads = [xg.grad, *(p.grad for p in lora_params(model))]
        model.zero_grad(set_to_none=True)
        losses = train(model, steps=2)
        r = rt.history[-1]
        if residents:
            assert r["resident_per_layer"] == [residents] * 2
        if split == "resident-and-cpu":
            assert 0 < r["cpu_slot_share"] < 1 and all(n + residents < E for n in r["streamed_per_layer"])
        results[group] = (grads, losses, r["streamed_per_layer"])
        rt.disable()
    _assert_groups_identical(results)


def test_grouped_residents_and_slot_take_the_buffer_in_turn():
    """Slot and residents of a layer through a buffer of 3 experts: each group dequantized into its start, the values
    those of the bf16-dequantized model, and a group already there taken again without a new dequantization."""
    store, weights = fp8_store(capacity=E, layers=1, dequant_bytes=3 * BF16_EXPERT)
    assert store.group == 3 and store.gpu_bytes() == E * 2 * FP8_EXPERT + 3 * BF16_EXPERT
    store.set_resident(0, [1, 3, 4, 6])
    store.load(0, [0, 2, 5])  # not the whole layer (7 of 8 with the residents): two weight sets
    experts, w13, w2 = store.acquire(0)
    r13, r2 = store.resident_weights(0)
    assert experts == [0, 2, 5] and (w13.group, r13.group) == (3, 3)
    assert_weights((w13, w2), weights[0], [0, 2, 5])
    assert_weights((r13, r2), weights[0], [1, 3, 4, 6])
    last = r13.take(3, 4)
    assert r13.holds(3, 4) and not w13.holds(0, 3) and last.data_ptr() == store.scratch[0].data_ptr()
    last[:] = 0  # were it dequantized again, it would not stay zero
    assert not r13.take(3, 4).any()
    with pytest.raises(ValueError, match="in groups of 3"):
        w13.take(0, 4)
    store.close()


@pytest.mark.parametrize("group", [1, 3, None])
def test_enable_streaming_sizes_the_group_buffer_as_the_memory_plan_does(group):
    """Whatever the slot capacity (3 to all 8 experts, with residents), the buffer is min(capacity, group) experts:
    what the memory plan counts once and enable_streaming allocates."""
    dequant = DEQUANT_BYTES if group is None else group * BF16_EXPERT
    g = dequant_group(H, I, dequant)
    buffers = set()
    for budget in (None, fp8_budget(3, g), fp8_budget(5, g), fp8_budget(7, g) + 5, fp8_budget(E, g, 2)):
        model = Fp8MoE(2)
        rt = enable_streaming(model, device="cpu", mode="gpu", expert_gpu_memory=budget, dequant_bytes=dequant)
        dims = mp.model_dims(_with_config(model))
        streaming = mp.StreamingSizes(expert_gpu_memory=budget, mode="gpu", dequant_bytes=dequant)
        plan = mp.plan_gpu_memory(
            mp.PlanInputs(dims, mp.RunShape(batch=1, seq_len=None), weights_bytes=0, streaming=streaming), limit=2**30
        )
        C = rt.store.capacity
        assert (plan.capacity, plan.residents) == (C, rt.resident_per_layer)
        assert plan.parts["streaming slots"] == rt.store.gpu_bytes() == C * 2 * FP8_EXPERT + min(C, g) * BF16_EXPERT
        buffer = sum(t.numel() * t.element_size() for t in rt.store.scratch)
        assert buffer == dequant_buffer_bytes(H, I, C, block=BLOCK, dequant_bytes=dequant)
        if budget is not None:  # what the buffer does not take goes to the slots and residents
            used = plan.parts["streaming slots"] + rt.resident_per_layer * 2 * FP8_EXPERT
            assert used <= budget < used + 2 * FP8_EXPERT + (BF16_EXPERT if g > C else 0) + 2 * 2 * FP8_EXPERT
        if g <= C:
            buffers.add(buffer)
        rt.disable()
    if group is not None:  # fixed once the slots hold a group: it does not grow with the capacity
        assert buffers == {group * BF16_EXPERT}


def _with_config(model: Fp8MoE) -> Fp8MoE:
    """model_dims reads a transformers config: the toy's shapes."""
    from types import SimpleNamespace

    model.config = SimpleNamespace(hidden_size=H, vocab_size=1, num_attention_heads=1, num_experts_per_tok=K)
    return model


# ---- on the GPU ---------------------------------------------------------------------------------------------------

GPU_SHAPE = dict(block=(128, 128), h=200, i=72)  # the shipped block size; both dims end in a partial block
GPU_FP8_EXPERT = stored_expert_bytes(200, 72, 1, (128, 128))
GPU_BF16_EXPERT = stored_expert_bytes(200, 72, 2)


def gpu_splits(expert: int, working: int) -> dict[str, dict]:
    slot = 2 * expert + working
    return {
        "all-streamed": dict(mode="gpu"),
        "half-streamed": dict(mode="gpu", expert_gpu_memory=4 * slot),
        "resident": dict(mode="gpu", expert_gpu_memory=E * slot + 3 * 3 * expert),  # 3 residents, 3 layers
    }


@pytest.mark.gpu
@pytest.mark.parametrize("split", ["all-streamed", "half-streamed", "resident"])
def test_gpu_streamed_fp8_equals_streamed_bf16_dequantized(split):
    """On CUDA (grouped GEMMs, Triton steps, pinned host store, side-stream copies): one pass's dx and LoRA gradients,
    then the loss curve, of the FP8 run equal the bf16-dequantized run's (the same bf16 weights on the device; within
    bf16 where the CPU computes some experts), the slots and residents hold FP8, and PCIe carries the FP8 bytes."""
    fp8, bf16 = Fp8MoE(3, seed=4, **GPU_SHAPE).cuda(), Fp8MoE(3, seed=4, bf16=True, **GPU_SHAPE).cuda()
    rt8 = enable_streaming(fp8, device="cuda", **gpu_splits(GPU_FP8_EXPERT, GPU_BF16_EXPERT)[split])
    rt16 = enable_streaming(bf16, device="cuda", **gpu_splits(GPU_BF16_EXPERT, 0)[split])
    exact = split != "half-streamed"  # the GPU side computes every expert in both runs
    try:
        assert rt8.store.pin_ok and all(t.is_pinned() for t in rt8.store.pinned)
        assert rt8.store.slots[0].bufs[0].dtype == FP8 and rt8.store.scratch[0].dtype == torch.bfloat16
        x = torch.randn(96, 200, generator=torch.Generator().manual_seed(5)).cuda()
        x8, x16 = x.clone().requires_grad_(), x.clone().requires_grad_()
        fp8(x8).backward()
        bf16(x16).backward()
        tol = 1e-3 if exact else 5e-2  # bf16 GEMMs on both sides; where the CPU computes, its kernels differ
        assert rel(x8.grad, x16.grad) < tol
        for a, b in zip(lora_params(fp8), lora_params(bf16), strict=True):
            assert rel(a.grad, b.grad) < tol
        for model in (fp8, bf16):
            model.zero_grad(set_to_none=True)
        losses8 = train(fp8, steps=4, device="cuda", tokens=96)
        losses16 = train(bf16, steps=4, device="cuda", tokens=96)
        if exact:
            assert losses8 == pytest.approx(losses16, rel=tol)
        else:  # the first loss, before Adam moves the two runs' factors apart by its normalized steps
            assert losses8[0] == pytest.approx(losses16[0], rel=1e-2)
        r8, r16 = rt8.history[-1], rt16.history[-1]
        assert r8["gpu_s"] > 0 and r8["resident_per_layer"] == r16["resident_per_layer"]
        if split == "resident":
            assert r8["resident_per_layer"] == [3, 3, 3]
            assert all(t.is_cuda and t.dtype in (FP8, torch.float32) for lw in rt8.store.layers for t in lw.res)
        gb8, gb16 = (sum(r["pcie_gb"] for r in rt.history) for rt in (rt8, rt16))
        assert gb8 > 0 and gb16 > 0
        if exact:  # the same loads, each expert at its real size
            assert r8["streamed_per_layer"] == r16["streamed_per_layer"]
            assert gb8 / gb16 == pytest.approx(GPU_FP8_EXPERT / GPU_BF16_EXPERT, rel=1e-9)
    finally:
        rt8.disable()
        rt16.disable()


@pytest.mark.gpu
def test_gpu_dequantization_equals_the_cpu_one():
    q_gu, s_gu, q_d, s_d = random_fp8(4, 200, 72, (128, 128), seed=3)
    want = dequantize_experts_fp8(q_gu, s_gu, q_d, s_d, (128, 128), torch.bfloat16)
    gu = torch.empty(q_gu.shape, dtype=torch.bfloat16, device="cuda")
    d = torch.empty(q_d.shape, dtype=torch.bfloat16, device="cuda")
    dequantize_experts_fp8_(gu, d, q_gu.cuda(), s_gu.cuda(), q_d.cuda(), s_d.cuda(), (128, 128))
    assert torch.equal(gu.cpu(), want[0]) and torch.equal(d.cpu(), want[1])


@pytest.mark.gpu
@pytest.mark.parametrize("split", ["all-streamed", "all-streamed-pieces", "five-streamed", "resident"])
def test_gpu_group_sizes_give_identical_results(split):
    """On CUDA (grouped GEMMs a group of experts at a time, the groups' row ranges read on the host, Triton steps):
    groups of 1, 3 and the whole slot give the same dx, LoRA gradients and losses, bit for bit."""
    capacity, residents, kwargs, piece_rows = GROUP_SPLITS[split]
    x = torch.randn(96, 200, generator=torch.Generator().manual_seed(5)).cuda()
    results = {}
    for group in (1, 3, None):
        dequant = DEQUANT_BYTES if group is None else group * GPU_BF16_EXPERT
        g = dequant_group(200, 72, dequant)
        budget = None
        if not split.startswith("all"):
            budget = capacity * 2 * GPU_FP8_EXPERT + min(capacity, g) * GPU_BF16_EXPERT + residents * 3 * GPU_FP8_EXPERT
        model = Fp8MoE(3, seed=4, **GPU_SHAPE).cuda()
        rt = enable_streaming(model, device="cuda", expert_gpu_memory=budget, dequant_bytes=dequant, **kwargs)
        try:
            if piece_rows:
                rt.piece_rows = piece_rows
            assert (rt.store.capacity, rt.resident_per_layer) == (capacity, residents)
            assert rt.store.scratch[0].shape[0] == min(capacity, g)
            xg = x.clone().requires_grad_()
            model(xg).backward()
            grads = [xg.grad.cpu(), *(p.grad.cpu() for p in lora_params(model))]
            model.zero_grad(set_to_none=True)
            losses = train(model, steps=3, device="cuda", tokens=96)
            results[group] = (grads, losses, rt.history[-1]["streamed_per_layer"])
        finally:
            rt.disable()
    _assert_groups_identical(results)


# ---- on the GPU: grouped GEMMs straight from e4m3 (kt_core.streaming.fp8_gemm) ---------------------------------------

FUSED_SHAPE = dict(block=(128, 128), h=320, i=192)  # widths the kernel takes (multiples of 64), partial last blocks


@pytest.mark.gpu
@pytest.mark.parametrize("which", [0, 1])
def test_gpu_fp8_kernel_equals_the_working_buffer(which):
    """Both products (x @ W^T of the forward, x @ W of the backward) of the fused kernel against each group's
    dequantized weights (the working buffer's bf16 values) times its rows in fp32: groups with no rows, one row and
    more rows than a tile; gate_up's scale rows (gate's blocks, then up's) and down's."""
    from types import SimpleNamespace

    from kt_core.streaming import fp8_gemm
    from kt_core.streaming.store import _dequantize_into

    h, i = FUSED_SHAPE["h"], FUSED_SHAPE["i"]
    q_gu, s_gu, q_d, s_d = random_fp8(5, h, i, (128, 128), seed=6)
    q, s = (q_gu, s_gu) if which == 0 else (q_d, s_d)
    q, s = q.cuda(), s.cuda()
    w = GroupedWeight.__new__(GroupedWeight)  # what the kernel reads of a weight set
    w.q, w.scale, w.which, w.shape, w.dtype = q, s, which, q.shape, torch.bfloat16
    w.store = SimpleNamespace(block=(128, 128))
    assert fp8_gemm.applies(w)
    dense = _dequantize_into(torch.empty(q.shape, dtype=torch.bfloat16, device="cuda"), q, s, which, (128, 128))
    counts = [3, 0, 1, 300, 130]
    offs = torch.tensor(counts, device="cuda").cumsum(0).to(torch.int32)
    gen = torch.Generator().manual_seed(7)
    for transposed in (True, False):
        x = torch.randn(sum(counts), q.shape[2] if transposed else q.shape[1], generator=gen).bfloat16().cuda()
        got = fp8_gemm.grouped_mm(x, w, offs, transposed=transposed)
        want, a = torch.empty(got.shape, device="cuda"), 0
        for g, n in enumerate(counts):
            wg = dense[g].float()
            want[a : a + n] = x[a : a + n].float() @ (wg.t() if transposed else wg)
            a += n
        assert got.dtype == torch.bfloat16 and rel(got, want) < 4e-3  # one bf16 rounding of fp32 sums
    none = torch.zeros(5, dtype=torch.int32, device="cuda")
    assert fp8_gemm.grouped_mm(x[:0], w, none, transposed=False).shape == (0, q.shape[2])


@pytest.mark.gpu
@pytest.mark.parametrize("split", ["all-streamed", "resident"])
def test_gpu_fp8_streaming_multiplies_from_e4m3(monkeypatch, split):
    """Where the kernel applies, the streamed FP8 layers have no working buffer, read no row counts on the host, and
    train as the bf16-dequantized model does."""
    from kt_core.streaming import fp8_gemm

    h, i = FUSED_SHAPE["h"], FUSED_SHAPE["i"]
    expert8, expert16 = stored_expert_bytes(h, i, 1, (128, 128)), stored_expert_bytes(h, i, 2)
    fp8, bf16 = Fp8MoE(3, seed=4, **FUSED_SHAPE).cuda(), Fp8MoE(3, seed=4, bf16=True, **FUSED_SHAPE).cuda()
    rt8 = enable_streaming(fp8, device="cuda", **gpu_splits(expert8, expert16)[split])
    rt16 = enable_streaming(bf16, device="cuda", **gpu_splits(expert16, 0)[split])
    assert rt8.store.scratch is None  # no working buffer made
    calls = []
    monkeypatch.setattr(rt8.store, "_dequantize", lambda *a: calls.append("buffer") / 0)
    kernel = fp8_gemm.grouped_mm
    monkeypatch.setattr(fp8_gemm, "grouped_mm", lambda *a, **k: calls.append("kernel") or kernel(*a, **k))
    try:
        x = torch.randn(96, h, generator=torch.Generator().manual_seed(5)).cuda()
        x8, x16 = x.clone().requires_grad_(), x.clone().requires_grad_()
        fp8(x8).backward()
        bf16(x16).backward()
        assert rel(x8.grad, x16.grad) < 1e-2
        for a, b in zip(lora_params(fp8), lora_params(bf16), strict=True):
            assert rel(a.grad, b.grad) < 2e-2
        for model in (fp8, bf16):
            model.zero_grad(set_to_none=True)
        assert train(fp8, steps=3, device="cuda", tokens=96) == pytest.approx(
            train(bf16, steps=3, device="cuda", tokens=96), rel=1e-2
        )
        assert calls and set(calls) == {"kernel"}
    finally:
        rt8.disable()
        rt16.disable()
