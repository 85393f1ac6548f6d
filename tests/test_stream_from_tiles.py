"""Streaming from the packed kernel's copy (kt_core/streaming/tiles.py): host RAM holds a streamed layer's experts once.

The tiles must give back the weights bit for bit (against the C++ packer, bf16 and FP8, gate_up interleaved and down),
padded tiles must be refused, and a run whose layers switch to their packed copy after the first CPU share must
train exactly like one that keeps the weights (slots, residents, the CPU share), with the weights freed. Without CUDA
the "GPU" is the CPU device; the gpu-marked test runs the staging buffer and the side stream on a real one.

Legend: T = tokens, K = experts per token, E = experts, H = hidden, I = expert intermediate, r = LoRA rank.
"""

from __future__ import annotations

import pytest
import torch
from test_streaming import train
from torch import nn
from torch.utils.checkpoint import checkpoint

from kt_core import KTExperts, enable_streaming, kernels
from kt_core.streaming import planner
from kt_core.streaming.tiles import tiles_of, untile_

E, H, I, K, R = 6, 64, 32, 2, 4  # widths whole tiles of 32; fp8 blocks of 32 x 32
FP8 = torch.float8_e4m3fn
PACKED = ("amx_bf16", "avx512_bf16_packed")


def use(kernel: str, monkeypatch) -> str:
    if kernel.startswith("amx") and kernel not in kernels.available_kernels():
        monkeypatch.setenv("KT_AMX_EMULATE", "1")  # the AMX tile code on its scalar model
    if kernel not in kernels.available_kernels():
        pytest.skip(f"{kernel} does not run here")
    return kernel


def experts(kernel: str, dtype, seed: int, *, e: int = E, h: int = H, i: int = I, block=(32, 32)) -> KTExperts:
    gen = torch.Generator().manual_seed(seed)
    gate_up = torch.randn(e, 2 * i, h, generator=gen) / h**0.5  # [E, 2I, H]
    down = torch.randn(e, h, i, generator=gen) / i**0.5  # [E, H, I]
    extra = {"weight_block_size": block} if dtype == FP8 else {}
    m = KTExperts.from_tensors(gate_up, down, dtype=dtype, kernel=kernel, lora_rank=R, lora_alpha=2 * R, **extra)
    with torch.no_grad():
        for p in m.lora.factors():  # B starts at zero: give every factor values so all gradients matter
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return m


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.element_size() == 1 else t.view(torch.int16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, FP8], ids=["bf16", "fp8"])
@pytest.mark.parametrize("kernel", PACKED)
def test_tiles_give_back_the_weights_bit_for_bit(kernel, dtype, monkeypatch):
    m = experts(use(kernel, monkeypatch), dtype, seed=0, e=5, h=96, i=64)  # odd experts, 3 k-blocks, 3 pairs of down
    gate_up, down = tiles_of(m.operator(), m.gate_up_proj, m.down_proj)
    assert gate_up.shape == (5, 2 * 64 * 96 * m.gate_up_proj.element_size())
    assert torch.equal(as_bytes(untile_(torch.empty_like(m.gate_up_proj), gate_up, interleaved=True)),
                       as_bytes(m.gate_up_proj))  # fmt: skip
    assert torch.equal(as_bytes(untile_(torch.empty_like(m.down_proj), down, interleaved=False)), as_bytes(m.down_proj))
    some = torch.tensor([4, 1])  # any experts, in any order
    picked = untile_(torch.empty((2, 2 * 64, 96), dtype=dtype), gate_up[some], interleaved=True)
    assert torch.equal(as_bytes(picked), as_bytes(m.gate_up_proj[some]))


@pytest.mark.parametrize(
    ("dtype", "shape", "block"),
    [
        (torch.bfloat16, dict(h=64, i=40), None),  # gate_up's halves of 40 rows: padded n-tiles
        (torch.bfloat16, dict(h=80, i=32), None),  # down's 80 outputs: an odd number of n-tiles; gate_up's K 80
        (torch.bfloat16, dict(h=64, i=48), None),  # down's 48 inputs: a padded k-block
        (FP8, dict(h=96, i=96), (32, 48)),  # fp8 blocks of 48 inputs: segments that are not whole k-blocks
    ],
    ids=["bf16-rows", "bf16-outputs", "bf16-inputs", "fp8-blocks"],
)
def test_padded_tiles_do_not_stream(dtype, shape, block, monkeypatch):
    m = experts(use("amx_bf16", monkeypatch), dtype, seed=1, block=block, **shape)
    assert tiles_of(m.operator(), m.gate_up_proj, m.down_proj) is None


def test_quantized_copies_do_not_stream(monkeypatch):
    if "avx512_vnni_int8" not in kernels.quantized_kernels():
        pytest.skip("avx512_vnni_int8 does not run here")
    m = experts("avx512_vnni_int8", torch.bfloat16, seed=2)
    assert tiles_of(m.operator(), m.gate_up_proj, m.down_proj) is None


class Toy(nn.Module):
    """bf16 layers of router (softmax top-K) -> experts, residual, checkpointed (as the training plugins run)."""

    def __init__(self, kernel: str, dtype, layers: int = 3):
        super().__init__()
        torch.manual_seed(0)
        self.routers = nn.ModuleList(nn.Linear(H, E, bias=False, dtype=torch.bfloat16) for _ in range(layers))
        self.experts = nn.ModuleList(experts(kernel, dtype, seed=10 + i) for i in range(layers))

    def block(self, i, x):
        w, ids = self.routers[i](x).float().softmax(-1).topk(K, dim=-1)  # [T, K]
        return x + self.experts[i](x, ids, w)

    def forward(self, x):
        for i in range(len(self.experts)):
            x = checkpoint(self.block, i, x, use_reentrant=False)
        return x.float().pow(2).mean()


def slot_bytes(dtype) -> int:
    """Device bytes per expert of slot capacity (both slots; FP8: e4m3 weights and their 32 x 32 block scales)."""
    weights = 3 * I * H * (1 if dtype == FP8 else 2)
    scales = (2 * I // 32) * (H // 32) * 4 + (H // 32) * (I // 32) * 4 if dtype == FP8 else 0
    return 2 * (weights + scales)


def run(kernel: str, dtype, device: str, *, release: bool, residents: int = 0):
    """Trains Toy with the planner's split fixed ("gpu" mode). Without `residents`: 4 experts a slot and the other 2 on
    the CPU, so each layer packs at its first call and streams from the packed copy from step 2 (`release`). With
    `residents`: whole-layer slots and that many hottest experts a layer kept on the device from step 2; `release`
    then frees the weights before streaming starts (as pack_experts(release=True) would, then enable_streaming)."""
    model = Toy(kernel, dtype).to(device)
    for m in model.experts:
        m.to("cpu")  # the experts stay in host memory (KTExperts never moves them)
    per = slot_bytes(dtype)
    fp8_buffer = E * 3 * H * I * 2 if dtype == FP8 else 0  # the bf16 buffer FP8 experts are dequantized into
    budget = E * per + fp8_buffer + residents * len(model.experts) * per // 2 if residents else 4 * per
    if release and residents:
        for m in model.experts:
            m.release_host_weights()
    rt = enable_streaming(model, device=device, mode="gpu", expert_gpu_memory=budget, expert_lora_on_gpu=False)
    rt.release_packed_weights = release
    losses = train(model, lr=0.02, tokens=37, hidden=H, device=device, dtype=torch.bfloat16)  # T = 37: odd
    factors = [p.detach().clone() for m in model.experts for p in m.lora.factors()]
    return rt, model, losses, factors


def check_same_training(kernel, dtype, device, residents=0):
    rt_kept, _, kept_losses, kept_factors = run(kernel, dtype, device, release=False, residents=residents)
    rt, model, losses, factors = run(kernel, dtype, device, release=True, residents=residents)
    assert losses == kept_losses  # bit for bit: the slots hold the same bytes
    for a, b in zip(factors, kept_factors, strict=True):
        assert torch.equal(a, b)
    for i, m in enumerate(model.experts):
        assert rt.store.layers[i].tiles is not None and m.host_weights_released
        assert m.gate_up_proj.is_meta and rt.store.layers[i].gate_up.is_meta  # nothing holds the weights any more
        assert rt_kept.store.layers[i].tiles is None and not rt_kept.layers[i].host_weights_released
    if residents:
        assert rt.history[-1]["resident_per_layer"] == rt_kept.history[-1]["resident_per_layer"]
        assert min(rt.history[-1]["resident_per_layer"]) >= residents
    else:
        assert rt.history[-1]["cpu_slot_share"] > 0  # the CPU share kept computing from the packed copy
    for r in (rt, rt_kept):
        r.disable()


@pytest.mark.parametrize("residents", [0, 1], ids=["slots", "residents"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, FP8], ids=["bf16", "fp8"])
@pytest.mark.parametrize("kernel", PACKED)
def test_layers_stream_from_their_packed_copy_and_train_the_same(kernel, dtype, residents, monkeypatch):
    check_same_training(use(kernel, monkeypatch), dtype, "cpu", residents)


def test_the_weights_stay_unless_the_run_releases_them(monkeypatch):
    """The runtime frees nothing on its own: the training plugins set release_packed_weights as they decide the
    release of CPU-only layers (keep_host_weights, several ranks, FSDP / DeepSpeed keep them)."""
    rt, model, _, _ = run(use("amx_bf16", monkeypatch), torch.bfloat16, "cpu", release=False)
    assert rt.release_packed_weights is False
    assert all(m.packed_operator() is not None and not m.host_weights_released for m in model.experts)
    rt.disable()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, FP8], ids=["bf16", "fp8"])
def test_on_the_gpu_through_a_staging_buffer_of_one_expert(dtype, monkeypatch):
    monkeypatch.setattr(planner, "STAGE_BYTES", 1)  # one expert per group: many groups through one buffer
    check_same_training(use("amx_bf16", monkeypatch), dtype, "cuda", residents=1)


@pytest.mark.parametrize("keep", [False, True], ids=["default", "keep_host_weights"])
def test_training_callbacks_let_streamed_layers_release_as_cpu_only_ones(keep, monkeypatch):
    """KTCallback and use_kt's callback set release_packed_weights at train start from the same rule as the release
    of CPU-only layers (a bf16 model on one process, keep_host_weights off)."""
    from types import SimpleNamespace

    from kt_plugins.hf_trainer import KTCallback
    from kt_plugins.llamafactory.takeover import SETTINGS_ATTR, _training_callback

    model = Toy(use("amx_bf16", monkeypatch), torch.bfloat16)
    model.embed = nn.Embedding(4, H, dtype=torch.bfloat16)
    model.get_input_embeddings = lambda: model.embed
    rt = enable_streaming(model, device="cpu", mode="gpu", expert_gpu_memory=4 * slot_bytes(torch.bfloat16))
    args = SimpleNamespace(fsdp="", deepspeed=None)
    state = SimpleNamespace(is_local_process_zero=False)
    hf = KTCallback(keep_host_weights=keep)
    hf._streaming = rt
    hf.on_train_begin(args, state, None, model=model)
    assert rt.release_packed_weights == (not keep)
    rt.release_packed_weights = None
    model.kt_streaming = rt
    setattr(model, SETTINGS_ATTR, SimpleNamespace(kt_keep_host_weights=keep))
    _training_callback().on_train_begin(args, state, None, model=model)
    assert rt.release_packed_weights == (not keep)
    rt.disable()
