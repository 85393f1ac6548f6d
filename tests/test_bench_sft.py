"""benchmarks/bench_sft.py's checkpoint writer and summaries: the FP8 checkpoint written as DeepSeek-V3 ships it
(per-expert e4m3 weights with weight_scale_inv, DeepSeek's quantization_config), read back by kt_core.load_model
with FP8 experts and by the GPU baseline's dequantizing load, with equal weights after dequantization."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench_sft  # noqa: E402
from shapes import build_config  # noqa: E402

from kt_core import KTExperts  # noqa: E402
from kt_core.loading import load_model  # noqa: E402
from kt_core.loading.fp8 import dequantize_experts_fp8, quantize_fp8_blockwise  # noqa: E402

FP8 = torch.float8_e4m3fn


def tiny_config(layers: int = 2):
    """The benchmark's tiny DeepSeek-V3 (hidden 256, 16 experts of I = 64): one dense layer, then MoE layers."""
    return build_config(True, layers, "deepseek-v3")


def write(path: Path, expert_dtype: str, block=(128, 128), shard_bytes: int = 2**20) -> Path:
    bench_sft.write_checkpoint(
        tiny_config(), path, "cpu", expert_dtype, block=block, shard_bytes=shard_bytes, tokenizer=False, progress=False
    )
    return path


def read_all(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for file in sorted(path.glob("*.safetensors")):
        out.update(load_file(file))
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-sft")
    return write(root / "bf16", "bf16"), write(root / "fp8", "fp8"), write(root / "fp8-32", "fp8", block=(32, 32))


def test_fp8_checkpoint_layout(checkpoints):
    bf16, fp8, _ = checkpoints
    config = json.loads((fp8 / "config.json").read_text())
    assert config["quantization_config"] == bench_sft.FP8_QUANTIZATION
    assert "quantization_config" not in json.loads((bf16 / "config.json").read_text())
    index = json.loads((fp8 / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 1 and files == {p.name for p in fp8.glob("*.safetensors")}  # written shard by shard
    assert not list(fp8.parent.glob("fp8.*"))  # the temp folder was renamed
    tensors = read_all(fp8)
    assert set(index["weight_map"]) == set(tensors)
    e = "model.layers.1.mlp.experts.5."
    for proj, shape, scale in (("gate", (64, 256), (1, 2)), ("up", (64, 256), (1, 2)), ("down", (256, 64), (2, 1))):
        assert tensors[f"{e}{proj}_proj.weight"].dtype == FP8
        assert tuple(tensors[f"{e}{proj}_proj.weight"].shape) == shape
        assert tuple(tensors[f"{e}{proj}_proj.weight_scale_inv"].shape) == scale
    # as DeepSeek-V3's release: every projection in FP8 (kv_a_proj_with_mqa too); embeddings, head, router, norms not
    assert tensors["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"].dtype == FP8
    assert tensors["model.layers.0.mlp.gate_proj.weight"].dtype == FP8
    assert tensors["model.layers.1.mlp.shared_experts.down_proj.weight"].dtype == FP8
    for key in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.gate.weight", "model.norm.weight"):
        assert tensors[key].dtype == torch.bfloat16, key
    # the same random weights as the bf16 checkpoint, quantized
    plain = read_all(bf16)
    assert set(plain) == {k for k in tensors if not k.endswith("_scale_inv")}
    q, scale = quantize_fp8_blockwise(plain[f"{e}down_proj.weight"])
    assert torch.equal(q.view(torch.uint8), tensors[f"{e}down_proj.weight"].view(torch.uint8))
    assert torch.equal(scale, tensors[f"{e}down_proj.weight_scale_inv"])


@pytest.mark.parametrize("which", [1, 2], ids=["block128", "block32"])
def test_fp8_experts_equal_the_dequantized_load(checkpoints, which):
    """kt_core.load_model(expert_dtype="fp8") keeps the checkpoint's bytes; dequantized, they are the weights the GPU
    baseline loads (bench_sft.load_dequantized) and those kt_core.load_model's default dequantizing load gives."""
    path = checkpoints[which]
    kept = load_model(path, device="cpu", progress=False, expert_dtype="fp8")
    dequantized = load_model(path, device="cpu", progress=False)
    baseline = bench_sft.load_dequantized(path, "cpu")
    tensors = read_all(path)
    for i in (1,):  # the MoE layer
        experts = kept.model.layers[i].mlp.experts
        assert isinstance(experts, KTExperts) and experts.is_fp8
        I = experts.intermediate_dim
        raw = tensors[f"model.layers.{i}.mlp.experts.3.up_proj.weight"]
        assert torch.equal(experts.gate_up_proj[3, I:].view(torch.uint8), raw.view(torch.uint8))
        gu, d = dequantize_experts_fp8(
            experts.gate_up_proj,
            experts.gate_up_proj_scale_inv,
            experts.down_proj,
            experts.down_proj_scale_inv,
            experts.weight_block_size,
        )
        hf = baseline.model.layers[i].mlp.experts
        assert torch.equal(gu, hf.gate_up_proj) and torch.equal(d, hf.down_proj)
        assert torch.equal(gu, dequantized.model.layers[i].mlp.experts.gate_up_proj)
        assert torch.equal(d, dequantized.model.layers[i].mlp.experts.down_proj)
    # every other weight: the baseline's dequantization is kt_core's
    ours = dict(kept.named_parameters())
    for name, p in baseline.named_parameters():
        if ".mlp.experts." not in name:
            assert torch.equal(ours[name], p), name
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = kept(ids).logits.float(), baseline(ids).logits.float()
    assert ((a - b).norm() / b.norm()).item() < 2e-2  # bf16 compute on both sides, only the expert kernels differ


def test_bf16_checkpoint_loads_in_transformers(checkpoints):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(checkpoints[0], dtype=torch.bfloat16, output_loading_info=True)
    assert not any(info.values()), info
    tensors = read_all(checkpoints[0])
    gu = model.model.layers[1].mlp.experts.gate_up_proj
    assert torch.equal(gu[2, : gu.shape[1] // 2], tensors["model.layers.1.mlp.experts.2.gate_proj.weight"])


def test_config_names_its_model_class_as_a_release_does(checkpoints):
    """Servers pick the model class from config.json's `architectures` (SGLang refuses a config without it)."""
    for path in checkpoints[:2]:
        assert json.loads((path / "config.json").read_text())["architectures"] == ["DeepseekV3ForCausalLM"]


def test_reuse_refuses_the_other_dtype(checkpoints):
    with pytest.raises(SystemExit, match="FP8"):
        bench_sft.write_checkpoint(tiny_config(), checkpoints[1], "cpu", "bf16", tokenizer=False)


def test_step_sizes_and_summaries():
    assert bench_sft.step_sizes(None, 16, 2048) == [(16, 2048)]
    assert bench_sft.step_sizes("2048,8192,32768", 1, 4096) == [(1, 2048), (2, 4096), (8, 4096)]
    with pytest.raises(SystemExit, match="multiple"):
        bench_sft.step_sizes("6000", 1, 4096)
    runs = [
        {"mode": "gpu", "losses": [2.0, 1.5, 1.0]},
        {"mode": "kt-cpu", "losses": [2.0, 1.52, 1.01]},
        {"mode": "kt-stream", "error": "exit status 1"},
        {"mode": "kt-stream-gpu", "losses": [2.0, 1.49, 0.97]},
    ]
    s = bench_sft.loss_summary(runs)
    assert s["reference"] == "gpu" and set(s["loss_max_abs_diff"]) == {"kt-cpu", "kt-stream-gpu"}
    assert s["loss_max_abs_diff"]["kt-cpu"] == pytest.approx(0.02)
    assert s["max_pairwise"] == pytest.approx(0.04)
    streamed = [{"kt_stream_cpu_ms": 10.0, "kt_stream_pcie_ms": 30.0, "kt_stream_gpu_ms": 20.0,
                 "kt_stream_cpu_slot_share": 0.25, "kt_cpu_expert_share": 0.1}] * 3  # fmt: skip
    split = bench_sft.step_split(streamed, [1.0, 1.0, 1.0])
    assert split["cpu_s"] == pytest.approx(0.01) and split["pcie_s"] == pytest.approx(0.03)
    assert split["cpu_slot_share"] == 0.25
    cpu_only = bench_sft.step_split([{"kt_cpu_expert_share": 0.5}] * 2, [2.0, 4.0])
    assert cpu_only["cpu_s"] == pytest.approx(1.5) and cpu_only["pcie_s"] == 0.0 and cpu_only["cpu_slot_share"] == 1.0


def test_streamed_only_mode_leaves_the_cpu_nothing(checkpoints):
    """kt-stream-gpu's settings (enable_streaming's mode "gpu", slots of a whole layer from full_layer_slots): every
    routed slot is computed on the streaming side, no resident experts (the CPU stands in for the GPU here)."""
    from kt_core import enable_streaming

    model = load_model(checkpoints[0], device="cpu", progress=False)
    layer = next(m for m in model.modules() if isinstance(m, KTExperts))
    budget = bench_sft.full_layer_slots(model)
    assert budget == layer.num_experts * 2 * 3 * layer.hidden_dim * layer.intermediate_dim * 2
    rt = enable_streaming(model, expert_gpu_memory=budget, device="cpu", mode="gpu")
    try:
        assert rt.resident_per_layer == 0 and rt.store.capacity == layer.num_experts
        ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
        for _ in range(2):
            model(ids, labels=ids).loss.backward()
            report = rt.end_step()
            assert report["cpu_slot_share"] == 0.0 and report["cpu_s"] == 0.0, report
    finally:
        rt.disable()


def test_split_lines_are_kept():
    import logging

    lines: list[str] = []
    handler = bench_sft.SplitLines(lines)
    logger = logging.getLogger("kt_core.streaming")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        logger.info("streaming step %d: %.0f ms | CPU %.0f ms", 3, 120.0, 40.0)
        logger.info("streaming: 2 layers on cuda:0")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert lines == ["streaming step 3: 120 ms | CPU 40 ms"]


class _DeviceEvent:
    """A profiler kineto event as stream_summary reads it: a CUDA event on a stream (stream None: a host op),
    [start, end) in ns."""

    def __init__(self, stream: int | None, start: int, end: int, name: str):
        self.stream, self.start, self.end, self._name = stream, start, end, name

    def device_type(self):
        from torch.autograd import DeviceType

        return DeviceType.CPU if self.stream is None else DeviceType.CUDA

    def device_resource_id(self):
        return self.stream

    def start_ns(self):
        return self.start

    def end_ns(self):
        return self.end

    def duration_ns(self):
        return self.end - self.start

    def name(self):
        return self._name


def test_profile_summary_reads_the_streams_overlap_and_the_host_syncs():
    ms = 1_000_000
    copy = "Memcpy HtoD (Pinned -> Device)"
    events = [  # compute busy [0, 10) and [15, 30) ms; copies [5, 20) and [25, 40) ms: 5 + 5 + 5 = 15 ms overlap
        _DeviceEvent(7, 0, 10 * ms, "gemm"),
        _DeviceEvent(7, 15 * ms, 30 * ms, "gemm"),
        _DeviceEvent(7, 16 * ms, 18 * ms, "nested"),  # inside a busy span: counted once
        _DeviceEvent(13, 5 * ms, 20 * ms, copy),
        _DeviceEvent(13, 25 * ms, 40 * ms, copy),
    ]
    lines = bench_sft.stream_summary(events)
    assert "40.0 ms from the first device event to the last" in lines[0]
    compute = next(line for line in lines if "(compute)" in line)
    copies = next(line for line in lines if "(copies )" in line)
    assert "busy      25.0 ms" in compute and "stream    7" in compute
    assert "busy      30.0 ms" in copies and "overlapping compute     15.0 ms" in copies

    host = [  # the host ops running when the compute stream's gaps began
        _DeviceEvent(None, 8 * ms, 16 * ms, "ExpertsFunction"),
        _DeviceEvent(None, 9 * ms, 11 * ms, "aten::copy_"),
        _DeviceEvent(None, 29 * ms, 31 * ms, "aten::item"),
    ]
    events += [*host, _DeviceEvent(7, 32 * ms, 33 * ms, "gemm")]  # compute gaps: [10, 15) and [30, 32) ms
    lines = bench_sft.gap_summary(events)
    assert lines[0].startswith("compute stream idle inside the step: 7.0 ms in 2 gaps")
    assert "a copy stream busy 7.0 ms" in lines[0] and "nothing on the device 0.0 ms" in lines[0]
    assert lines[1].split()[:2] == ["5.00", "ms"]
    assert "copies   5.00 ms; host: aten::copy_ < ExpertsFunction" in lines[1]
    assert "+    30.0 ms" in lines[2] and lines[2].endswith("host: aten::item")

    class Caught:
        def __init__(self, message, filename, lineno):
            self.message, self.filename, self.lineno = message, filename, lineno

    sync = "called a synchronizing CUDA operation"
    caught = [Caught(sync, "store.py", 427)] * 3 + [Caught(sync, "clip.py", 9), Caught("other", "x.py", 1)]
    lines = bench_sft.sync_summary(caught)
    assert lines[0] == "host synchronisations in the step: 4"
    assert lines[1].split() == ["3", "store.py:427"] and lines[2].split() == ["1", "clip.py:9"]


@pytest.mark.parametrize("expert_lora", ["on", "off"])
def test_llamafactory_modes_differ_only_in_the_kt_keys(expert_lora, tmp_path):
    """lf-gpu is stock LLaMA-Factory; the kt modes add `use_kt` and their own keys only, and --expert-lora off gives
    them stock LLaMA-Factory's trainable set (kt_expert_lora: false)."""
    from types import SimpleNamespace

    a = SimpleNamespace(
        checkpoint=tmp_path, rank=8, seq=64, batch=2, warmup=1, steps=2, lr=1e-4, device="cuda", cpu_infer=None,
        expert_lora=expert_lora, expert_gpu_memory="3GiB", gpu_memory_limit=None, stream_keep_bytes="2GiB",
    )  # fmt: skip
    stock = bench_sft.llamafactory_config("lf-gpu", a, tmp_path)
    assert "use_kt" not in stock and stock["lora_target"] == "all" and stock["use_cpu"] is False
    cpu = bench_sft.llamafactory_config("lf-kt-cpu", a, tmp_path)
    stream = bench_sft.llamafactory_config("lf-kt-stream", a, tmp_path)
    assert {k: v for k, v in cpu.items() if k not in stock} == {"use_kt": True, "kt_expert_lora": expert_lora == "on"}
    assert stream == {**cpu, "kt_expert_gpu_memory": "3GiB", "kt_stream_keep_bytes": "2GiB"}
    assert {k: v for k, v in cpu.items() if k in stock} == stock
