"""Routed experts kept as block-quantized FP8 (KTExperts(dtype=torch.float8_e4m3fn)): the CPU kernels against the
plain-torch reference on the fp32-dequantized weights (forward, dx, d(routing weights), LoRA gradients), storage,
per-expert loading and the kernel choice."""

from __future__ import annotations

import pytest
import torch

from kt_core import KTExperts, kernels
from kt_core.loading.fp8 import dequantize_experts_fp8, expert_scale_shapes, quantize_experts_fp8

FP8 = torch.float8_e4m3fn
FP8_KERNELS = [k for k in kernels.fp8_kernels() if k != "torch"]
# The packed ones (amx_bf16, avx512_bf16_packed) are compared in test_fp8_packed.py, whose bounds allow for the
# packed backward's bf16 rounding of h and dgu.
UNPACKED_FP8_KERNELS = [k for k in FP8_KERNELS if k not in ("amx_bf16", "avx512_bf16_packed")]
E = 6


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm().clamp_min(1e-30)).item()


def random_fp8_experts(H: int, I: int, block=(128, 128), seed: int = 0):
    """Every finite e4m3 code (subnormals and both zeros included) with random block scales, gate and up apart."""
    gen = torch.Generator().manual_seed(seed)
    finite = torch.tensor([c for c in range(256) if c & 0x7F != 0x7F], dtype=torch.uint8)

    def codes(*shape):
        return finite[torch.randint(0, len(finite), shape, generator=gen)].view(FP8)

    gu_shape, d_shape = expert_scale_shapes(E, H, I, block)
    scale = lambda shape: torch.rand(shape, generator=gen) * 2e-3 + 1e-4  # noqa: E731
    return codes(E, 2 * I, H), scale(gu_shape), codes(E, H, I), scale(d_shape)


def pair(H, I, kernel, block=(128, 128), rank=4, seed=0):
    """An fp8 layer on `kernel` and the torch reference on its fp32 dequantization, with the same LoRA factors."""
    q_gu, s_gu, q_d, s_d = random_fp8_experts(H, I, block, seed)
    ours = KTExperts.from_tensors(
        q_gu, q_d, gate_up_proj_scale_inv=s_gu, down_proj_scale_inv=s_d, weight_block_size=block, kernel=kernel
    )
    gu, d = dequantize_experts_fp8(q_gu, s_gu, q_d, s_d, block, torch.float32)
    ref = KTExperts.from_tensors(gu, d, kernel="torch")
    if rank:
        gen = torch.Generator().manual_seed(seed + 1)
        for m in (ours, ref):
            m.add_lora(rank, 2 * rank)
        with torch.no_grad():
            for a, b in zip(ours.lora.factors(), ref.lora.factors(), strict=True):
                a.copy_(torch.randn(a.shape, generator=gen) * 0.1)
                b.copy_(a)
    return ours, ref


def run(module, x, ids, w, dy):
    x = x.clone().requires_grad_()
    w = w.clone().requires_grad_()
    y = module(x, ids, w)
    y.backward(dy)
    grads = tuple(f.grad.clone() for f in module.lora.factors()) if module.lora is not None else ()
    return (y.detach(), x.grad, w.grad, *grads)


def routing(T, K, seed, experts_used):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(experts_used, generator=gen)[:K] for _ in range(T)])
    w = torch.rand(T, K, generator=gen)
    return ids, w / w.sum(-1, keepdim=True)


@pytest.mark.parametrize("kernel", UNPACKED_FP8_KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    ("H", "I", "T", "block"),
    [(256, 128, 13, (128, 128)), (200, 72, 1, (128, 128)), (130, 100, 40, (32, 48)), (96, 50, 7, (128, 128))],
    ids=["whole-blocks", "odd-T1", "odd-small-blocks", "odd-one-block"],
)
def test_matches_dequantized_reference(kernel, dtype, H, I, T, block):
    ours, ref = pair(H, I, kernel, block, seed=H + I)
    K = 2
    ids, w = routing(T, K, seed=T, experts_used=E - 2)  # two experts receive no tokens
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(T, H, generator=gen).to(dtype)
    dy = torch.randn(T, H, generator=gen).to(dtype)
    got, want = run(ours, x, ids, w, dy), run(ref, x, ids, w, dy)
    # fp32: the weights are bit for bit the dequantized ones, only the summation order differs. bf16 activations:
    # y and dx are rounded to bf16 on both sides.
    tol = 1e-5 if dtype == torch.float32 else 8e-3
    names = ["y", "dx", "dw", "d gate_up_A", "d gate_up_B", "d down_A", "d down_B"]
    for name, a, b in zip(names, got, want, strict=True):
        assert a.dtype == b.dtype, name
        assert rel_error(a, b) < (tol if name in ("y", "dx") else 1e-5 if dtype == torch.float32 else 2e-3), name
    for g in got[3:]:  # the unused experts' factor gradients are zero
        assert g[E - 2 :].abs().max() == 0


@pytest.mark.parametrize("kernel", FP8_KERNELS)
def test_within_bf16_of_the_bf16_dequantized_model(kernel):
    """What loading an FP8 checkpoint as bf16 gave before: the same result within bf16's rounding of the weights."""
    H, I = 160, 96
    q_gu, s_gu, q_d, s_d = random_fp8_experts(H, I)
    ours = KTExperts.from_tensors(q_gu, q_d, gate_up_proj_scale_inv=s_gu, down_proj_scale_inv=s_d, kernel=kernel)
    bf16 = KTExperts.from_tensors(*dequantize_experts_fp8(q_gu, s_gu, q_d, s_d), kernel=kernel)
    ids, w = routing(9, 2, seed=1, experts_used=E)
    x = torch.randn(9, H, dtype=torch.bfloat16)
    assert rel_error(ours(x, ids, w), bf16(x, ids, w)) < 1e-2


def test_kernels_and_torch_reference_agree():
    H, I = 136, 40
    q_gu, s_gu, q_d, s_d = random_fp8_experts(H, I)
    ids, w = routing(5, 3, seed=2, experts_used=E)
    x = torch.randn(5, H)
    outs = [
        KTExperts.from_tensors(q_gu, q_d, gate_up_proj_scale_inv=s_gu, down_proj_scale_inv=s_d, kernel=k)(x, ids, w)
        for k in kernels.fp8_kernels()
    ]
    for y in outs[1:]:
        assert rel_error(y, outs[0]) < 1e-5


def test_storage_is_fp8_with_block_scales():
    H, I = 200, 72
    gu, d = torch.randn(E, 2 * I, H), torch.randn(E, H, I)
    m = KTExperts.from_tensors(gu, d, dtype=FP8)
    assert m.is_fp8 and m.gate_up_proj.dtype == FP8 and m.down_proj.dtype == FP8
    # gate's block rows, then up's: ceil(72 / 128) each.
    assert m.gate_up_proj_scale_inv.shape == (E, 2, 2) and m.down_proj_scale_inv.shape == (E, 2, 1)
    per_expert = sum(t[0].numel() * t.element_size() for t in m.parameters())
    assert per_expert == 3 * H * I + 4 * (2 * 2 + 2 * 1)
    assert {"gate_up_proj_scale_inv", "down_proj_scale_inv"} <= set(m.state_dict())
    # quantized as DeepSeek's release: the dequantization is the original within e4m3's precision.
    back, _ = dequantize_experts_fp8(m.gate_up_proj, m.gate_up_proj_scale_inv, m.down_proj, m.down_proj_scale_inv)
    assert rel_error(back, gu) < 0.05
    assert "float8_e4m3fn" in repr(m)


def test_fp8_weights_dequantized_for_a_bf16_layer():
    H, I = 128, 64
    q_gu, s_gu, q_d, s_d = random_fp8_experts(H, I)
    m = KTExperts.from_tensors(q_gu, q_d, gate_up_proj_scale_inv=s_gu, down_proj_scale_inv=s_d, dtype=torch.bfloat16)
    assert m.gate_up_proj.dtype == torch.bfloat16 and not m.is_fp8
    torch.testing.assert_close(m.down_proj, dequantize_experts_fp8(q_gu, s_gu, q_d, s_d)[1])
    with pytest.raises(ValueError, match="scale_inv"):
        KTExperts.from_tensors(q_gu, q_d, gate_up_proj_scale_inv=s_gu)


@pytest.mark.parametrize("I", [128, 72])
def test_load_expert_keeps_checkpoint_tensors(I):
    """Per expert, as a DeepSeek checkpoint stores them: gate, up and down with their own weight_scale_inv."""
    H = 192
    gu, d = torch.randn(E, 2 * I, H), torch.randn(E, H, I)
    whole = KTExperts.from_tensors(gu, d, dtype=FP8, kernel=FP8_KERNELS[0])
    q_gu, s_gu, q_d, s_d = quantize_experts_fp8(gu, d)
    m = KTExperts(E, H, I, dtype=FP8, kernel=FP8_KERNELS[0])
    half = s_gu.shape[1] // 2
    for e in range(E):
        m.load_expert_(
            e,
            gate=q_gu[e, :I],
            up=q_gu[e, I:],
            down=q_d[e],
            gate_scale_inv=s_gu[e, :half],
            up_scale_inv=s_gu[e, half:],
            down_scale_inv=s_d[e],
        )
    for name, _ in whole.named_parameters():
        assert torch.equal(getattr(m, name).view(torch.uint8), getattr(whole, name).view(torch.uint8)), name
    ids, w = routing(4, 2, seed=0, experts_used=E)
    x = torch.randn(4, H)
    torch.testing.assert_close(m(x, ids, w), whole(x, ids, w))
    with pytest.raises(ValueError, match="down_scale_inv"):
        m.load_expert_(0, down=q_d[0])
    bf16 = KTExperts(E, H, I)  # a bf16 layer takes the dequantization
    bf16.load_expert_(1, down=q_d[1], down_scale_inv=s_d[1])
    torch.testing.assert_close(bf16.down_proj[1].float(), whole.reference_weights()[1][1], rtol=1e-2, atol=1e-3)


def test_quantized_kernels_take_no_fp8(monkeypatch):
    assert kernels.resolve_kernel("auto", FP8) == kernels.fp8_kernels()[0]
    # An int8 kernel (as on an AMX machine) says what to do instead.
    monkeypatch.setattr(kernels, "available_kernels", lambda: ["amx_int8", *kernels.fp8_kernels()])
    monkeypatch.setattr(kernels, "quantized_kernels", lambda: ["amx_int8"])
    with pytest.raises(ValueError, match=r"amx_int8.* takes no fp8 .*int8 / int4.*run on: .*torch.*bf16"):
        KTExperts(2, 64, 32, dtype=FP8, kernel="amx_int8")


def test_operator_checks_fp8_arguments():
    from kt_core import _C

    q = torch.zeros(2, 64, 32, dtype=FP8)
    with pytest.raises(ValueError, match="gate_up_proj_scale_inv"):
        _C.ExpertsOp(FP8_KERNELS[0], 2, 32, 16, q.data_ptr(), q.data_ptr(), "float8_e4m3fn")
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        _C.ExpertsOp(FP8_KERNELS[0], 2, 32, 16, q.data_ptr(), q.data_ptr(), "float16")
    m = KTExperts(2, 32, 16, dtype=FP8, kernel=FP8_KERNELS[0])
    m.gate_up_proj_scale_inv = torch.nn.Parameter(torch.ones(2, 1, 1), requires_grad=False)
    with pytest.raises(ValueError, match=r"gate_up_proj_scale_inv must have shape \[2, 2, 1\]"):
        m(torch.randn(1, 32), torch.zeros(1, 1, dtype=torch.int64), torch.ones(1, 1))
    with pytest.raises(NotImplementedError, match="fp8"):
        m.attach_gpu_share(object())


# ---- loading an FP8 checkpoint ----------------------------------------------------------------------------------


def write_fp8_deepseek(path, block=(16, 16)):
    """A tiny random DeepSeek-V3 checkpoint written as DeepSeek ships it: every 2-D projection (routed experts
    per expert, gate / up / down) as e4m3 with its weight_scale_inv, and quantization_config fp8."""
    import json

    from safetensors.torch import load_file, save_file
    from tiny_models import build_tiny_model

    from kt_core.loading import quantize_fp8_blockwise

    build_tiny_model("deepseek_v3", moe_intermediate_size=24).save_pretrained(path)  # I = 24: not whole blocks
    tensors = load_file(path / "model.safetensors")
    for key in list(tensors):
        if key.endswith("proj.weight") and tensors[key].dim() == 2:
            tensors[key], tensors[key + "_scale_inv"] = quantize_fp8_blockwise(tensors[key], block)
    assert any(".mlp.experts.0.gate_proj.weight_scale_inv" in k for k in tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": list(block), "fmt": "e4m3"}
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory):
    return write_fp8_deepseek(tmp_path_factory.mktemp("fp8-deepseek-v3"))


def test_fp8_checkpoint_keeps_fp8_experts(fp8_checkpoint, monkeypatch):
    from safetensors.torch import load_file

    from kt_core.loading import MemoryPlan, load_model
    from kt_core.loading.memory import expert_store_bytes

    plans = []
    check = MemoryPlan.check
    monkeypatch.setattr(MemoryPlan, "check", lambda self, **kw: (plans.append(self), check(self, **kw))[1])
    fp8 = load_model(fp8_checkpoint, device="cpu", progress=False, expert_dtype="fp8")
    bf16 = load_model(fp8_checkpoint, device="cpu", progress=False)  # the default: dequantized at load
    tensors = load_file(fp8_checkpoint / "model.safetensors")
    experts = fp8.model.layers[1].mlp.experts
    assert isinstance(experts, KTExperts) and experts.is_fp8 and experts.weight_block_size == (16, 16)
    assert experts.kernel in kernels.fp8_kernels()
    prefix = "model.layers.1.mlp.experts.2."
    I = experts.intermediate_dim
    assert torch.equal(experts.down_proj[2].view(torch.uint8), tensors[prefix + "down_proj.weight"].view(torch.uint8))
    assert torch.equal(
        experts.gate_up_proj[2, I:].view(torch.uint8), tensors[prefix + "up_proj.weight"].view(torch.uint8)
    )
    half = experts.gate_up_proj_scale_inv.shape[1] // 2
    assert torch.equal(experts.gate_up_proj_scale_inv[2, half:], tensors[prefix + "up_proj.weight_scale_inv"])
    assert not bf16.model.layers[1].mlp.experts.is_fp8
    # The memory plan counts what the stores hold: 1 byte a weight plus the block scales, against 2 for bf16.
    layers = [m for m in fp8.modules() if isinstance(m, KTExperts)]
    held = sum(p.numel() * p.element_size() for m in layers for p in m.parameters() if p is not getattr(m, "lora", 0))
    assert plans[0].expert_bytes == held
    E, H = experts.num_experts, experts.hidden_dim
    assert plans[0].expert_bytes == len(layers) * expert_store_bytes(E, H, I, FP8, (16, 16))
    assert plans[1].expert_bytes == len(layers) * 3 * E * H * I * 2
    ids = torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = fp8(ids).logits.float(), bf16(ids).logits.float()
    assert rel_error(a, b) < 2e-2


def test_expert_dtype_choice(fp8_checkpoint):
    from kt_core.loading.fp8 import expert_store_dtype

    assert expert_store_dtype(None, True, "auto", torch.bfloat16) == torch.bfloat16  # by default: dequantized
    assert expert_store_dtype(None, False, "auto", torch.float32) == torch.float32
    assert expert_store_dtype("fp8", True, "auto", torch.bfloat16) == FP8
    assert expert_store_dtype("fp8", True, "avx2", torch.bfloat16) == FP8
    with pytest.raises(ValueError, match="takes no fp8 weights"):
        expert_store_dtype("fp8", True, "amx_int8", torch.bfloat16)  # an int8 kernel
    with pytest.raises(ValueError, match="not FP8"):
        expert_store_dtype("fp8", False, "auto", torch.bfloat16)
    with pytest.raises(ValueError, match="expert_dtype"):
        expert_store_dtype(torch.float16, True, "auto", torch.bfloat16)


def test_trainer_loss_curve_matches_bf16_dequantized(fp8_checkpoint, tmp_path):
    """The stock HF Trainer + KTCallback with expert LoRA: the FP8-kept run's loss curve is the bf16-dequantized
    run's within bf16 rounding (both models compute in bf16; only the experts' weights are stored otherwise)."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from tiny_models import token_dataset, trainer_args

    from kt_core.loading import load_model
    from kt_plugins.hf_trainer import KTCallback

    def train(expert_dtype, out):
        model = load_model(
            fp8_checkpoint, device="cpu", progress=False, dtype=torch.bfloat16, expert_dtype=expert_dtype
        )
        torch.manual_seed(1)
        config = peft.LoraConfig(
            r=4,
            lora_alpha=8,
            lora_dropout=0.0,
            target_modules=["q_a_proj", "o_proj"],
            target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        )
        model = peft.get_peft_model(model, config)
        losses = []
        model.register_forward_hook(lambda m, a, o: losses.append(o.loss.item()) if m.training else None)
        args = trainer_args(out, max_steps=6, learning_rate=2e-2, bf16=True, per_device_train_batch_size=4)
        data = token_dataset(n=4, seq=16, vocab=64)
        transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[KTCallback()]).train()
        return losses, model

    fp8_losses, fp8_model = train("fp8", tmp_path / "fp8")
    bf16_losses, _ = train(None, tmp_path / "bf16")
    assert any(m.is_fp8 for m in fp8_model.modules() if isinstance(m, KTExperts))
    assert len(fp8_losses) == 6 and fp8_losses[-1] < fp8_losses[0] - 0.05  # it learns
    gap = max(abs(a - b) for a, b in zip(fp8_losses, bf16_losses, strict=True))
    assert gap < 2e-2, (fp8_losses, bf16_losses)


def test_llamafactory_kt_expert_dtype_keeps_fp8_experts(fp8_checkpoint):
    """`kt_expert_dtype: fp8` in the YAML reaches load_model: the experts stay FP8; unset, they are dequantized."""
    from kt_core.settings import SettingError
    from kt_plugins.llamafactory.config import split_kt_args
    from kt_plugins.llamafactory.model import _KTAutoModel

    def experts(**keys):
        settings = split_kt_args({"use_kt": True, "kt_device": "cpu", **keys})[1]
        model = _KTAutoModel(settings, torch.bfloat16).from_pretrained(str(fp8_checkpoint))
        return model.model.layers[1].mlp.experts

    assert experts(kt_expert_dtype="fp8").is_fp8
    assert experts().gate_up_proj.dtype == torch.bfloat16
    with pytest.raises(SettingError, match=r"kt_expert_dtype: got 'int4', expected one of null, 'fp8'"):
        split_kt_args({"use_kt": True, "kt_expert_dtype": "int4"})
