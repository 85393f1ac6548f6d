"""Streaming: the CPU / GPU split of MoE layers must not change results.

Without CUDA the "GPU side" runs with plain torch on the CPU device, so the planner, the split, the
grouped-GEMM math, the LoRA-gradient accumulation and the slot / prefetch bookkeeping all run here in fp32.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from kt_core import KTExperts
from kt_core.streaming import CostModel, enable_streaming, plan_layer
from kt_core.streaming.store import pin_in_place, quantize_rows

E, H, I, K, R = 8, 32, 16, 2, 4


def make_experts(seed: int, dtype=torch.float32, kernel: str = "auto") -> KTExperts:
    gen = torch.Generator().manual_seed(seed)
    gate_up = torch.randn(E, 2 * I, H, generator=gen) * 0.2
    down = torch.randn(E, H, I, generator=gen) * 0.2
    m = KTExperts.from_tensors(gate_up.to(dtype), down.to(dtype), kernel=kernel, lora_rank=R, lora_alpha=2 * R)
    with torch.no_grad():
        for p in m.lora.factors():  # B starts at zero: give every factor values so all gradients matter
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return m


class ToyMoE(nn.Module):
    """Layers of: router (softmax top-K) -> experts, residual; optional gradient checkpointing."""

    def __init__(self, layers: int, seed: int = 0, checkpointing: bool = True):
        super().__init__()
        torch.manual_seed(seed)
        self.routers = nn.ModuleList(nn.Linear(H, E, bias=False) for _ in range(layers))
        self.experts = nn.ModuleList(make_experts(seed + i) for i in range(layers))
        self.head = nn.Linear(H, 1)
        self.checkpointing = checkpointing

    def block(self, i, x):
        probs = self.routers[i](x).softmax(-1)
        w, ids = probs.topk(K, dim=-1)  # [T, K]
        return x + self.experts[i](x, ids, w)

    def forward(self, x):
        for i in range(len(self.experts)):
            x = checkpoint(self.block, i, x, use_reentrant=False) if self.checkpointing else self.block(i, x)
        return self.head(x).pow(2).mean()


def lora_params(model):
    return [p for m in model.modules() if isinstance(m, KTExperts) for p in m.lora.factors()]


def train(
    model,
    steps: int = 4,
    lr: float = 0.05,
    seed: int = 0,
    *,
    tokens: int = 24,
    hidden: int = H,
    device="cpu",
    dtype=torch.float32,
) -> list[float]:
    """Adam on the expert-LoRA factors and the routers; each step's input [tokens, hidden] drawn from `seed`."""
    params = lora_params(model) + list(model.routers.parameters())
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        x = torch.randn(tokens, hidden, generator=gen).to(device, dtype)
        loss = model(x)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


# Settings of the split: everything on the CPU, everything streamed, half streamed, residents, the planner.
def planner_cost() -> CostModel:
    """Speeds under which the planner gives these toy layers a CPU share (slow PCIe)."""
    return CostModel(pcie_bytes_per_s=2e7, cpu_flops=1e9, cpu_expert_s=0.0, cpu_call_s=0.0)


SPLITS = {
    "cpu": dict(mode="cpu"),
    "all-streamed": dict(mode="gpu"),
    "half-streamed": dict(mode="gpu", expert_gpu_memory=2 * 4 * (2 * I * H + H * I) * 4),
    "resident": dict(mode="gpu", expert_gpu_memory=2 * E * (3 * I * H) * 4 + 3 * 3 * 3 * I * H * 4),
    "planner": dict(mode="auto", cost=planner_cost()),
}


@pytest.fixture(scope="module")
def reference_run():
    model = ToyMoE(3)
    return train(model), model


@pytest.mark.parametrize("split", sorted(SPLITS))
def test_loss_curve_and_lora_match_cpu_only(split, reference_run):
    ref_losses, ref_model = reference_run
    model = ToyMoE(3)
    rt = enable_streaming(model, device="cpu", **SPLITS[split])
    losses = train(model)
    # fp32 sums in another order, amplified by Adam: the C++ operator and the plain-torch reference (both
    # exact, both CPU) already differ by 3.4e-5 on this run.
    assert losses == pytest.approx(ref_losses, rel=2e-4, abs=1e-6)
    for a, b in zip(lora_params(model), lora_params(ref_model), strict=True):
        assert ((a - b).norm() / b.norm()).item() < 1e-3  # Adam moves a near-zero element either way
    reports = rt.history
    assert len(reports) == 3  # steps 1-3 closed by the next step's first layer
    streamed = reports[-1]["streamed_per_layer"]
    if split == "cpu":
        assert streamed == [0, 0, 0] and reports[-1]["cpu_slot_share"] == 1.0
    elif split == "all-streamed":
        assert reports[-1]["cpu_slot_share"] == 0.0 and reports[-1]["pcie_gb"] > 0
    elif split == "half-streamed":
        assert all(0 < n <= 4 for n in streamed) and 0 < reports[-1]["cpu_slot_share"] < 1
    elif split == "resident":
        assert reports[-1]["resident_per_layer"] == [3, 3, 3]
    rt.disable()
    assert all(m.gpu_share is None for m in model.experts)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradients_match_per_layer(checkpointing):
    """dx, d(routing weights) and LoRA gradients of a mixed split equal the CPU operator's, one pass."""
    ref, ours = ToyMoE(2, seed=3, checkpointing=checkpointing), ToyMoE(2, seed=3, checkpointing=checkpointing)
    enable_streaming(ours, device="cpu", **SPLITS["half-streamed"])
    x = torch.randn(40, H, generator=torch.Generator().manual_seed(5))
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref(xr).backward()
    ours(xo).backward()
    torch.testing.assert_close(xo.grad, xr.grad, rtol=1e-5, atol=1e-6)
    for a, b in zip(ours.parameters(), ref.parameters(), strict=True):
        if b.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)


def test_fused_steps_take_the_lora_term_in_their_pass():
    """silu_mul / swiglu_backward given the LoRA term (`add`) equal adding it first; gu holds the sum only when asked
    (the Triton kernels against these steps: tests/test_streaming_gpu.py)."""
    from kt_core.streaming import fused

    gen = torch.Generator().manual_seed(3)
    gu, add, dh, add_dh = (torch.randn(*s, generator=gen).bfloat16() for s in [(7, 10), (7, 10), (7, 5), (7, 5)])
    for into in (False, True):
        g = gu.clone()
        assert torch.equal(fused.silu_mul(g, add, sum_into_gu=into), fused.silu_mul(gu + add))
        assert torch.equal(g, gu + add if into else gu)
    assert torch.equal(fused.swiglu_backward(dh, gu, add_dh)[0], fused.swiglu_backward(dh + add_dh, gu)[0])


def test_swiglu_backward_takes_the_routing_weight_gradient_from_dh_and_h():
    """With the rows' routing weights: d(gate | up) for those weights, and <dh, h> (h rounded as the forward left
    it), which equals <dy, out> for out = h @ w2^T: the backward needs no expert output."""
    from kt_core.streaming import fused

    gen = torch.Generator().manual_seed(8)
    S, I_, H_ = 9, 6, 5
    gu, dh_add = torch.randn(S, 2 * I_, generator=gen).bfloat16(), torch.randn(S, I_, generator=gen).bfloat16()
    w2, dy = torch.randn(H_, I_, generator=gen).double(), torch.randn(S, H_, generator=gen).double()
    weights = torch.rand(S, generator=gen)
    dh = (dy @ w2).bfloat16()
    dgu, dots = fused.swiglu_backward(dh, gu, dh_add, w=weights)
    d = (dh + dh_add).float()  # the sum rounded to bf16, as the kernel rounds it
    h = fused.silu_mul(gu).float()
    torch.testing.assert_close(dots, (d * h).sum(-1), rtol=1e-6, atol=1e-6)
    ref, _ = fused.swiglu_backward(d * weights[:, None], gu.float())
    torch.testing.assert_close(dgu.float(), ref, rtol=1e-2, atol=1e-2)  # one bf16 rounding
    _, plain = fused.swiglu_backward(dh, gu, w=weights)
    torch.testing.assert_close(plain.double(), (dy * (h.double() @ w2.t())).sum(-1), rtol=2e-2, atol=2e-2)
    assert fused.swiglu_backward(dh, gu)[1] is None


def test_state_dict_and_module_names_unchanged():
    model = ToyMoE(2)
    before = copy.deepcopy(model.state_dict())
    enable_streaming(model, device="cpu", mode="gpu")
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(isinstance(m, KTExperts) for m in model.experts)


def test_planner_streams_the_hottest_experts():
    cost = CostModel(pcie_bytes_per_s=1e9, cpu_flops=1e11, gpu_flops=1e14, cpu_expert_s=0.0)
    counts = [100, 0, 5, 300, 50, 1, 0, 200]
    kw = dict(hidden=2048, intermediate=1408, expert_bytes=17_301_504, cost=cost)
    p = plan_layer(counts, capacity=8, **kw)
    assert p.stream == sorted(p.stream, key=lambda e: -counts[e])  # hottest first
    assert set(p.stream) <= {0, 3, 4, 7, 2}
    assert p.stream[:1] == [3]
    assert plan_layer(counts, capacity=2, **kw).stream == [3, 7][: len(plan_layer(counts, capacity=2, **kw).stream)]
    assert plan_layer(counts, capacity=8, mode="cpu", **kw).stream == []
    assert sorted(plan_layer(counts, capacity=8, mode="gpu", **kw).stream) == [0, 2, 3, 4, 5, 7]  # routed ones
    assert 3 not in plan_layer(counts, capacity=8, resident=[3], **kw).stream
    fast_pcie = CostModel(pcie_bytes_per_s=1e12, cpu_flops=1e11, gpu_flops=1e14)
    slow_pcie = CostModel(pcie_bytes_per_s=1e6, cpu_flops=1e13, gpu_flops=1e14)
    assert len(plan_layer(counts, capacity=8, **{**kw, "cost": fast_pcie}).stream) == 6
    assert plan_layer(counts, capacity=8, **{**kw, "cost": slow_pcie}).stream == []
    # A CPU share pays a fixed cost per call: with 1 slot left for the CPU, streaming that expert too wins.
    calls = CostModel(pcie_bytes_per_s=1e11, cpu_flops=1e11, gpu_flops=1e14, cpu_expert_s=0.0, cpu_call_s=15e-3)
    assert len(plan_layer([100, 1], capacity=2, **{**kw, "cost": calls}).stream) == 2
    assert (
        len(
            plan_layer(
                [100, 1], capacity=2, **{**kw, "cost": CostModel(**{**calls.__dict__, "cpu_call_s": 0.0})}
            ).stream
        )
        == 1
    )


def test_budget_errors_name_the_argument():
    with pytest.raises(ValueError, match="expert_gpu_memory"):
        enable_streaming(ToyMoE(1), device="cpu", expert_gpu_memory="ten gigs")
    with pytest.raises(ValueError, match="keep_bytes"):
        enable_streaming(ToyMoE(1), device="cpu", keep_bytes="many")
    with pytest.raises(ValueError, match="quantize"):
        enable_streaming(ToyMoE(1), device="cpu", quantize="int3")
    with pytest.raises(ValueError, match="no KTExperts"):
        enable_streaming(nn.Linear(2, 2), device="cpu")


def test_int8_streaming_error_is_small_and_stated():
    w = (torch.randn(4, 64, 128) * 0.02).to(torch.bfloat16)
    q, s = quantize_rows(w)
    back = q.float() * s[..., None]
    rel = ((back - w.float()).norm() / w.float().norm()).item()
    assert rel < 1e-2  # per-row int8 on Gaussian weights: ~8e-3 (the figure enable_streaming documents)
    model, ref = ToyMoE(2, seed=7), ToyMoE(2, seed=7)
    enable_streaming(model, device="cpu", mode="gpu", quantize="int8")
    x = torch.randn(32, H, generator=torch.Generator().manual_seed(2))
    assert model(x).item() == pytest.approx(ref(x).item(), rel=2e-2)


def test_pinning_refused_falls_back_with_a_message(monkeypatch, caplog):
    class Cudart:
        @staticmethod
        def cudaHostRegister(ptr, nbytes, flags):
            return 2  # cudaErrorMemoryAllocation

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: Cudart)
    t = torch.zeros(1024)
    with caplog.at_level(logging.WARNING, logger="kt_core.streaming.store"):
        assert pin_in_place(t) is False
    assert "cudaHostRegister refused" in caplog.text and "pageable" in caplog.text


def test_step_log_shows_the_split(caplog):
    model = ToyMoE(2)
    with caplog.at_level(logging.INFO, logger="kt_core.streaming"):
        enable_streaming(model, device="cpu", **SPLITS["half-streamed"])
        train(model, steps=2)
    text = caplog.text
    assert "streaming step 1" in text and "CPU" in text and "PCIe" in text and "GPU" in text
    assert "streamed experts/layer" in text


def test_pinning_already_registered_memory_is_used_as_is(monkeypatch, caplog):
    class Cudart:
        @staticmethod
        def cudaHostRegister(ptr, nbytes, flags):
            return 712  # cudaErrorHostMemoryAlreadyRegistered: someone else pinned it

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: Cudart)
    with caplog.at_level(logging.WARNING, logger="kt_core.streaming.store"):
        assert pin_in_place(torch.zeros(1024)) is None  # usable, and not ours to unregister
    assert "refused" not in caplog.text


class _Counter:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


def test_all_streamed_layers_take_the_device_path(monkeypatch):
    """Everything streamed: no routing to the host, no CPU hand-off, and the backward of a checkpointed layer
    reuses its recomputation's intermediates."""
    from kt_core.experts import bridge

    model = ToyMoE(3)
    rt = enable_streaming(model, device="cpu", mode="gpu")
    to_host, submit = _Counter(bridge.stage_to_host), _Counter(rt.submit_cpu)
    monkeypatch.setattr(bridge, "stage_to_host", to_host)
    monkeypatch.setattr(rt, "submit_cpu", submit)
    take = _Counter(rt.take_kept)
    reused = []
    monkeypatch.setattr(rt, "take_kept", lambda *a: reused.append(take(*a)) or reused[-1])
    train(model, steps=2)
    assert to_host.calls == 0 and submit.calls == 0
    assert take.calls == 2 * 3 and all(r is not None for r in reused)  # one per layer-backward, all reused
    assert rt.history[-1]["streamed_per_layer"] == [E, E, E]


@pytest.mark.parametrize("split", ["all-streamed", "half-streamed"])
def test_a_layers_uploads_and_host_wait_come_before_the_next_layers_copy(monkeypatch, split):
    """Host-to-device copies share the copy engine whatever their stream: a layer's factor upload queued behind
    the next layer's weights would hold its compute until that copy ends (copies and compute serialized), and a
    host split's wait for its routing would last as long."""
    from kt_core.experts import bridge

    model = ToyMoE(3)
    rt = enable_streaming(model, device="cpu", **SPLITS[split])
    events = []
    upload, stage, load, begin = bridge.upload_factors, bridge.stage_to_host, rt.store.load, rt.begin
    monkeypatch.setattr(bridge, "upload_factors", lambda *a: events.append(("factors", None)) or upload(*a))
    monkeypatch.setattr(bridge, "stage_to_host", lambda *a: events.append(("to host", None)) or stage(*a))
    monkeypatch.setattr(rt.store, "load", lambda layer, *a, **k: events.append(("load", layer)) or load(layer, *a, **k))
    monkeypatch.setattr(
        rt, "begin", lambda layer, ids, phase: events.append((phase, layer)) or begin(layer, ids, phase)
    )
    ready = rt.store.ready
    monkeypatch.setattr(rt.store, "ready", lambda layer: events.append(("ready", layer)) or ready(layer))
    train(model, steps=2)
    for i, (what, _) in enumerate(events):  # the compute stream waits for a slot only after the host has its routing
        if what == "to host":
            call = max(j for j in range(i) if events[j][0] in ("fwd", "recompute", "bwd"))
            assert ("ready", events[call][1]) not in events[call:i], events[call : i + 1]
    calls = [i for i, (what, _) in enumerate(events) if what in ("fwd", "recompute", "bwd")]
    assert len(calls) == 3 * 2 * 3  # forward, recomputation and backward of 3 layers, 2 steps
    split_calls = 0
    for n, i in enumerate(calls):
        (_, layer), end = events[i], calls[n + 1] if n + 1 < len(calls) else len(events)
        marks = [j for j in range(i, end) if events[j][0] in ("factors", "to host")]
        split_calls += any(events[j][0] == "to host" for j in marks)
        kinds = [events[j][0] for j in marks]
        assert kinds in ([], ["factors"], ["to host"], ["to host", "factors"]), kinds  # uploads after the host wait
        if marks:  # nothing but its own weights copied before them
            assert all(e == ("load", layer) for e in events[i + 1 : marks[-1]] if e[0] == "load"), events[i:end]
    assert sum(what == "load" for what, _ in events) >= 2 * 3  # the prefetches still happen
    assert (split_calls > 0) == (split == "half-streamed")


def test_plans_are_made_once_per_step(monkeypatch):
    from kt_core.streaming import runtime

    model = ToyMoE(2)
    rt = enable_streaming(model, device="cpu", **SPLITS["planner"])
    plans = _Counter(runtime.plan_layer)
    monkeypatch.setattr(runtime, "plan_layer", plans)
    train(model, steps=3)
    assert plans.calls <= 2 * 3  # once per layer and step, however many calls and prefetches
    assert len(rt.history) == 2


def assert_same_gradients(ours, ref, *, seed: int) -> None:
    """Two forward + backward passes of 40 random tokens through both models (LoRA gradients accumulate in `.grad`
    at the end of each): the same input and parameter gradients."""
    gen = torch.Generator().manual_seed(seed)
    xr = torch.randn(40, H, generator=gen).requires_grad_()
    xo = xr.detach().clone().requires_grad_()
    for _ in range(2):
        ref(xr).backward()
        ours(xo).backward()
    torch.testing.assert_close(xo.grad, xr.grad, rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(ours.named_parameters(), ref.parameters(), strict=True):
        assert (a.grad is None) == (b.grad is None), name
        if b.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)


# One piece of 7 sorted slots keeps 7 * 2I fp32 values (its gu; h is recomputed, the output is not needed).
PIECE_BYTES = 7 * 2 * I * 4


@pytest.mark.parametrize("keep_pieces", [0, 2, 100])
def test_device_path_in_pieces_matches_cpu_only(monkeypatch, keep_pieces):
    """Slots processed in pieces, some kept from the recomputation and the rest recomputed in the backward,
    over two backward passes (LoRA gradients accumulate in `.grad` at the end of each): same gradients."""
    from kt_core.streaming import gpu_experts, share

    ref, ours = ToyMoE(2, seed=11), ToyMoE(2, seed=11)
    rt = enable_streaming(ours, device="cpu", mode="gpu", keep_bytes=keep_pieces * PIECE_BYTES)
    rt.piece_rows = 7
    forwards = _Counter(share.expert_mlp_forward)
    monkeypatch.setattr(share, "expert_mlp_forward", forwards)
    recomputed = _Counter(gpu_experts.backward_intermediates)
    monkeypatch.setattr(gpu_experts, "backward_intermediates", recomputed)
    assert_same_gradients(ours, ref, seed=4)
    pieces = -(-40 * K // 7)  # 12 pieces of at most 7 slots
    kept = min(keep_pieces, pieces)
    assert forwards.calls == 2 * 2 * (pieces + pieces)  # passes x layers x (fwd, recompute)
    assert recomputed.calls == 2 * 2 * (pieces - kept)  # the backward's gate/up side of the pieces not kept


def test_mixed_split_parts_run_in_pieces(monkeypatch):
    """A layer split between the CPU and GPU parts computes each part in pieces of at most `piece_rows` slots too
    (the memory plan counts one piece's intermediates; a whole part at 32k tokens of DeepSeek-V3 held ~10 GiB
    more): gradients equal the CPU-only model's over two backward passes."""
    from kt_core.streaming import share

    ref, ours = ToyMoE(2, seed=12), ToyMoE(2, seed=12)
    rt = enable_streaming(ours, device="cpu", **SPLITS["half-streamed"])
    rt.piece_rows = 5
    rows = []
    for name in ("expert_mlp_forward", "expert_mlp_backward"):
        fn = getattr(share, name)
        monkeypatch.setattr(share, name, lambda xs, *a, _fn=fn, **k: rows.append(xs.shape[0]) or _fn(xs, *a, **k))
    parts = _Counter(share._StreamedCall._parts_forward)
    monkeypatch.setattr(share._StreamedCall, "_parts_forward", lambda self, *a, **k: parts(self, *a, **k))
    assert_same_gradients(ours, ref, seed=5)
    assert parts.calls > 0  # the layers did split on the host
    assert rows and max(rows) <= 5 and sum(r == 5 for r in rows) > 1  # several full pieces, none larger


@pytest.mark.parametrize(
    ("packed", "steps_left", "cpu_share"),
    [(False, 1, False), (False, None, True), (False, 10**9, True), (True, 1, True)],
)
def test_a_cpu_share_packs_the_layer_only_where_that_pays(monkeypatch, caplog, packed, steps_left, cpu_share):
    """A layer whose experts all fit a slot and whose CPU operator is not built yet gets a CPU share only where the
    share's modeled saving over the steps left pays for the packing (a full-width FP8 DeepSeek-V3 layer took ~36 s
    inside a step for a share of 0% of its slots); with the operator built, or the steps left unknown, the planner
    splits as before. Either way training equals the CPU-only model's."""
    ref, ours = ToyMoE(2, seed=13), ToyMoE(2, seed=13)
    monkeypatch.setattr(KTExperts, "pending_pack_bytes", lambda self: 0 if packed else 10**12)
    for side in ("cpu", "gpu", "pcie"):  # the planner keeps its given speeds (no timings of this machine)
        monkeypatch.setattr(CostModel, f"observe_{side}", lambda self, *args: None)
    rt = enable_streaming(ours, device="cpu", mode="auto", cost=planner_cost())
    assert rt.store.capacity >= E  # the whole layer fits: streaming it all is the alternative
    if steps_left is not None:
        rt.set_steps_left(steps_left)
    with caplog.at_level(logging.INFO, logger="kt_core.streaming"):
        assert train(ours) == pytest.approx(train(ref), rel=2e-4, abs=1e-6)
    shares = [r["cpu_slot_share"] for r in rt.history]
    assert (max(shares) > 0) == cpu_share, shares
    announced = any("its CPU operator packs now" in r.getMessage() for r in caplog.records)
    assert announced == (cpu_share and not packed)


def test_steps_left_count_accumulation():
    rt = enable_streaming(ToyMoE(1), device="cpu", mode="auto")
    rt.set_steps_left(10, accumulation=4)
    assert rt.remaining_steps == 40
    rt.set_steps_left(-3)
    assert rt.remaining_steps == 0


def test_planner_gives_no_small_cpu_share_to_a_gpu_bound_layer():
    """A GPU-bound layer with two cold experts: handing them to the CPU would save microseconds of GPU time
    and cost the host path's synchronisation, so every expert is streamed."""
    cost = CostModel(pcie_bytes_per_s=55e9, cpu_flops=0.8e12, gpu_flops=50e12)
    counts = [800.0] * 126 + [3.0, 2.0]
    kw = dict(hidden=2048, intermediate=768, expert_bytes=9_437_184, capacity=128, cost=cost)
    assert len(plan_layer(counts, **kw).stream) == 128
    # a slow GPU and PCIe against a fast CPU: a large CPU share still pays
    fast_cpu = CostModel(pcie_bytes_per_s=1e9, cpu_flops=5e13, gpu_flops=1e12)
    assert len(plan_layer(counts, **{**kw, "cost": fast_cpu}).stream) < 128


def test_residents_keep_the_device_path(monkeypatch):
    """Residents plus every other expert streamed: the slot holds the whole layer (residents copied in on the
    device), so no call splits on the host; PCIe carries only the streamed experts; results stay exact."""
    from kt_core.streaming import share

    parts = []
    monkeypatch.setattr(share._StreamedCall, "_parts_forward", lambda self, *a, **k: parts.append(1) / 0)
    ref, ours = ToyMoE(3), ToyMoE(3)
    rt = enable_streaming(ours, device="cpu", **SPLITS["resident"])
    assert train(ours) == pytest.approx(train(ref), rel=2e-4, abs=1e-6)
    last = rt.history[-1]
    assert last["resident_per_layer"] == [3, 3, 3] and last["streamed_per_layer"] == [E - 3] * 3
    expert_bytes = 3 * I * H * 4  # gate, up and down of one fp32 expert
    loads = last["pcie_gb"] * 1e9 / ((E - 3) * expert_bytes)  # whole-layer loads that copied no resident
    assert loads >= 1 and loads == pytest.approx(round(loads), abs=1e-6)
    assert not parts


def test_slot_loads_make_no_tensor_from_host_values(monkeypatch):
    """A tensor made from Python values on a CUDA device is a blocking copy: made while a layer's copy is being
    queued, it held the host until the copy was done, and the compute it had not queued yet waited with it.
    The per-call path (load, acquire, the residents' device copies) must use tensors made between steps."""
    import sys

    ours = ToyMoE(3)
    rt = enable_streaming(ours, device="cpu", **SPLITS["resident"])
    train(ours, steps=2)  # residents chosen after step 1
    assert all(len(layer.resident) == 3 for layer in rt.store.layers)
    made, tensor = [], torch.tensor

    def traced(*args, **kwargs):
        made.append(sys._getframe(1).f_code.co_name)
        return tensor(*args, **kwargs)

    for name in ("load", "acquire", "_copy", "_fill_residents", "release"):
        method = getattr(rt.store, name)
        monkeypatch.setattr(rt.store, name, lambda *a, _m=method, **k: _trace(_m, traced, *a, **k))
    train(ours, steps=1)
    assert made == []


def test_a_whole_layer_load_copies_runs_of_experts_not_each_expert(monkeypatch):
    """Each host-to-device copy is a launch on the host: a whole-layer slot around its residents takes one copy
    per run of consecutive streamed experts and tensor, and still holds every expert's exact weights."""
    from kt_core.streaming import store as store_mod

    ours = ToyMoE(3)
    enable_streaming(ours, device="cpu", **SPLITS["resident"])
    train(ours, steps=2)  # residents chosen after step 1
    copies = []
    original = store_mod.ExpertStore._copy

    def counted(self, slot, srcs, content, resident):
        calls = []
        copy_ = torch.Tensor.copy_
        monkeypatch.setattr(torch.Tensor, "copy_", lambda t, *a, **k: calls.append(1) or copy_(t, *a, **k))
        try:
            original(self, slot, srcs, content, resident)
        finally:
            monkeypatch.setattr(torch.Tensor, "copy_", copy_)
        streamed = [e for e in content if e not in resident]
        runs = sum(1 for i, e in enumerate(streamed) if i == 0 or e != streamed[i - 1] + 1)
        copies.append((len(calls), runs * len(srcs), len(streamed) * len(srcs)))
        for j, e in enumerate(content):  # the residents were filled from their device copies, the same values
            assert all(torch.equal(buf[j], src[e]) for buf, src in zip(slot.bufs, srcs, strict=True))

    monkeypatch.setattr(store_mod.ExpertStore, "_copy", counted)
    train(ours, steps=1)
    assert copies and all(n == expected < per_expert for n, expected, per_expert in copies)


def _trace(method, traced, *args, **kwargs):
    original = torch.tensor
    torch.tensor = traced
    try:
        return method(*args, **kwargs)
    finally:
        torch.tensor = original


EXPERT_BYTES = 3 * I * H * 4  # gate, up and down of one fp32 expert


@pytest.mark.parametrize(
    ("budget", "peak", "limit", "residents"),
    [
        (SPLITS["resident"]["expert_gpu_memory"], 0, 2**30, 3),  # room for all the budget allows
        (SPLITS["resident"]["expert_gpu_memory"], 2**30 - 2**28 - 3 * 2 * EXPERT_BYTES, 2**30, 2),  # room for 2
        (None, 2**30 - 2**28 - 5 * 3 * EXPERT_BYTES, 2**30, 5),  # no budget: the limit alone decides
        (None, 2**31, 2**30, 0),  # step 1 alone is over the limit: no residents, a warning
    ],
)
def test_gpu_memory_limit_sizes_residents_from_the_first_step(budget, peak, limit, residents, caplog):
    ref, ours = ToyMoE(3), ToyMoE(3)
    rt = enable_streaming(ours, device="cpu", mode="gpu", expert_gpu_memory=budget, gpu_memory_limit=limit)
    rt.peak_bytes = lambda: peak  # what step 1 measured (torch.cuda.max_memory_allocated on a GPU)
    with caplog.at_level(logging.INFO, logger="kt_core.streaming"):
        assert train(ours) == pytest.approx(train(ref), rel=2e-4, abs=1e-6)
    assert rt.history[-1]["resident_per_layer"] == [residents] * 3
    assert f"{residents} resident experts per layer" in caplog.text
    assert ("over gpu_memory_limit" in caplog.text) == (peak > limit)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_autograd_grad_gets_the_device_paths_lora_gradients(checkpointing):
    """All experts streamed (the device path defers LoRA gradients to `.grad` at the end of `backward()`):
    `torch.autograd.grad` with the factors as inputs returns them, and `.grad` stays untouched either way."""
    ref, ours = ToyMoE(2, seed=4, checkpointing=checkpointing), ToyMoE(2, seed=4, checkpointing=checkpointing)
    enable_streaming(ours, device="cpu", **SPLITS["all-streamed"])
    x = torch.randn(30, H, generator=torch.Generator().manual_seed(6))
    want = torch.autograd.grad(ref(x), lora_params(ref))
    got = torch.autograd.grad(ours(x), lora_params(ours))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    x_leaf = x.clone().requires_grad_()
    torch.autograd.grad(ours(x_leaf), [x_leaf])  # the factors are not asked for
    assert all(p.grad is None for p in lora_params(ours))
    ours(x).backward()  # and backward() still fills .grad
    for p, w in zip(lora_params(ours), want, strict=True):
        torch.testing.assert_close(p.grad, w, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("budget", "quantize", "limit"),
    [
        (SPLITS["half-streamed"]["expert_gpu_memory"], None, None),
        (SPLITS["resident"]["expert_gpu_memory"], None, None),
        (SPLITS["resident"]["expert_gpu_memory"] + 12345, "int8", None),
        (None, None, None),
        (None, None, 6 * EXPERT_BYTES * 2 + 7),  # the limit alone sizes the slots: half of it, 3 experts
    ],
)
def test_memory_plan_sizes_the_expert_memory_as_enable_streaming_does(budget, quantize, limit):
    """The plan made before loading (kt_core.streaming.memory_plan) gives the slots and residents their bytes."""
    from kt_core.streaming import memory_plan as mp

    rt = enable_streaming(
        ToyMoE(3), device="cpu", mode="gpu", expert_gpu_memory=budget, quantize=quantize, gpu_memory_limit=limit
    )
    dims = mp.ModelDims(hidden=H, vocab=1, heads=1, layers=(), experts=E, top_k=K, expert_intermediate=I,
                        expert_item=4, moe_layers=3)  # fmt: skip
    streaming = mp.StreamingSizes(expert_gpu_memory=budget, quantize=quantize, mode="gpu")
    inputs = mp.PlanInputs(dims, mp.RunShape(batch=1, seq_len=None), weights_bytes=0, streaming=streaming, device="cpu")
    plan = mp.plan_gpu_memory(inputs, limit)
    assert (plan.capacity, plan.parts["streaming slots"]) == (rt.store.capacity, rt.store.gpu_bytes())
    if limit is None:  # (under a limit the plan fits the residents itself; the runtime does after step 1)
        assert plan.residents == rt.resident_per_layer
    rt.disable()


def test_expert_lora_stays_in_host_memory_where_the_gpu_cannot_hold_it():
    """The factors move only to a CUDA device and never with mode "cpu"; asking for it elsewhere says why."""
    model = ToyMoE(2)
    factors = lora_params(model)
    rt = enable_streaming(model, device="cpu", mode="gpu")  # auto: the CPU standing in for a GPU is host memory
    try:
        assert all(f.device.type == "cpu" for f in factors)
    finally:
        rt.disable()
    with pytest.raises(ValueError, match=r"expert_lora_on_gpu=True.*not a CUDA device"):
        enable_streaming(ToyMoE(2), device="cpu", mode="gpu", expert_lora_on_gpu=True)
    with pytest.raises(ValueError, match=r"expert_lora_on_gpu=True.*mode 'cpu'"):
        enable_streaming(ToyMoE(2), device="cpu", mode="cpu", expert_lora_on_gpu=True)
    lora = model.experts[0].lora
    f = lora.gate_up_A
    f.grad = torch.ones_like(f)
    lora.place_("cpu")  # to a GPU and back: tests/test_streaming_gpu.py
    assert lora.gate_up_A is f and lora.device.type == "cpu" and f.grad.device.type == "cpu"


def test_training_callbacks_tell_the_runtime_the_steps_left():
    """KTCallback and use_kt's callback pass the optimizer steps left times the accumulation on each step."""
    from types import SimpleNamespace

    from kt_plugins.hf_trainer import KTCallback
    from kt_plugins.llamafactory.takeover import _training_callback

    model = ToyMoE(1)
    rt = enable_streaming(model, device="cpu", mode="auto")
    args = SimpleNamespace(gradient_accumulation_steps=3)
    state = SimpleNamespace(max_steps=10, global_step=4)
    hf = KTCallback()
    hf._streaming = rt
    hf.on_step_begin(args, state, None)
    assert rt.remaining_steps == 18
    model.kt_streaming = rt
    state.global_step = 9
    _training_callback().on_step_begin(args, state, None, model=model)
    assert rt.remaining_steps == 3
