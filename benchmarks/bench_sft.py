"""LoRA fine-tuning as users run it: the stock HF Trainer or stock LLaMA-Factory from a checkpoint on disk,
kt-plugins against the same framework fully on the GPU, every mode measured in the same command.

One checkpoint (random weights of a real shape, written once, shard by shard, and reused), LoRA r=8 on attention and
on the routed experts, bf16, gradient checkpointing, the Trainer's default optimizer (fused AdamW), random token
rows of `--seq` tokens. Modes (each in its own process, so each peak is its own):

  gpu          AutoModelForCausalLM.from_pretrained(device_map="cuda") + PEFT + Trainer: the baseline,
               with transformers' own loss (what its users get)
  gpu-loss     the same with kt_core.enable_efficient_loss (the loss kt-plugins turns on), to separate
               what the loss saves from what the expert split saves
  kt-cpu       kt_core.load_model + PEFT + Trainer(callbacks=[KTCallback()]): routed experts on the CPU
  kt-stream    the same with KTCallback(expert_gpu_memory=--expert-gpu-memory): experts streamed to the GPU / split
               by the planner; kt-stream-int8 streams int8 copies
  kt-stream-gpu  every expert streamed, none on the CPU: enable_streaming's mode "gpu" with slots that hold a whole
               layer (2 x E experts of GPU memory, no residents; --expert-gpu-memory does not apply)

  lf-gpu       LLaMA-Factory's own `run_exp` (what `llamafactory-cli train` calls) on the YAML keys of an SFT
               run (`lora_target: all`, bf16, its default optimizer and gradient checkpointing), all on the GPU
  lf-gpu-liger the same with LLaMA-Factory's `enable_liger_kernel: true` (its memory-efficient loss)
  lf-kt-cpu    `use_kt: true` (routed experts on the CPU), the plugin booted by its .pth hook as in the CLI
  lf-kt-stream `use_kt: true` + `kt_expert_gpu_memory: --expert-gpu-memory`
  LLaMA-Factory modes train on generated long records truncated to `cutoff_len: --seq` (every sequence
  exactly --seq tokens); the checkpoint gets a small byte-level tokenizer for them.

--expert-dtype fp8 writes the checkpoint as DeepSeek-V3 ships it: every projection (routed experts per expert,
`model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight`) in float8_e4m3fn with its 128 x 128 `weight_scale_inv`,
DeepSeek's `quantization_config` in config.json; the same random weights as the bf16 checkpoint, quantized. kt modes
load it with `kt_core.load_model(..., expert_dtype="fp8")` (experts kept FP8 in host RAM, half of bf16's bytes);
kt-stream modes stream them as FP8 (e4m3 and scales over PCIe, dequantized on the GPU a group at a time);
the gpu modes load a bf16-dequantized copy (load_dequantized: transformers' FP8 modules do not train); LLaMA-Factory
modes are refused.

--expert-lora off trains LoRA on attention only (and, in LLaMA-Factory modes, on the other linear modules `lora_target:
all` finds): with transformers 5 stock LLaMA-Factory cannot put LoRA on the fused expert weights, so `use_kt` modes
train more than lf-gpu by default (`kt_expert_lora`); off gives both the same trainable set and the same loss curve.

--tokens-per-step 2048,8192,32768 runs every mode at each size (sequences of --seq tokens, batch = size / seq) and
adds per size the tokens/s, peak GPU memory, the split and the largest loss-curve difference between modes.

--profile PREFIX writes, for the modes of --profile-modes, `torch.profiler` tables of the last step to PREFIX-MODE.txt,
headed on CUDA by each stream's busy time and its overlap with the compute stream (copies hidden or not), by the
compute stream's idle gaps (split into waiting for a copy and waiting for the host, the longest with the host ops
running when they began) and by the step's host synchronisations counted by Python line
(torch.cuda.set_sync_debug_mode("warn")).

Reported per mode: tokens/s (median step after --warmup steps, timed between the Trainer's step callbacks,
tokens counted by the Trainer's `include_num_input_tokens_seen`),
peak GPU memory (torch.cuda.max_memory_allocated over training), host RSS at each step's start and at the end
(`host_rss_gib`: streamed layers free their weights once their CPU operator packs) and, for the kt modes, the peak
the memory plan gave before the run ("planned", kt_core.streaming.memory_plan), the loss curve, kt's speed logs and
the split of a step (`split`: median CPU operator / PCIe copy / GPU expert seconds per step, with the streaming
runtime's own "streaming step N: ..." lines in `split_lines`).

    python benchmarks/bench_sft.py --shape dsv2-lite --batch 16 --modes gpu,gpu-loss,kt-stream --out sft.json
    python benchmarks/bench_sft.py --shape qwen3-30b-a3b --batch 8 --checkpoint /data/q3 --expert-gpu-memory 12GiB
    python benchmarks/bench_sft.py --layers 8 --batch 8 --modes lf-gpu,lf-kt-stream --expert-gpu-memory 4GiB
    # DeepSeek-V3 full width, 3 dense + 2 MoE layers: 53 GB bf16 checkpoint; host RAM 45 GB of experts + the AMX
    # kernel's packed copy (6 layers would need 76 GB of disk and 135 GB of RAM)
    python benchmarks/bench_sft.py --shape deepseek-v3 --layers 5 --seq 2048 --tokens-per-step 2048,8192,32768 \
        --modes gpu-loss,kt-cpu,kt-stream,kt-stream-gpu --expert-gpu-memory 24GiB --warmup 1 --steps 3 \
        --mode-timeout 3600 --out dsv3-bf16.json
    # the same weights as DeepSeek ships them, FP8: 28.5 GB on disk, 22.5 GB of experts in host RAM (+ packed copy)
    python benchmarks/bench_sft.py --shape deepseek-v3 --layers 5 --expert-dtype fp8 --seq 2048 \
        --tokens-per-step 2048,8192,32768 --modes gpu-loss,kt-cpu,kt-stream,kt-stream-gpu --expert-gpu-memory 24GiB \
        --warmup 1 --steps 3 --mode-timeout 3600 --out dsv3-fp8.json
    # FP8, 3 dense + 4 MoE layers: 51.5 GB on disk, 45 GB of experts + 45 GB packed in RAM (8 layers: 63 GB of disk)
    python benchmarks/bench_sft.py --shape deepseek-v3 --layers 7 --expert-dtype fp8 --seq 2048 \
        --tokens-per-step 2048,8192 --modes gpu-loss,kt-cpu --warmup 1 --steps 3 --out dsv3-fp8-7.json
    python benchmarks/bench_sft.py --small --modes gpu,kt-cpu,lf-kt-cpu --device cpu   # tiny shapes, smoke test
    python benchmarks/bench_sft.py --small --shape deepseek-v3 --expert-dtype fp8 --modes gpu,kt-cpu --device cpu
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from shapes import EXPERT_TARGETS, SHAPES, attention_targets, build_config

TRAINER_MODES = ("gpu", "gpu-loss", "kt-cpu", "kt-stream", "kt-stream-int8", "kt-stream-gpu")
LLAMAFACTORY_MODES = ("lf-gpu", "lf-gpu-liger", "lf-kt-cpu", "lf-kt-stream")
MODES = TRAINER_MODES + LLAMAFACTORY_MODES
EXPERT_DTYPES = ("bf16", "fp8")
FP8_BLOCK = (128, 128)
# quantization_config as deepseek-ai/DeepSeek-V3's config.json carries it
FP8_QUANTIZATION = {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "weight_block_size": [128, 128],
}
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def checkpoint_tensors(config) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of `config`'s checkpoint as transformers saves it (routed experts per expert: DeepSeek's
    `model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight`), from a model built on the meta device."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    out = []
    for key, t in model.state_dict().items():
        prefix, _, name = key.rpartition(".")
        if prefix.endswith(".experts") and name == "gate_up_proj":  # [E, 2I, H]
            E, two_I, H = t.shape
            for e in range(E):
                out += [(f"{prefix}.{e}.{p}_proj.weight", (two_I // 2, H)) for p in ("gate", "up")]
                out.append((f"{prefix}.{e}.down_proj.weight", (H, two_I // 2)))  # down_proj [E, H, I]
        elif not (prefix.endswith(".experts") and name == "down_proj"):
            out.append((key, tuple(t.shape)))
    return out


def is_fp8_weight(key: str, shape: tuple[int, ...]) -> bool:
    """What DeepSeek-V3's release stores in FP8: every 2-D projection (attention, dense and shared MLPs, routed
    experts); the embeddings, the LM head, the router and the norms stay bf16."""
    module, _, name = key.rpartition(".")
    return len(shape) == 2 and name == "weight" and "_proj" in module.rpartition(".")[2]  # kv_a_proj_with_mqa too


def _random_tensor(key: str, shape: tuple[int, ...], std: float, gen: torch.Generator, device: str) -> torch.Tensor:
    """Random init as transformers' (normal(0, initializer_range); norms 1, biases 0), drawn from `gen`."""
    if len(shape) == 1:
        fill = 1.0 if key.endswith(".weight") else 0.0
        return torch.full(shape, fill, dtype=torch.bfloat16, device=device)
    return torch.empty(shape, dtype=torch.bfloat16, device=device).normal_(0.0, std, generator=gen)


def write_checkpoint(
    config,
    path: Path,
    device: str,
    expert_dtype: str = "bf16",
    *,
    block: tuple[int, int] = FP8_BLOCK,
    shard_bytes: int = 4 * 2**30,
    tokenizer: bool = True,
    progress: bool = True,
) -> None:
    """Random weights of `config` written shard by shard (one shard in host RAM at a time), as transformers saves
    them; with expert_dtype="fp8", as DeepSeek-V3 ships: projections in e4m3 with 128 x 128 `weight_scale_inv`
    block scales beside them and DeepSeek's `quantization_config` in config.json.

    The weights are drawn on `device` (fast on a GPU) from one generator seeded by the checkpoint's tensor names,
    so the bf16 and the fp8 checkpoint of one config hold the same weights, the fp8 one quantized. Written into a
    temp folder next to `path`, renamed to `path` at the end; an existing `path` is reused.
    """
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from kt_core.loading.fp8 import quantize_fp8_blockwise

    if (path / "config.json").exists():
        quantized = "quantization_config" in json.loads((path / "config.json").read_text())
        if quantized != (expert_dtype == "fp8"):
            raise SystemExit(
                f"checkpoint {path} is {'FP8' if quantized else 'bf16'}, --expert-dtype is {expert_dtype}: "
                "give another --checkpoint (or delete this one)"
            )
        print(f"checkpoint: reusing {path}", flush=True)
        return
    t0 = time.perf_counter()
    if tokenizer:
        sys.path.insert(0, str(EXAMPLES / "tiny_moe"))
        from make_checkpoint import build_tokenizer

        tok = build_tokenizer(config.vocab_size)  # small: trained on the bundled dataset
        config.eos_token_id = tok.convert_tokens_to_ids("<|im_end|>")
        config.pad_token_id = tok.pad_token_id
    fp8 = expert_dtype == "fp8"
    tensors = checkpoint_tensors(config)

    def nbytes(key, shape):
        n = torch.Size(shape).numel()
        if fp8 and is_fp8_weight(key, shape):
            return n + 4 * -(-shape[0] // block[0]) * -(-shape[1] // block[1])
        return 2 * n

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".", dir=path.parent))
    gen = torch.Generator(device=device).manual_seed(0)
    std = getattr(config, "initializer_range", 0.02)
    shards: list[list[str]] = []
    shard: dict[str, torch.Tensor] = {}
    held = total = 0

    def flush():
        nonlocal shard, held
        if shard:
            save_file(shard, tmp / f"shard-{len(shards):05d}.safetensors", metadata={"format": "pt"})
            shards.append(list(shard))
            shard, held = {}, 0

    bar = tqdm(total=sum(nbytes(k, s) for k, s in tensors), unit="B", unit_scale=True, disable=not progress)
    bar.set_description(f"Writing {path.name} ({expert_dtype})")
    for key, shape in tensors:
        w = _random_tensor(key, shape, std, gen, device)
        out = {key: w}
        if fp8 and is_fp8_weight(key, shape):
            q, scale_inv = quantize_fp8_blockwise(w, block)
            out = {key: q, key + "_scale_inv": scale_inv}
        for k, t in out.items():
            shard[k] = t.cpu()
            held += t.numel() * t.element_size()
        total += nbytes(key, shape)
        bar.update(nbytes(key, shape))
        if held >= shard_bytes:
            flush()
    flush()
    bar.close()
    weight_map = {}
    for i, keys in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        os.replace(tmp / f"shard-{i:05d}.safetensors", tmp / name)
        weight_map.update(dict.fromkeys(keys, name))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    if not config.architectures:  # servers (SGLang) pick the model class by it, as from a released config.json
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
    config.save_pretrained(tmp)
    if fp8:
        saved = json.loads((tmp / "config.json").read_text())
        saved["quantization_config"] = {**FP8_QUANTIZATION, "weight_block_size": list(block)}
        (tmp / "config.json").write_text(json.dumps(saved, indent=2))
    if tokenizer:
        tok.save_pretrained(tmp)
    os.replace(tmp, path)
    print(f"checkpoint: wrote {path} ({total / 1e9:.1f} GB, {len(shards)} shards) in {time.perf_counter() - t0:.0f} s")


def load_dequantized(path: Path, device: str, dtype: torch.dtype = torch.bfloat16):
    """transformers' model of an FP8 checkpoint with every weight dequantized to `dtype` (kt_core.loading.fp8, the
    dequantization kt_core.load_model applies), built on `device` and filled tensor by tensor from the shards.

    The GPU baseline's load of an FP8 checkpoint: transformers' own FP8 integration (FineGrainedFP8HfQuantizer)
    keeps FP8Linear / FP8Experts modules that do not train (its `is_trainable` is False, so the Trainer refuses
    the model), its `dequantize=True` path refuses weights that are not whole 128 x 128 blocks (DeepSeek-V3's
    kv_a_proj_with_mqa has 576 rows), and it imports triton, which a CPU build of torch lacks (transformers 5.6).
    """
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    from kt_core.loading.fp8 import dequantize_fp8_blockwise, fp8_block_size

    config_dict = json.loads((path / "config.json").read_text())
    block = fp8_block_size(config_dict) or FP8_BLOCK
    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = model.state_dict()
    index = path / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    )
    filled: dict[str, int] = {}
    with torch.no_grad():
        for file in files:
            with safe_open(path / file, "pt", device="cpu") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                    if key.endswith("_scale_inv"):
                        continue
                    w = f.get_tensor(key)
                    if w.dtype == torch.float8_e4m3fn:
                        w = dequantize_fp8_blockwise(w.to(device), f.get_tensor(key + "_scale_inv"), block, dtype)
                    prefix, _, rest = key.partition(".experts.")
                    if rest:  # per expert: into the fused gate_up_proj [E, 2I, H] / down_proj [E, H, I]
                        e, proj, _ = rest.split(".", 2)
                        fused = f"{prefix}.experts.{'down_proj' if proj == 'down_proj' else 'gate_up_proj'}"
                        I = state[fused].shape[1] // 2
                        rows = {"gate_proj": slice(0, I), "up_proj": slice(I, 2 * I), "down_proj": slice(None)}[proj]
                        state[fused][int(e), rows].copy_(w)
                        filled[fused] = filled.get(fused, 0) + (2 if proj == "down_proj" else 1)
                    else:
                        state[key].copy_(w)
                        filled[key] = 2
    # every tensor once; a fused experts tensor once per expert and projection (gate and up halves count 1 each)
    missing = [k for k, t in state.items() if filled.get(k, 0) != (2 * t.shape[0] if ".experts." in k else 2)]
    if missing:
        raise SystemExit(f"{path}: {len(missing)} weights not in the checkpoint, e.g. {missing[:3]}")
    return model.eval()


class StepMeter:
    """A TrainerCallback timing each optimizer step (device-synchronized) and reading the peak GPU memory."""

    def __init__(self, cuda: bool, profile: str | None = None, profile_step: int = 0):
        from transformers import TrainerCallback

        meter = self

        class _Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                if cuda:
                    torch.cuda.reset_peak_memory_stats()

            def on_step_begin(self, args, state, control, **kwargs):
                meter.host_gib.append(host_rss_gib())  # after the previous step's end (streamed layers' release)
                if profile and len(meter.step_s) == profile_step:
                    meter._profiler = _start_profiler(cuda)
                meter._sync()
                meter._t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                meter._sync()
                meter.step_s.append(time.perf_counter() - meter._t0)
                meter.step_tokens.append(state.num_input_tokens_seen - meter._seen)
                meter._seen = state.num_input_tokens_seen
                if meter._profiler is not None:
                    _write_profile(meter._profiler, profile, cuda)
                    meter._profiler = None
                print(
                    f"    step {len(meter.step_s)}: {meter.step_s[-1] * 1e3:8.0f} ms, host RSS at its start "
                    f"{meter.host_gib[-1]:.1f} GiB",
                    flush=True,
                )

            def on_train_end(self, args, state, control, **kwargs):
                # the history, where KTCallback adds its speed logs to each entry (it may run after this callback)
                meter.logs = [dict(log) for log in state.log_history]
                meter.host_gib.append(host_rss_gib())

        self.cuda = cuda
        self.step_s: list[float] = []
        self.step_tokens: list[int] = []
        self._seen = 0
        self._profiler = None
        self.logs: list[dict] = []
        self.split_lines: list[str] = []
        self.host_gib: list[float] = []  # host RSS at each step's start, then at the end of training
        logging.getLogger("kt_core.streaming").addHandler(SplitLines(self.split_lines))
        self.callback = _Callback()

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def result(self, mode: str, warmup: int, **extra) -> dict:
        from kt_core.streaming.memory_plan import last_plan

        timed = list(zip(self.step_s, self.step_tokens, strict=True))[warmup:]
        step_s = statistics.median(t for t, _ in timed)
        plan = last_plan()  # kt modes: the GPU memory plan made before the run, to set beside the measured peak
        kt_logs = [
            {k: v for k, v in log.items() if k.startswith("kt_")} for log in self.logs if "kt_tokens_per_s" in log
        ]
        return dict(
            mode=mode,
            step_ms=step_s * 1e3,
            step_ms_all=[t * 1e3 for t in self.step_s],
            tokens_per_step=statistics.median(n for _, n in timed),
            tok_s=sum(n for _, n in timed) / sum(t for t, _ in timed),
            peak_gib=torch.cuda.max_memory_allocated() / 2**30 if self.cuda else float("nan"),
            planned_gib=plan.peak / 2**30 if plan is not None else None,
            losses=[log["loss"] for log in self.logs if "loss" in log],
            kt_logs=kt_logs,
            split=step_split(kt_logs[warmup:], [t for t, _ in timed]) if kt_logs else None,
            split_lines=list(self.split_lines),
            host_rss_gib=[round(g, 2) for g in self.host_gib],
            **extra,
        )


def host_rss_gib() -> float:
    """This process's resident host memory (VmRSS), GiB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**30


def step_split(kt_logs: list[dict], step_s: list[float]) -> dict:
    """Median per timed step of where the experts' time went, from the logs KTCallback adds (logging_steps=1):
    with streaming, the runtime's CPU operator / PCIe copy / GPU expert seconds and the CPU's share of the routed
    slots (kt_stream_*); without, the CPU operator's seconds (kt_cpu_expert_share of the step), nothing on PCIe
    or the GPU."""

    def median(values):
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None

    streamed = any("kt_stream_cpu_ms" in log for log in kt_logs)
    if streamed:
        ms = {side: median(log.get(f"kt_stream_{side}_ms") for log in kt_logs) for side in ("cpu", "pcie", "gpu")}
        split = {f"{side}_s": None if v is None else v / 1e3 for side, v in ms.items()}
        split["cpu_slot_share"] = median(log.get("kt_stream_cpu_slot_share") for log in kt_logs)
    else:
        shares = [log.get("kt_cpu_expert_share") for log in kt_logs]
        cpu = [sh * t for sh, t in zip(shares, step_s, strict=False) if sh is not None]
        split = {"cpu_s": median(cpu), "pcie_s": 0.0, "gpu_s": 0.0, "cpu_slot_share": 1.0}
    split["cpu_expert_share"] = median(log.get("kt_cpu_expert_share") for log in kt_logs)
    split["source"] = "kt_stream_* logs (streaming runtime)" if streamed else "kt_cpu_expert_share x step time"
    return split


class SplitLines(logging.Handler):
    """Keeps the streaming runtime's per-step split line ("streaming step N: ... | CPU ... | PCIe ... | GPU ...")."""

    def __init__(self, lines: list[str]):
        super().__init__(logging.INFO)
        self.lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("streaming step"):
            self.lines.append(message)


def _start_profiler(cuda: bool):
    import warnings

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    profiler = profile(activities=activities)
    profiler.__enter__()
    profiler.kt_syncs = None
    if cuda:  # every host synchronisation an op makes during the step, by the Python line that made it
        profiler.kt_syncs = warnings.catch_warnings(record=True)
        profiler.kt_sync_list = profiler.kt_syncs.__enter__()
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
    return profiler


def _step_events(events):
    """The profiler's kineto events of a step, sorted out: per CUDA stream its [(start, end)] spans, its host-to-device
    copy ns and its other (kernel) ns; and the host ops as [(start, end, name)] (one clock with the device's)."""
    from torch.autograd import DeviceType

    spans: dict[int, list[tuple[int, int]]] = {}
    copy_ns: dict[int, int] = {}
    kernel_ns: dict[int, int] = {}
    host: list[tuple[int, int, str]] = []
    for e in events:
        if e.duration_ns() <= 0:
            continue
        if e.device_type() == DeviceType.CPU:
            host.append((e.start_ns(), e.end_ns(), e.name()))
        elif e.device_type() == DeviceType.CUDA:
            stream = e.device_resource_id()
            spans.setdefault(stream, []).append((e.start_ns(), e.end_ns()))
            into = copy_ns if "Memcpy HtoD" in e.name() else kernel_ns
            into[stream] = into.get(stream, 0) + e.duration_ns()
    return spans, copy_ns, kernel_ns, host


def _union(intervals) -> list[list[int]]:
    out: list[list[int]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def _total(intervals) -> int:
    return sum(b - a for a, b in intervals)


def _intersect(x, y) -> int:
    i = j = n = 0
    while i < len(x) and j < len(y):
        n += max(0, min(x[i][1], y[j][1]) - max(x[i][0], y[j][0]))
        if x[i][1] < y[j][1]:
            i += 1
        else:
            j += 1
    return n


def stream_summary(events) -> list[str]:
    """Busy time of each CUDA stream in the step and the overlap of the copy streams with the compute stream.

    events: the profiler's kineto events. The compute stream is the one with the most kernel time; a copy
    stream is one whose time is mostly host-to-device copies. Busy = the union of the stream's event intervals.
    """
    spans, copy_ns, kernel_ns, _ = _step_events(events)
    if not spans:
        return ["streams: no device events"]
    busy = {s: _union(v) for s, v in spans.items()}
    wall = max(b for v in busy.values() for _, b in v) - min(a for v in busy.values() for a, _ in v)
    compute = max(kernel_ns, key=kernel_ns.get) if kernel_ns else None
    lines = [f"device streams over the step ({wall / 1e6:.1f} ms from the first device event to the last):"]
    for s in sorted(busy, key=lambda s: -_total(busy[s])):
        role = "compute" if s == compute else ("copies" if copy_ns.get(s, 0) > kernel_ns.get(s, 0) else "other")
        line = (
            f"  stream {s:4d} ({role:7s}) busy {_total(busy[s]) / 1e6:9.1f} ms: "
            f"kernels {kernel_ns.get(s, 0) / 1e6:8.1f} ms, host-to-device copies {copy_ns.get(s, 0) / 1e6:8.1f} ms"
        )
        if compute is not None and s != compute:
            line += f", overlapping compute {_intersect(busy[s], busy[compute]) / 1e6:8.1f} ms"
        lines.append(line)
    return lines


def gap_summary(events, longest: int = 12) -> list[str]:
    """Where the compute stream idles inside the step, and what the host was doing then.

    events: the profiler's kineto events (CUDA and CPU, one clock). Each gap of the compute stream (the one with
    the most kernel time) is split into time a copy stream was busy (the compute waits for a copy) and time no
    stream was (the device waits for the host); the longest gaps are listed with the host ops that enclosed their
    start, innermost first.
    """
    spans, _, kernel_ns, host = _step_events(events)
    if not kernel_ns:
        return []
    compute = max(kernel_ns, key=kernel_ns.get)
    busy = _union(spans[compute])
    others = _union([iv for s, v in spans.items() if s != compute for iv in v])
    first = min(a for v in spans.values() for a, _ in v)
    gaps = [(a, b) for (_, a), (b, _) in itertools.pairwise(busy) if b > a]
    copying = [_intersect([[a, b]], others) for a, b in gaps]
    idle = _total(gaps)
    lines = [
        f"compute stream idle inside the step: {idle / 1e6:.1f} ms in {len(gaps)} gaps; of it, a copy stream busy "
        f"{sum(copying) / 1e6:.1f} ms (compute waits for a copy), nothing on the device "
        f"{(idle - sum(copying)) / 1e6:.1f} ms (the device waits for the host)"
    ]
    for i in sorted(range(len(gaps)), key=lambda i: gaps[i][0] - gaps[i][1])[:longest]:
        a, b = gaps[i]
        enclosing = sorted((e - s, name) for s, e, name in host if s <= a < e)
        names = list(dict.fromkeys(name for _, name in enclosing))[:4]
        lines.append(
            f"  {(b - a) / 1e6:7.2f} ms at +{(a - first) / 1e6:8.1f} ms, copies {copying[i] / 1e6:6.2f} ms; host: "
            + (" < ".join(n[:60] for n in names) or "(no op)")
        )
    return lines


def sync_summary(caught) -> list[str]:
    """Host synchronisations recorded by CUDA's sync debug mode, counted by the Python line that made them."""
    counts: dict[str, int] = {}
    for w in caught:
        if "synchronizing" in str(w.message):
            key = f"{w.filename}:{w.lineno}"
            counts[key] = counts.get(key, 0) + 1
    lines = [f"host synchronisations in the step: {sum(counts.values())}"]
    lines += [f"  {n:5d}  {where}" for where, n in sorted(counts.items(), key=lambda kv: -kv[1])[:25]]
    return lines


def _write_profile(profiler, path: str, cuda: bool) -> None:
    """The step's GPU kernels and host ops, by self time, as text tables; the streams' overlap and host syncs."""
    if profiler.kt_syncs is not None:
        torch.cuda.set_sync_debug_mode("default")
        profiler.kt_syncs.__exit__(None, None, None)
    profiler.__exit__(None, None, None)
    events = profiler.key_averages()
    with open(path, "w") as f:
        if cuda:
            kineto = profiler.profiler.kineto_results.events()
            summary = stream_summary(kineto) + gap_summary(kineto) + sync_summary(profiler.kt_sync_list)
            f.write("\n".join(summary) + "\n\n")
            print("\n".join(f"    {line}" for line in summary), flush=True)
            f.write(events.table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=80) + "\n")
        f.write(events.table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=80) + "\n")
        f.write(events.table(sort_by="cpu_time_total", row_limit=40, max_name_column_width=80) + "\n")
    print(f"    profile of the step: {path}", flush=True)


def token_rows(n: int, seq: int, vocab: int) -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


def _profile_path(a, mode: str) -> str | None:
    return f"{a.profile}-{mode}.txt" if a.profile and mode in a.profile_modes.split(",") else None


def run_trainer_mode(mode: str, a) -> dict:
    """One mode in this process: load, wrap with PEFT, train through the stock Trainer, measure."""
    import peft
    import transformers

    import kt_core
    from kt_plugins.hf_trainer import KTCallback

    cuda = a.device == "cuda"
    fp8 = a.expert_dtype == "fp8"
    t0 = time.perf_counter()
    if mode.startswith("gpu") and fp8:
        model = load_dequantized(a.checkpoint, a.device)
        weights = "bf16, dequantized from the FP8 checkpoint at load (transformers' FP8 modules do not train)"
    elif mode.startswith("gpu"):
        model = transformers.AutoModelForCausalLM.from_pretrained(
            a.checkpoint, dtype=torch.bfloat16, device_map=a.device
        )
        weights = "bf16"
    else:
        expert_dtype = "fp8" if fp8 else None
        weights = "fp8 experts (e4m3, block scales) in host RAM, the rest bf16" if fp8 else "bf16"
        model = kt_core.load_model(
            a.checkpoint, device=a.device, dtype=torch.bfloat16, cpu_infer=a.cpu_infer, expert_dtype=expert_dtype
        )
    print(f"    weights: {weights}", flush=True)
    load_s = time.perf_counter() - t0
    lora = peft.LoraConfig(
        r=a.rank,
        lora_alpha=2 * a.rank,
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
        target_modules=attention_targets(model.config),
        target_parameters=EXPERT_TARGETS if a.expert_lora == "on" else None,
    )
    model = peft.get_peft_model(model, lora)
    meter = StepMeter(cuda, _profile_path(a, mode), a.warmup + a.steps - 1)
    callbacks = [meter.callback]
    if mode == "gpu-loss":
        kt_core.enable_efficient_loss(model)
    elif mode.startswith("kt"):
        streaming = {}
        if mode.startswith("kt-stream"):
            streaming = dict(
                expert_gpu_memory=full_layer_slots(model) if mode == "kt-stream-gpu" else a.expert_gpu_memory,
                gpu_memory_limit=a.gpu_memory_limit,
                stream_quantize="int8" if mode.endswith("int8") else None,
                stream_mode="gpu" if mode == "kt-stream-gpu" else "auto",  # gpu: every expert streamed, no CPU share
            )
            if a.stream_keep_bytes:
                streaming["stream_keep_bytes"] = a.stream_keep_bytes
        callbacks.append(
            KTCallback(cpu_infer=a.cpu_infer, max_seq_length=a.seq, keep_host_weights=a.keep_host_weights, **streaming)
        )
    with tempfile.TemporaryDirectory() as out:
        args = transformers.TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=a.batch,
            max_steps=a.warmup + a.steps,
            learning_rate=a.lr,
            bf16=True,
            gradient_checkpointing=True,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            use_cpu=not cuda,
            include_num_input_tokens_seen=True,
            max_grad_norm=a.max_grad_norm,
            seed=0,
        )
        data = token_rows(a.batch * (a.warmup + a.steps), a.seq, model.config.vocab_size)
        transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks).train()
    return meter.result(mode, a.warmup, load_s=load_s, weights=weights, batch=a.batch, seq=a.seq)


def full_layer_slots(model) -> int:
    """expert_gpu_memory that gives the streaming slots a whole layer's experts and nothing to residents."""
    from kt_core import KTExperts
    from kt_core.streaming.planner import slot_bytes_per_expert

    m = next(m for m in model.modules() if isinstance(m, KTExperts))
    extra = {}
    if m.is_fp8 and "block" in inspect.signature(slot_bytes_per_expert).parameters:  # FP8 slots and their buffer
        extra["block"] = m.weight_block_size
    return m.num_experts * slot_bytes_per_expert(
        m.hidden_dim, m.intermediate_dim, m.gate_up_proj.element_size(), **extra
    )


def write_dataset(folder: Path, records: int, seq: int) -> None:
    """Alpaca-style records whose answers run past `seq` tokens, and the dataset_info.json naming them."""
    g = torch.Generator().manual_seed(0)
    letters = "abcdefghijklmnopqrstuvwxyz"

    def words(n: int) -> str:
        lengths = torch.randint(2, 9, (n,), generator=g).tolist()
        picks = torch.randint(0, 26, (sum(lengths),), generator=g).tolist()
        out, i = [], 0
        for length in lengths:
            out.append("".join(letters[j] for j in picks[i : i + length]))
            i += length
        return " ".join(out)

    rows = [{"instruction": words(8), "input": "", "output": words(seq)} for _ in range(records)]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bench.json").write_text(json.dumps(rows))
    (folder / "dataset_info.json").write_text(json.dumps({"bench": {"file_name": "bench.json"}}))


def llamafactory_config(mode: str, a, work: Path) -> dict:
    """The YAML keys of `mode`'s SFT run (what `llamafactory-cli train run.yaml` reads), data and output in `work`."""
    config = dict(
        model_name_or_path=str(a.checkpoint),
        stage="sft",
        do_train=True,
        finetuning_type="lora",
        lora_rank=a.rank,
        lora_alpha=2 * a.rank,
        lora_target="all",
        dataset="bench",
        dataset_dir=str(work / "data"),
        template="qwen3_nothink",
        cutoff_len=a.seq,
        output_dir=str(work / "out"),
        per_device_train_batch_size=a.batch,
        max_steps=a.warmup + a.steps,
        learning_rate=a.lr,
        bf16=True,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        include_num_input_tokens_seen=True,
        seed=0,
        preprocessing_num_workers=4,
        use_cpu=a.device != "cuda",
    )
    if mode == "lf-gpu-liger":
        config["enable_liger_kernel"] = True
    if mode.startswith("lf-kt"):
        config["use_kt"] = True
        config["kt_expert_lora"] = a.expert_lora == "on"
        if a.cpu_infer:
            config["cpu_infer"] = a.cpu_infer
    if mode == "lf-kt-stream":
        config["kt_expert_gpu_memory"] = a.expert_gpu_memory
        if a.stream_keep_bytes:
            config["kt_stream_keep_bytes"] = a.stream_keep_bytes
        if a.gpu_memory_limit:
            config["kt_gpu_memory_limit"] = a.gpu_memory_limit
    return config


def run_llamafactory_mode(mode: str, a) -> dict:
    """One mode through LLaMA-Factory's `run_exp` (the CLI's entry) with the step meter as its callback."""
    from llamafactory.train.tuner import run_exp

    meter = StepMeter(a.device == "cuda", _profile_path(a, mode), a.warmup + a.steps - 1)
    with tempfile.TemporaryDirectory() as work:
        write_dataset(Path(work) / "data", a.batch * (a.warmup + a.steps), a.seq)
        run_exp(args=llamafactory_config(mode, a, Path(work)), callbacks=[meter.callback])
    return meter.result(mode, a.warmup, batch=a.batch, seq=a.seq)


def run_child(mode: str, a, argv: list[str]) -> dict:
    """Runs `mode` in a fresh interpreter (its own CUDA context and peak) and reads back its JSON."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result = Path(f.name)
    cmd = [sys.executable, __file__, *argv, "--child", mode, "--child-out", str(result)]
    print(f"mode {mode}: {' '.join(cmd[1:])}", flush=True)
    proc = subprocess.run(cmd, timeout=a.mode_timeout)
    try:
        if proc.returncode != 0:
            return dict(mode=mode, error=f"exit status {proc.returncode}")
        return json.loads(result.read_text())
    finally:
        result.unlink(missing_ok=True)


def step_sizes(tokens_per_step: str | None, batch: int, seq: int) -> list[tuple[int, int]]:
    """(batch, seq) per size of a tokens-per-step sweep ("2048,8192,32768": sequences of `seq` tokens, fewer when
    a size is smaller); without a sweep, the one size --batch x --seq."""
    if not tokens_per_step:
        return [(batch, seq)]
    sizes = []
    for item in tokens_per_step.split(","):
        n = int(item)
        s = min(seq, n)
        if n <= 0 or n % s:
            raise SystemExit(f"--tokens-per-step: {n} is not a positive multiple of --seq {seq}")
        sizes.append((n // s, s))
    return sizes


def loss_summary(runs: list[dict]) -> dict:
    """Max abs difference of each mode's loss curve from the first mode's that ran (same size, same rows), and the
    largest difference between any two modes."""
    ok = [r for r in runs if "error" not in r and r.get("losses")]
    if not ok:
        return {"reference": None, "loss_max_abs_diff": {}, "max_pairwise": None}

    def gap(x, y):
        return max(abs(u - v) for u, v in zip(x["losses"], y["losses"], strict=False))

    ref = ok[0]
    pairs = [gap(x, y) for i, x in enumerate(ok) for y in ok[i + 1 :]]
    return {
        "reference": ref["mode"],
        "loss_max_abs_diff": {r["mode"]: gap(r, ref) for r in ok[1:]},
        "max_pairwise": max(pairs) if pairs else 0.0,
    }


def print_table(runs: list[dict]) -> None:
    base = next((r for r in runs if r["mode"] == "gpu" and "error" not in r), None)
    print(f"\n{'mode':16s}{'step ms':>9s}{'tok/s':>9s}{'peak GiB':>10s}{'planned':>9s}", end="")
    print(f"{'x gpu tok/s':>12s}{'x gpu peak':>11s}   split per step (CPU / PCIe / GPU s)")
    for r in runs:
        if "error" in r:
            print(f"{r['mode']:16s} FAILED: {r['error']}")
            continue
        ratio = (r["tok_s"] / base["tok_s"], r["peak_gib"] / base["peak_gib"]) if base else (float("nan"),) * 2
        r["vs_gpu"] = dict(tok_s=ratio[0], peak=ratio[1])
        planned = f"{r['planned_gib']:9.2f}" if r.get("planned_gib") is not None else f"{'-':>9s}"
        split = r.get("split")
        sides = "" if not split else " / ".join("-" if split[k] is None else f"{split[k]:.3f}" for k in SIDES)
        print(
            f"{r['mode']:16s}{r['step_ms']:9.0f}{r['tok_s']:9.0f}{r['peak_gib']:10.2f}{planned}"
            f"{ratio[0]:12.3f}{ratio[1]:11.3f}   {sides}"
        )
        print(f"{'':16s}loss {[round(v, 4) for v in r['losses']]}")
        if r.get("weights", "bf16") != "bf16":
            print(f"{'':16s}weights: {r['weights']}")


SIDES = ("cpu_s", "pcie_s", "gpu_s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default="gpu,gpu-loss,kt-stream", help=f"comma list of {', '.join(MODES)}")
    ap.add_argument("--shape", choices=SHAPES, default="dsv2-lite")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the real model's)")
    ap.add_argument("--batch", type=int, default=16, help="sequences per step")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument(
        "--tokens-per-step", default=None, help="sweep: comma list of tokens per step (batch x seq), every mode at each"
    )
    ap.add_argument(
        "--expert-dtype", choices=EXPERT_DTYPES, default="bf16", help="fp8: DeepSeek's FP8 checkpoint, experts kept FP8"
    )
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument(
        "--expert-lora",
        choices=("on", "off"),
        default="on",
        help="LoRA on the routed experts too (Trainer modes: PEFT target_parameters in every mode; lf-kt modes: "
        "kt_expert_lora). off: stock LLaMA-Factory's trainable set (its lora_target cannot reach fused experts)",
    )
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--warmup", type=int, default=2, help="steps left out of the timing")
    ap.add_argument("--steps", type=int, default=4, help="timed steps")
    ap.add_argument("--expert-gpu-memory", default="12GiB", help="kt[-lf]-stream modes: GPU memory for expert weights")
    ap.add_argument("--gpu-memory-limit", default=None, help="kt[-lf]-stream modes: the whole run's GPU memory cap")
    ap.add_argument(
        "--stream-keep-bytes",
        default=None,
        help="kt[-lf]-stream modes: expert intermediates a checkpointed layer keeps for its backward (default: "
        "the plugin's own)",
    )
    ap.add_argument("--cpu-infer", type=int, default=None, help="CPU threads of the experts operator")
    ap.add_argument(
        "--keep-host-weights",
        action="store_true",
        help="Trainer kt modes: KTCallback(keep_host_weights=True), the expert weights stay beside the packed copy",
    )
    ap.add_argument("--checkpoint", type=Path, default=None, help="checkpoint folder (written when missing)")
    ap.add_argument("--device", default=None, help="default: cuda when there is one")
    ap.add_argument("--small", action="store_true", help="tiny shapes (smoke test)")
    ap.add_argument("--mode-timeout", type=float, default=1800, help="seconds per mode")
    ap.add_argument("--max-grad-norm", type=float, default=1.0, help="the Trainer's (1.0 by default; 0: no clipping)")
    ap.add_argument("--profile", default=None, help="write torch.profiler tables of the last step to PREFIX-MODE.txt")
    ap.add_argument("--profile-modes", default="kt-stream,lf-kt-stream", help="modes --profile applies to")
    ap.add_argument("--out", default="bench_sft.json")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    a.device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    config = build_config(a.small, a.layers, a.shape)
    if a.small:
        a.seq = min(a.seq, 64)
    if a.checkpoint is None:
        name = f"kt-bench-{a.shape}-{config.num_hidden_layers}{'-small' * a.small}{'-fp8' * (a.expert_dtype == 'fp8')}"
        a.checkpoint = Path(tempfile.gettempdir()) / name
    if a.child:
        logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
        for name in ("kt_core", "kt_plugins"):  # the split, the plan and the loss backend chosen
            logging.getLogger(name).setLevel(logging.INFO)
        run = run_llamafactory_mode if a.child in LLAMAFACTORY_MODES else run_trainer_mode
        Path(a.child_out).write_text(json.dumps(run(a.child, a)))
        return

    import peft
    import transformers

    modes = a.modes.split(",")
    for mode in modes:
        if mode not in MODES:
            raise SystemExit(f"--modes: unknown mode {mode!r}, expected some of {', '.join(MODES)}")
        if a.expert_dtype == "fp8" and mode in LLAMAFACTORY_MODES:
            raise SystemExit(f"--modes: {mode} with --expert-dtype fp8: LLaMA-Factory's use_kt has no FP8 experts")
    sizes = step_sizes(a.tokens_per_step, a.batch, a.seq)
    info = dict(
        date=time.strftime("%Y-%m-%d"),
        device=torch.cuda.get_device_name() if a.device == "cuda" else "cpu",
        cpu=platform.processor() or platform.machine(),
        torch=torch.__version__,
        transformers=transformers.__version__,
        peft=peft.__version__,
        shape=a.shape,
        layers=config.num_hidden_layers,
        expert_dtype=a.expert_dtype,
        batch=a.batch,
        seq=a.seq,
        tokens_per_step=[b * s for b, s in sizes],
        rank=a.rank,
        expert_lora=a.expert_lora,
        expert_gpu_memory=a.expert_gpu_memory,
        gpu_memory_limit=a.gpu_memory_limit,
        stream_keep_bytes=a.stream_keep_bytes,
        command=" ".join(sys.argv),
    )
    print(info, flush=True)
    write_checkpoint(config, a.checkpoint, a.device, a.expert_dtype)
    runs, sweep = [], []

    def save():
        Path(a.out).write_text(json.dumps(dict(info=info, runs=runs, sweep=sweep), indent=1))

    for batch, seq in sizes:
        argv = [*sys.argv[1:], "--checkpoint", str(a.checkpoint), "--batch", str(batch), "--seq", str(seq)]
        if len(sizes) > 1:
            print(f"\n=== {batch * seq} tokens per step: batch {batch} x seq {seq}", flush=True)
        size_runs = []
        for mode in modes:
            r = run_child(mode, a, argv)
            r.update(tokens_per_step_target=batch * seq, batch=batch, seq=seq)
            size_runs.append(r)
            runs.append(r)
            save()
        print_table(size_runs)
        summary = loss_summary(size_runs)
        print(f"loss curves, max abs difference from {summary['reference']}: {summary['loss_max_abs_diff']}")
        keep = ("tok_s", "peak_gib", "step_ms", "split", "weights", "error")
        sweep.append(
            dict(
                tokens_per_step=batch * seq,
                batch=batch,
                seq=seq,
                modes={r["mode"]: {k: r[k] for k in keep if k in r} for r in size_runs},
                **summary,
            )
        )
        save()
    if len(sizes) > 1:
        print(f"\n{'tokens/step':>12s} {'mode':16s}{'tok/s':>9s}{'peak GiB':>10s}   CPU / PCIe / GPU s   loss gap")
        for entry in sweep:
            for mode, r in entry["modes"].items():
                if "error" in r:
                    print(f"{entry['tokens_per_step']:12d} {mode:16s} FAILED: {r['error']}")
                    continue
                split = r.get("split")
                sides = "-" if not split else " / ".join("-" if split[k] is None else f"{split[k]:.3f}" for k in SIDES)
                diff = entry["loss_max_abs_diff"].get(mode)
                print(
                    f"{entry['tokens_per_step']:12d} {mode:16s}{r['tok_s']:9.0f}{r['peak_gib']:10.2f}   {sides:20s}"
                    f" {'ref' if diff is None else f'{diff:.2e}'}"
                )
    save()


if __name__ == "__main__":
    main()
