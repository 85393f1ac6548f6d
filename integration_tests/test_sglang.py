"""SGLang integration on the CPU: stock sglang (0.5.20 / 0.5.21, torch 2.13.0 CPU) with kt_plugins.sglang.

Run in the SGLang environment (scripts/setup_sglang.sh):
    .venv-sglang/bin/python -m pytest integration_tests/test_sglang.py -m integration

- FusedMoE with KTExpertsMethod against SGLang's own unquantized method on the same random weights, loaded
  through the layer's weight_loader as a checkpoint would be (all experts on the CPU, the first N on the
  GPU method, a chosen set on it), in fp32 and bf16; plus a PEFT-format expert LoRA.
- Block-FP8 checkpoints (DeepSeek-V3's e4m3 weights with 128x128 weight_scale_inv) under SGLang's Fp8MoEMethod:
  every expert on the CPU, kept in FP8, against SGLang's native unquantized method on the dequantized weights
  (with and without expert LoRA); with GPU experts, which compact rows got which experts' weights and scales
  (SGLang's FP8 kernels need CUDA: no forward there); and the refusals (missing scales, per-tensor FP8).
- `python -m sglang.launch_server --help` lists the flags (the entry point is discovered as installed).
- The whole route in fresh processes: flags parsed by SGLang's parser, exported, and a `spawn`ed process
  (as SGLang starts its schedulers) that loads the plugins, builds a FusedMoE and gets our method.

Legend: T = tokens, K = experts per token, E = experts, H = hidden, I = expert intermediate, r = LoRA rank.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.integration

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

if importlib.util.find_spec("sglang") is None:
    pytest.skip("needs the SGLang environment: scripts/setup_sglang.sh", allow_module_level=True)

from sglang_cpu import init_sglang_cpu, install_torchvision_stubs, write_model_config  # noqa: E402

install_torchvision_stubs()  # before anything imports torchvision (sglang, transformers' image utils)

from kt_core.peft import expert_factors_to_peft  # noqa: E402
from kt_plugins.sglang.options import ENV_VAR, KTExpertsOptions  # noqa: E402

E, H, I, K = 8, 64, 32, 2


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = write_model_config(
        tmp_path_factory.mktemp("tiny_qwen3_moe"), num_experts=E, hidden=H, intermediate=I, top_k=K
    )
    init_sglang_cpu(path)
    return path


def _random_experts(dtype, seed=0, hidden=H, intermediate=I):
    g = torch.Generator().manual_seed(seed)
    gate = torch.randn(E, intermediate, hidden, generator=g) / hidden**0.5  # [E, I, H]
    up = torch.randn(E, intermediate, hidden, generator=g) / hidden**0.5  # [E, I, H]
    down = torch.randn(E, hidden, intermediate, generator=g) / intermediate**0.5  # [E, H, I]
    return gate.to(dtype), up.to(dtype), down.to(dtype)


def _build_layer(dtype, quant_method=None, hidden=H, intermediate=I):
    from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE

    return FusedMoE(
        num_experts=E,
        hidden_size=hidden,
        intermediate_size=intermediate,
        layer_id=0,
        top_k=K,
        params_dtype=dtype,
        quant_method=quant_method,
        prefix="model.layers.0.mlp.experts",
    )


def _load(layer, gate, up, down):
    # As a model's load_weights does: one call per (expert, shard), SGLang's parameter names.
    for e in range(E):
        for param, tensor, shard in (
            (layer.w13_weight, gate[e], "w1"),
            (layer.w13_weight, up[e], "w3"),
            (layer.w2_weight, down[e], "w2"),
        ):
            name = "model.layers.0.mlp.experts." + ("w13_weight" if shard != "w2" else "w2_weight")
            param.weight_loader(param, tensor, name, shard_id=shard, expert_id=e)
    layer.quant_method.process_weights_after_loading(layer)


def _routing(T, dtype, seed=1, hidden=H, idle=None):
    """x [T, H] and top-K routing; expert `idle` (if given) gets no token."""
    from sglang.srt.layers.moe.topk import StandardTopKOutput

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, hidden, generator=g).to(dtype)  # [T, H]
    logits = torch.randn(T, E, generator=g)  # [T, E]
    if idle is not None:
        logits[:, idle] = float("-inf")
    weights, ids = torch.softmax(logits, dim=-1).topk(K, dim=-1)  # [T, K]
    return x, StandardTopKOutput(topk_weights=weights, topk_ids=ids.to(torch.int32), router_logits=logits)


def _ours(options: KTExpertsOptions, gpu_method=None):
    from sglang.srt.layers.quantization.unquant import UnquantizedFusedMoEMethod

    from kt_plugins.sglang.method import KTExpertsLayerConfig, KTExpertsMethod

    gpu_method = gpu_method if gpu_method is not None else UnquantizedFusedMoEMethod(False)
    return KTExpertsMethod(gpu_method, KTExpertsLayerConfig(layer_idx=0, options=options))


TOLERANCE = {torch.float32: {"rtol": 1e-5, "atol": 1e-5}, torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2}}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "placement",
    [{"gpu_experts": "0"}, {"gpu_experts": "3"}, {"gpu_experts": "0.5"}, {"gpu_expert_ids": "1,4,6"}],
    ids=["all-cpu", "first-3-gpu", "half-gpu", "mask-gpu"],
)
@pytest.mark.parametrize("T", [1, 7, 33])
def test_fused_moe_matches_sglang_native(model_dir, dtype, placement, T):
    gate, up, down = _random_experts(dtype)
    native = _build_layer(dtype)
    _load(native, gate, up, down)
    ours = _build_layer(dtype, _ours(KTExpertsOptions(kernel="auto", **placement)))
    _load(ours, gate, up, down)
    method = ours.quant_method
    assert len(method.gpu_ids) + len(method.cpu_ids) == E
    assert ours.w13_weight.shape[0] == len(method.gpu_ids)  # GPU method holds only its experts

    x, topk = _routing(T, dtype)
    expected = native(x.clone(), topk)
    actual = ours(x.clone(), topk)
    torch.testing.assert_close(actual, expected, **TOLERANCE[dtype])


def test_cpu_experts_stay_in_host_memory_under_a_device_context(model_dir):
    """SGLang builds the model under its device context (a CUDA device on a GPU); the CPU experts are built in
    host memory whatever it is, and hold only their own experts (no host copy of the GPU-resident ones)."""
    with torch.device("meta"):  # stands in for the GPU's context on a machine without one
        layer = _build_layer(torch.float32, _ours(KTExpertsOptions(gpu_experts="3")))
    method = layer.quant_method
    assert layer.w13_weight.device.type == "meta" and layer.w13_weight.shape[0] == 3  # the context did apply
    cpu = method.cpu_experts
    assert cpu.gate_up_proj.device.type == "cpu" and cpu.down_proj.device.type == "cpu"
    assert cpu.gate_up_proj.shape[0] == E - 3 and cpu.total_experts == E
    assert cpu.rows_of(torch.tensor([method.cpu_ids])).tolist() == [list(range(E - 3))]


def test_chunked_prefill_and_cpu_threads(model_dir):
    gate, up, down = _random_experts(torch.float32)
    native = _build_layer(torch.float32)
    _load(native, gate, up, down)
    ours = _build_layer(torch.float32, _ours(KTExpertsOptions(gpu_experts="2", chunk_size=5, cpu_threads=2)))
    _load(ours, gate, up, down)
    x, topk = _routing(23, torch.float32)
    torch.testing.assert_close(ours(x.clone(), topk), native(x.clone(), topk), rtol=1e-5, atol=1e-5)


def test_missing_cpu_expert_is_named(model_dir):
    gate, up, down = _random_experts(torch.float32)
    ours = _build_layer(torch.float32, _ours(KTExpertsOptions(gpu_experts="2")))
    down[5] = float("nan")
    layer_params = ((ours.w13_weight, "w1", gate), (ours.w13_weight, "w3", up), (ours.w2_weight, "w2", down))
    for e in range(E):
        for param, shard, tensor in layer_params:
            if (e, shard) != (5, "w2"):
                param.weight_loader(
                    param, tensor[e], "model.layers.0.mlp.experts.w2_weight", shard_id=shard, expert_id=e
                )
    with pytest.raises(ValueError, match="expert 5 down_proj"):
        ours.quant_method.process_weights_after_loading(ours)


def _write_peft_adapter(
    path: Path, r: int, alpha: float, peft_version: str, swapped: bool, seed=2, hidden=H, intermediate=I
):
    """A PEFT adapter with expert LoRA on layer 0 as PEFT `peft_version` saves it (`swapped`: its factor layout is
    the one of PEFT >= 0.19); returns our-layout factors."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    h, i = hidden, intermediate
    factors = {
        "gate_up_A": torch.randn(E, r, h, generator=g) * 0.1,  # [E, r, H]
        "gate_up_B": torch.randn(E, 2 * i, r, generator=g) * 0.1,  # [E, 2I, r]
        "down_A": torch.randn(E, r, i, generator=g) * 0.1,  # [E, r, I]
        "down_B": torch.randn(E, h, r, generator=g) * 0.1,  # [E, H, r]
    }
    prefix = "base_model.model.model.layers.0.mlp.experts."
    state = {}
    # Nesting as PEFT (0.18 - 0.21) writes it for target_parameters=["gate_up_proj", "down_proj"].
    for param, nest in (("down_proj", ""), ("gate_up_proj", "base_layer.")):
        a, b = ("gate_up_A", "gate_up_B") if param == "gate_up_proj" else ("down_A", "down_B")
        lora_A, lora_B = expert_factors_to_peft(factors[a], factors[b], swapped=swapped)
        state[f"{prefix}{nest}lora_A.weight"] = lora_A.contiguous()
        state[f"{prefix}{nest}lora_B.weight"] = lora_B.contiguous()
    state["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(r, hidden)
    path.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        "target_modules": ["q_proj"],
        "target_parameters": ["gate_up_proj", "down_proj"],
        "peft_version": peft_version,  # as PEFT records it: the release whose factor layout the tensors above use
    }
    (path / "adapter_config.json").write_text(json.dumps(config))
    return factors


# H == 2I here: gate_up_proj's tensors have the same shapes in both layouts, only peft_version tells them apart.
@pytest.mark.parametrize(("peft_version", "swapped"), [("0.18.1", False), ("0.19.1", True)])
@pytest.mark.parametrize("gpu_experts", ["0", "3"], ids=["all-cpu", "first-3-gpu"])
def test_expert_lora_from_peft_adapter(model_dir, tmp_path, gpu_experts, peft_version, swapped):
    r, alpha = 4, 8.0
    factors = _write_peft_adapter(tmp_path / "adapter", r, alpha, peft_version, swapped)
    scaling = alpha / r
    gate, up, down = _random_experts(torch.float32)
    # Reference: SGLang's own method on the merged weights W + scaling * B @ A.
    gate_up_delta = scaling * factors["gate_up_B"] @ factors["gate_up_A"]  # [E, 2I, H]
    down_delta = scaling * factors["down_B"] @ factors["down_A"]  # [E, H, I]
    native = _build_layer(torch.float32)
    _load(native, gate + gate_up_delta[:, :I], up + gate_up_delta[:, I:], down + down_delta)
    options = KTExpertsOptions(gpu_experts=gpu_experts, lora_path=str(tmp_path / "adapter"))
    ours = _build_layer(torch.float32, _ours(options))
    _load(ours, gate, up, down)
    assert ours.quant_method.cpu_experts.lora is not None
    x, topk = _routing(9, torch.float32)
    torch.testing.assert_close(ours(x.clone(), topk), native(x.clone(), topk), rtol=1e-4, atol=1e-4)


# ---- block-FP8 checkpoints (DeepSeek-V3's format) -------------------------------------------------------------

FP8 = torch.float8_e4m3fn
FP8_BLOCK = (128, 128)
# H is not a multiple of the block: partial scale blocks along H in gate / up [I, H] and down [H, I]. SGLang's
# Fp8MoEMethod itself requires I % 128 == 0 (its gate / up scales are per shard).
FP8_H, FP8_I = 192, 128
_PROJS = (("gate", "w1", "w13"), ("up", "w3", "w13"), ("down", "w2", "w2"))  # (ours, SGLang's shard, parameter)


def _fp8_method(**config):
    """SGLang's Fp8MoEMethod for a checkpoint as DeepSeek-V3 ships it (block-quantized, FP8-serialized), or as
    `config` says."""
    from sglang.srt.layers.quantization.fp8 import Fp8Config, Fp8MoEMethod

    config = {"is_checkpoint_fp8_serialized": True, "weight_block_size": list(FP8_BLOCK), **config}
    return Fp8MoEMethod(Fp8Config(**config))


def _fp8_experts(seed=0):
    """Per-expert block-FP8 checkpoint tensors {"gate" / "up" / "down": [(q e4m3, scale_inv fp32)] * E}, and
    their dequantization (gate, up, down) [E, ...] fp32."""
    from kt_core.loading.fp8 import dequantize_fp8_blockwise, quantize_fp8_blockwise

    dense = dict(zip(("gate", "up", "down"), _random_experts(torch.float32, seed, FP8_H, FP8_I), strict=True))
    fp8 = {proj: [quantize_fp8_blockwise(w, FP8_BLOCK) for w in dense[proj]] for proj in dense}
    dequantized = tuple(
        torch.stack([dequantize_fp8_blockwise(q, s, FP8_BLOCK, torch.float32) for q, s in fp8[proj]])
        for proj in ("gate", "up", "down")
    )
    return fp8, dequantized


def _load_fp8(layer, fp8, skip=(), process=True, threads=0):
    """As DeepSeek's load_weights does: per (expert, shard) one call for the weight and one for its
    weight_scale_inv (the scale first for odd experts), from a pool of `threads` threads if > 0 (as DeepSeek's
    loader submits host tensors); `skip` leaves out (expert, "gate", "weight_scale_inv")..."""
    from concurrent.futures import ThreadPoolExecutor

    calls = []
    for e in range(E):
        for proj, shard, fused in _PROJS:
            q, scale = fp8[proj][e]
            pair = [("weight", q), ("weight_scale_inv", scale)]
            for kind, tensor in pair[::-1] if e % 2 else pair:
                if (e, proj, kind) not in skip:
                    param = getattr(layer, f"{fused}_{kind}")
                    name = f"model.layers.0.mlp.experts.{fused}_{kind}"
                    calls.append((param, tensor, name, shard, e))

    def load(param, tensor, name, shard, e):
        param.weight_loader(param, tensor, name, shard_id=shard, expert_id=e)

    if threads:
        with ThreadPoolExecutor(threads) as pool:
            for future in [pool.submit(load, *call) for call in calls]:
                future.result()
    else:
        for call in calls:
            load(*call)
    if process:
        layer.quant_method.process_weights_after_loading(layer)


def _same_bytes(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    return actual.dtype == expected.dtype and torch.equal(actual.view(torch.uint8), expected.view(torch.uint8))


def _assert_cpu_expert_as_shipped(cpu, row: int, fp8, expert: int) -> None:
    """Row `row` of the CPU store holds expert `expert`'s checkpoint bytes and block scales."""
    assert _same_bytes(cpu.gate_up_proj[row, :FP8_I], fp8["gate"][expert][0])
    assert _same_bytes(cpu.gate_up_proj[row, FP8_I:], fp8["up"][expert][0])
    assert _same_bytes(cpu.down_proj[row], fp8["down"][expert][0])
    assert torch.equal(cpu.gate_up_proj_scale_inv[row], torch.cat([fp8["gate"][expert][1], fp8["up"][expert][1]]))
    assert torch.equal(cpu.down_proj_scale_inv[row], fp8["down"][expert][1])


@pytest.mark.parametrize("T", [1, 7])
def test_fp8_checkpoint_all_cpu_matches_sglang_native(model_dir, T):
    fp8, (gate, up, down) = _fp8_experts()
    native = _build_layer(torch.bfloat16, hidden=FP8_H, intermediate=FP8_I)
    _load(native, gate.bfloat16(), up.bfloat16(), down.bfloat16())
    # Kept weights, to look at them below (a packed kernel would free them once packed).
    method = _ours(KTExpertsOptions(kernel="auto", gpu_experts="0", keep_host_weights=True), _fp8_method())
    ours = _build_layer(torch.bfloat16, method, hidden=FP8_H, intermediate=FP8_I)
    _load_fp8(ours, fp8)
    assert ours.w13_weight.shape[0] == 0 and ours.w13_weight.dtype == FP8  # SGLang's FP8 method, no GPU experts

    # The CPU store holds the checkpoint's e4m3 bytes and block scales as shipped: no bf16 copy.
    cpu = method.cpu_experts
    assert cpu.is_fp8 and cpu.weight_block_size == FP8_BLOCK
    assert {p.dtype for p in cpu.parameters()} == {FP8, torch.float32}  # e4m3 weights, fp32 scales
    assert tuple(cpu.gate_up_proj_scale_inv.shape) == (E, 2, 2) and tuple(cpu.down_proj_scale_inv.shape) == (E, 2, 1)
    for e in range(E):
        _assert_cpu_expert_as_shipped(cpu, e, fp8, e)

    x, topk = _routing(T, torch.bfloat16, hidden=FP8_H, idle=3)
    assert not bool((topk.topk_ids == 3).any())  # an expert with no tokens
    expected = native(x.clone(), topk)
    torch.testing.assert_close(ours(x.clone(), topk), expected, **TOLERANCE[torch.bfloat16])
    # Activations the CPU operator does not take (fp16) reach it as bf16, not in the weights' dtype (e4m3).
    half = ours(x.to(torch.float16), topk)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.to(torch.bfloat16), expected, **TOLERANCE[torch.bfloat16])


@pytest.mark.parametrize("placement", [{"gpu_experts": "2"}, {"gpu_expert_ids": "1,6"}], ids=["first-2", "ids-1-6"])
def test_fp8_checkpoint_gpu_rows_get_their_experts(model_dir, monkeypatch, placement):
    """With GPU experts, SGLang's Fp8MoEMethod holds compact [N_gpu, ...] weights and scales, row r the r-th GPU
    expert's; the CPU store the others'. No forward: SGLang's FP8 kernels need CUDA (or AMX)."""
    fp8, _ = _fp8_experts()
    method = _ours(KTExpertsOptions(**placement, keep_host_weights=True), _fp8_method())  # kept: looked at below
    ours = _build_layer(torch.bfloat16, method, hidden=FP8_H, intermediate=FP8_I)
    processed = []  # SGLang's own FP8 post-processing needs CUDA or AMX: recorded, not run
    monkeypatch.setattr(method.gpu_method, "process_weights_after_loading", processed.append)
    _load_fp8(ours, fp8, threads=8)
    assert processed == [ours]
    gpu_ids = [0, 1] if "gpu_experts" in placement else [1, 6]
    assert method.gpu_ids == gpu_ids and method.cpu_experts.gpu_share is method.gpu_share

    n_i = -(-FP8_I // FP8_BLOCK[0])  # gate's (and up's) scale rows
    assert ours.w13_weight.dtype == FP8 and tuple(ours.w13_weight.shape) == (2, 2 * FP8_I, FP8_H)
    assert tuple(ours.w13_weight_scale_inv.shape) == (2, 2 * n_i, 2)
    for row, e in enumerate(gpu_ids):
        assert _same_bytes(ours.w13_weight.data[row, :FP8_I], fp8["gate"][e][0])
        assert _same_bytes(ours.w13_weight.data[row, FP8_I:], fp8["up"][e][0])
        assert _same_bytes(ours.w2_weight.data[row], fp8["down"][e][0])
        assert torch.equal(ours.w13_weight_scale_inv.data[row, :n_i], fp8["gate"][e][1])
        assert torch.equal(ours.w13_weight_scale_inv.data[row, n_i:], fp8["up"][e][1])
        assert torch.equal(ours.w2_weight_scale_inv.data[row], fp8["down"][e][1])
    cpu = method.cpu_experts
    assert cpu.is_fp8 and cpu.num_experts == E - 2
    for e in method.cpu_ids:
        _assert_cpu_expert_as_shipped(cpu, int(cpu.host_rows[e]), fp8, e)


def test_fp8_checkpoint_missing_scale_and_stray_tensor_are_named(model_dir):
    fp8, _ = _fp8_experts()
    ours = _build_layer(torch.bfloat16, _ours(KTExpertsOptions(gpu_experts="2"), _fp8_method()), FP8_H, FP8_I)
    _load_fp8(ours, fp8, skip={(3, "gate", "weight_scale_inv"), (5, "down", "weight")}, process=False)
    with pytest.raises(
        ValueError, match=r"2 CPU expert tensors \(expert 3 gate_proj weight_scale_inv, expert 5 down_proj"
    ):
        ours.quant_method.process_weights_after_loading(ours)
    with pytest.raises(ValueError, match="w13_input_scale"):
        ours.w13_weight.weight_loader(
            ours.w13_weight, torch.ones(()), "model.layers.0.mlp.experts.w13_input_scale", shard_id="w1", expert_id=5
        )


@pytest.mark.parametrize(
    ("config", "why"),
    [
        ({"weight_block_size": None}, "per-tensor FP8"),
        ({"is_checkpoint_fp8_serialized": False, "weight_block_size": None}, "quantized at load"),
    ],
    ids=["per-tensor", "quantized-at-load"],
)
def test_other_fp8_checkpoints_are_refused_by_name(model_dir, config, why):
    with pytest.raises(NotImplementedError, match=rf"layer 0\).*Fp8MoEMethod with .*{why}"):
        _build_layer(torch.bfloat16, _ours(KTExpertsOptions(gpu_experts="0"), _fp8_method(**config)), FP8_H, FP8_I)


def test_fp8_checkpoint_expert_lora_on_the_cpu(model_dir, tmp_path):
    """Every expert on the CPU: the FP8 experts take the adapter's expert LoRA unmerged (KTExperts' own LoRA)."""
    r, alpha = 4, 8.0
    adapter = tmp_path / "adapter"
    factors = _write_peft_adapter(adapter, r, alpha, "0.19.1", True, hidden=FP8_H, intermediate=FP8_I)
    scaling = alpha / r
    fp8, (gate, up, down) = _fp8_experts()
    gate_up_delta = scaling * factors["gate_up_B"] @ factors["gate_up_A"]  # [E, 2I, H]
    down_delta = scaling * factors["down_B"] @ factors["down_A"]  # [E, H, I]
    native = _build_layer(torch.bfloat16, hidden=FP8_H, intermediate=FP8_I)
    merged = (gate + gate_up_delta[:, :FP8_I], up + gate_up_delta[:, FP8_I:], down + down_delta)
    _load(native, *(w.bfloat16() for w in merged))
    method = _ours(KTExpertsOptions(gpu_experts="0", lora_path=str(adapter)), _fp8_method())
    ours = _build_layer(torch.bfloat16, method, hidden=FP8_H, intermediate=FP8_I)
    _load_fp8(ours, fp8)
    assert method.cpu_experts.is_fp8 and method.cpu_experts.lora is not None
    x, topk = _routing(9, torch.bfloat16, hidden=FP8_H)
    torch.testing.assert_close(ours(x.clone(), topk), native(x.clone(), topk), **TOLERANCE[torch.bfloat16])

    # With FP8 GPU experts, the LoRA would have to be merged into e4m3 weights: refused before any loading.
    with pytest.raises(NotImplementedError, match=r"--kt-experts-lora .*FP8"):
        _build_layer(
            torch.bfloat16,
            _ours(KTExpertsOptions(gpu_experts="2", lora_path=str(adapter)), _fp8_method()),
            FP8_H,
            FP8_I,
        )


def _packed_kernel(monkeypatch) -> str:
    from kt_core import kernels

    for name in ("avx512_bf16_packed", "amx_bf16"):
        if name.startswith("amx") and name not in kernels.available_kernels():
            monkeypatch.setenv("KT_AMX_EMULATE", "1")  # the AMX tile code on its scalar model
        if name in kernels.available_kernels():
            return name
    pytest.skip("no packed bf16 kernel runs here")


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("gpu_experts", ["0", "3"], ids=["all-cpu", "first-3-gpu"])
def test_packed_cpu_experts_keep_one_copy_in_host_ram(model_dir, monkeypatch, gpu_experts, fp8):
    """A packed kernel packs the CPU experts at load and their weights are freed (serving reads only the packed
    copy); the answers are those of the layer that keeps them (--kt-experts-keep-host-weights), bit for bit."""
    kernel = _packed_kernel(monkeypatch)
    hidden, inter = (FP8_H, FP8_I) if fp8 else (H, I)
    if fp8:
        checkpoint, _ = _fp8_experts()
    else:
        checkpoint = _random_experts(torch.bfloat16)
    layers = {}
    for keep in (False, True):
        options = KTExpertsOptions(kernel=kernel, gpu_experts=gpu_experts, keep_host_weights=keep)
        layer = _build_layer(torch.bfloat16, _ours(options, _fp8_method() if fp8 else None), hidden, inter)
        if fp8:
            if gpu_experts != "0":  # SGLang's FP8 kernels need CUDA: the GPU rows are loaded, never run
                monkeypatch.setattr(layer.quant_method.gpu_method, "process_weights_after_loading", lambda _: None)
            _load_fp8(layer, checkpoint)
        else:
            _load(layer, *checkpoint)
        layers[keep] = layer
    freed, kept = layers[False].quant_method.cpu_experts, layers[True].quant_method.cpu_experts
    assert freed.host_weights_released and freed.gate_up_proj.is_meta and freed.down_proj.is_meta
    assert not kept.host_weights_released and kept.gate_up_proj.device.type == "cpu"
    assert freed.gate_up_proj.shape == kept.gate_up_proj.shape == (E - int(gpu_experts), 2 * inter, hidden)
    if fp8 and gpu_experts != "0":
        return  # no forward: the GPU rows' FP8 kernels need CUDA
    for T in (1, 7):
        x, topk = _routing(T, torch.bfloat16, hidden=hidden, idle=3)
        assert torch.equal(layers[False](x.clone(), topk), layers[True](x.clone(), topk))


def test_routing_is_recorded_per_layer(model_dir, tmp_path):
    from kt_plugins.sglang.routing import routing_recorder

    path = tmp_path / "routing.json"
    gate, up, down = _random_experts(torch.float32)
    ours = _build_layer(torch.float32, _ours(KTExpertsOptions(gpu_experts="2", record_routing=str(path))))
    _load(ours, gate, up, down)
    x, topk = _routing(9, torch.float32)
    ours(x, topk)
    routing_recorder(str(path)).write()
    counts = json.loads(path.read_text())["counts"]["0"]
    assert counts == torch.bincount(topk.topk_ids.long().flatten(), minlength=E).tolist()


def test_options_parse_and_validate(tmp_path):
    assert KTExpertsOptions(gpu_experts="3").gpu_expert_list(0, 8) == [0, 1, 2]
    assert KTExpertsOptions(gpu_experts="0.25").gpu_expert_list(0, 8) == [0, 1]
    assert KTExpertsOptions(gpu_expert_ids="6,1").gpu_expert_list(0, 8) == [1, 6]
    per_layer = tmp_path / "hot.json"
    per_layer.write_text(json.dumps({"0": [2, 3], "1": [7]}))
    options = KTExpertsOptions(gpu_expert_ids=str(per_layer))
    assert options.gpu_expert_list(1, 8) == [7] and options.gpu_expert_list(5, 8) == []
    assert KTExpertsOptions.from_env_value(options.to_env()) == options
    for bad in ({"gpu_experts": "1.5"}, {"gpu_experts": "-1"}, {"gpu_experts": "many"}, {"cpu_threads": 0}):
        with pytest.raises(ValueError, match="--kt-experts"):
            KTExpertsOptions(**bad)
    with pytest.raises(ValueError, match="out of range"):
        KTExpertsOptions(gpu_expert_ids="9").gpu_expert_list(0, 8)
    with pytest.raises(ValueError, match="unknown keys"):
        KTExpertsOptions.from_env_value('{"cpu_thread": 4}')
    with pytest.raises(ValueError, match="--kt-experts-keep-host-weights: got 'yes'"):
        KTExpertsOptions(keep_host_weights="yes")


def _run(code: str, *args: str, timeout=600) -> subprocess.CompletedProcess:
    env_code = f"import sys; sys.path.insert(0, {str(HERE)!r})\n" + textwrap.dedent(code)
    return subprocess.run(
        [sys.executable, "-c", env_code, *args], capture_output=True, text=True, timeout=timeout, env=_clean_env()
    )


def _clean_env():
    import os

    env = dict(os.environ)
    env.pop(ENV_VAR, None)
    env.pop("SGLANG_PLUGINS", None)
    return env


def test_launch_server_help_lists_flags():
    result = _run(
        """
        import runpy, sys
        from sglang_cpu import install_torchvision_stubs
        install_torchvision_stubs()
        sys.argv = ["sglang.launch_server", "--help"]
        runpy.run_module("sglang.launch_server", run_name="__main__")
        """
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for flag in (
        "--kt-experts",
        "--kt-experts-cpu-threads",
        "--kt-experts-gpu-experts",
        "--kt-experts-gpu-expert-ids",
        "--kt-experts-kernel",
        "--kt-experts-chunk-size",
        "--kt-experts-lora",
        "--kt-experts-keep-host-weights",
    ):
        assert flag in result.stdout, f"{flag} missing from --help"
    assert "kt-plugins CPU experts" in result.stdout


SPAWN_ROUTE = """
    import json, multiprocessing as mp, os, sys
    from sglang_cpu import install_torchvision_stubs, write_model_config
    install_torchvision_stubs()
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import prepare_server_args

    model_dir = write_model_config(__import__("pathlib").Path(sys.argv[1]), num_experts=8, hidden=64,
                                   intermediate=32, top_k=2)
    load_plugins()  # as launch_server's __main__ does, before parsing
    assert "KT_SGLANG_EXPERTS" not in os.environ
    server_args = prepare_server_args(["--model-path", str(model_dir), "--device", "cpu", "--kt-experts",
        "--kt-experts-gpu-experts", "0.25", "--kt-experts-cpu-threads", "2", "--kt-experts-kernel", "auto",
        "--kt-experts-chunk-size", "16", "--kt-experts-keep-host-weights"])
    assert not hasattr(server_args, "kt_experts")  # SGLang's sealed record keeps only its own fields

    import sglang_cpu
    ctx = mp.get_context("spawn")  # how SGLang starts its schedulers
    queue = ctx.Queue()
    child = ctx.Process(target=sglang_cpu.build_layer_in_scheduler, args=(str(model_dir), queue))
    child.start()
    result = queue.get(timeout=600)
    child.join(timeout=60)
    print("RESULT " + json.dumps(result))
"""


def test_options_reach_spawned_scheduler_and_swap_the_method(tmp_path):
    result = _run(SPAWN_ROUTE, str(tmp_path / "model"))
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert result.returncode == 0 and lines, result.stdout[-2000:] + result.stderr[-4000:]
    report = json.loads(lines[-1][len("RESULT ") :])
    assert report.get("error") is None, report
    assert report["options"] == {
        "cpu_threads": 2,
        "gpu_expert_ids": None,
        "gpu_experts": "0.25",
        "kernel": "auto",
        "chunk_size": 16,
        "lora_path": None,
        "record_routing": None,
        "keep_host_weights": True,
    }
    assert report["method"] == "KTExpertsMethod"
    assert report["is_sglang_kt_method"]  # SGLang's own isinstance special cases see it
    assert report["gpu_experts"] == 2 and report["cpu_experts"] == 6
    assert report["max_error"] < 1e-5


def test_bad_flags_fail_before_launch(tmp_path):
    result = _run(
        """
        import sys
        from pathlib import Path
        from sglang_cpu import install_torchvision_stubs, write_model_config
        install_torchvision_stubs()
        from sglang.srt.plugins import load_plugins
        from sglang.srt.server_args import prepare_server_args
        model = write_model_config(Path(sys.argv[1]), num_experts=8, hidden=64, intermediate=32, top_k=2)
        load_plugins()
        base = ["--model-path", str(model), "--device", "cpu", "--kt-experts"]
        for extra in (["--kt-weight-path", "/weights"], ["--kt-experts-gpu-experts", "2.5"]):
            try:
                prepare_server_args(base + extra)
            except ValueError as exc:
                print("ERROR", exc)
        """,
        str(tmp_path / "model"),
    )
    errors = [line for line in result.stdout.splitlines() if line.startswith("ERROR ")]
    assert len(errors) == 2, result.stdout[-2000:] + result.stderr[-3000:]
    assert "--kt-weight-path" in errors[0] and "ratio must lie in [0, 1)" in errors[1]
