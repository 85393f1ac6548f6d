"""LoRA fine-tuning as users run it: the stock HF Trainer or stock LLaMA-Factory from a checkpoint on disk,
kt-plugins against the same framework fully on the GPU, every mode measured in the same command.

One checkpoint (random bf16 weights of a real shape, written once and reused), LoRA r=8 on attention and on
the routed experts, bf16, gradient checkpointing, the Trainer's default optimizer (fused AdamW), random token
rows of `--seq` tokens. Modes (each in its own process, so each peak is its own):

  gpu          AutoModelForCausalLM.from_pretrained(device_map="cuda") + PEFT + Trainer: the baseline,
               with transformers' own loss (what its users get)
  gpu-loss     the same with kt_core.enable_efficient_loss (the loss kt-plugins turns on), to separate
               what the loss saves from what the expert split saves
  kt-cpu       kt_core.load_model + PEFT + Trainer(callbacks=[KTCallback()]): routed experts on the CPU
  kt-stream    the same with KTCallback(expert_gpu_memory=--expert-gpu-memory): experts streamed to the GPU / split
               by the planner; kt-stream-int8 streams int8 copies

  lf-gpu       LLaMA-Factory's own `run_exp` (what `llamafactory-cli train` calls) on the YAML keys of an SFT
               run (`lora_target: all`, bf16, its default optimizer and gradient checkpointing), all on the GPU
  lf-gpu-liger the same with LLaMA-Factory's `enable_liger_kernel: true` (its memory-efficient loss)
  lf-kt-cpu    `use_kt: true` (routed experts on the CPU), the plugin booted by its .pth hook as in the CLI
  lf-kt-stream `use_kt: true` + `kt_expert_gpu_memory: --expert-gpu-memory`
  LLaMA-Factory modes train on generated long records truncated to `cutoff_len: --seq` (every sequence
  exactly --seq tokens); the checkpoint gets a small byte-level tokenizer for them.

Reported per mode: tokens/s (median step after --warmup steps, timed between the Trainer's step callbacks,
tokens counted by the Trainer's `include_num_input_tokens_seen`),
peak GPU memory (torch.cuda.max_memory_allocated over training) and, for the kt modes, the peak the memory plan
gave before the run ("planned", kt_core.streaming.memory_plan), the loss curve, kt's split line.

    python benchmarks/bench_sft.py --shape dsv2-lite --batch 16 --modes gpu,gpu-loss,kt-stream --out sft.json
    python benchmarks/bench_sft.py --shape qwen3-30b-a3b --batch 8 --checkpoint /data/q3 --expert-gpu-memory 12GiB
    python benchmarks/bench_sft.py --layers 8 --batch 8 --modes lf-gpu,lf-kt-stream --expert-gpu-memory 4GiB
    python benchmarks/bench_sft.py --shape deepseek-v3 --batch 2 --seq 4096 --modes gpu-loss,kt-cpu,kt-stream
    python benchmarks/bench_sft.py --small --modes gpu,kt-cpu,lf-kt-cpu --device cpu   # tiny shapes, smoke test
"""

from __future__ import annotations

import argparse
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

TRAINER_MODES = ("gpu", "gpu-loss", "kt-cpu", "kt-stream", "kt-stream-int8")
LLAMAFACTORY_MODES = ("lf-gpu", "lf-gpu-liger", "lf-kt-cpu", "lf-kt-stream")
MODES = TRAINER_MODES + LLAMAFACTORY_MODES
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def write_checkpoint(config, path: Path, device: str) -> None:
    """Random-init weights of `config` saved as transformers saves them (built on `device`: fast init)."""
    from transformers import AutoModelForCausalLM

    if (path / "config.json").exists():
        print(f"checkpoint: reusing {path}", flush=True)
        return
    sys.path.insert(0, str(EXAMPLES / "tiny_moe"))
    from make_checkpoint import build_tokenizer

    t0 = time.perf_counter()
    tokenizer = build_tokenizer(config.vocab_size)  # small: trained on the bundled dataset
    config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".", dir=path.parent))
    model.save_pretrained(tmp, max_shard_size="5GB")
    tokenizer.save_pretrained(tmp)
    del model
    os.replace(tmp, path)
    print(f"checkpoint: wrote {path} in {time.perf_counter() - t0:.0f} s", flush=True)


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
                print(f"    step {len(meter.step_s)}: {meter.step_s[-1] * 1e3:8.0f} ms", flush=True)

            def on_log(self, args, state, control, logs=None, **kwargs):
                meter.logs.append(dict(logs or {}))

        self.cuda = cuda
        self.step_s: list[float] = []
        self.step_tokens: list[int] = []
        self._seen = 0
        self._profiler = None
        self.logs: list[dict] = []
        self.callback = _Callback()

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def result(self, mode: str, warmup: int, **extra) -> dict:
        from kt_core.streaming.memory_plan import last_plan

        timed = list(zip(self.step_s, self.step_tokens, strict=True))[warmup:]
        step_s = statistics.median(t for t, _ in timed)
        plan = last_plan()  # kt modes: the GPU memory plan made before the run, to set beside the measured peak
        return dict(
            mode=mode,
            step_ms=step_s * 1e3,
            step_ms_all=[t * 1e3 for t in self.step_s],
            tokens_per_step=statistics.median(n for _, n in timed),
            tok_s=sum(n for _, n in timed) / sum(t for t, _ in timed),
            peak_gib=torch.cuda.max_memory_allocated() / 2**30 if self.cuda else float("nan"),
            planned_gib=plan.peak / 2**30 if plan is not None else None,
            losses=[log["loss"] for log in self.logs if "loss" in log],
            kt_logs=[
                {k: v for k, v in log.items() if k.startswith("kt_")} for log in self.logs if "kt_tokens_per_s" in log
            ],
            **extra,
        )


def _start_profiler(cuda: bool):
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    profiler = profile(activities=activities)
    profiler.__enter__()
    return profiler


def _write_profile(profiler, path: str, cuda: bool) -> None:
    """The step's GPU kernels and host ops, by self time, as text tables."""
    profiler.__exit__(None, None, None)
    events = profiler.key_averages()
    with open(path, "w") as f:
        if cuda:
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
    t0 = time.perf_counter()
    if mode.startswith("gpu"):
        model = transformers.AutoModelForCausalLM.from_pretrained(
            a.checkpoint, dtype=torch.bfloat16, device_map=a.device
        )
    else:
        model = kt_core.load_model(a.checkpoint, device=a.device, dtype=torch.bfloat16, cpu_infer=a.cpu_infer)
    load_s = time.perf_counter() - t0
    lora = peft.LoraConfig(
        r=a.rank,
        lora_alpha=2 * a.rank,
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
        target_modules=attention_targets(model.config),
        target_parameters=EXPERT_TARGETS,
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
                expert_gpu_memory=a.expert_gpu_memory,
                gpu_memory_limit=a.gpu_memory_limit,
                stream_quantize="int8" if mode.endswith("int8") else None,
            )
        callbacks.append(KTCallback(cpu_infer=a.cpu_infer, max_seq_length=a.seq, **streaming))
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
    return meter.result(mode, a.warmup, load_s=load_s)


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


def run_llamafactory_mode(mode: str, a) -> dict:
    """One mode through LLaMA-Factory's `run_exp` (the CLI's entry) with the step meter as its callback."""
    from llamafactory.train.tuner import run_exp

    cuda = a.device == "cuda"
    meter = StepMeter(cuda, _profile_path(a, mode), a.warmup + a.steps - 1)
    with tempfile.TemporaryDirectory() as work:
        write_dataset(Path(work) / "data", a.batch * (a.warmup + a.steps), a.seq)
        config = dict(
            model_name_or_path=str(a.checkpoint),
            stage="sft",
            do_train=True,
            finetuning_type="lora",
            lora_rank=a.rank,
            lora_alpha=2 * a.rank,
            lora_target="all",
            dataset="bench",
            dataset_dir=str(Path(work) / "data"),
            template="qwen3_nothink",
            cutoff_len=a.seq,
            output_dir=str(Path(work) / "out"),
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
            use_cpu=not cuda,
        )
        if mode == "lf-gpu-liger":
            config["enable_liger_kernel"] = True
        if mode.startswith("lf-kt"):
            config["use_kt"] = True
            if a.cpu_infer:
                config["cpu_infer"] = a.cpu_infer
        if mode == "lf-kt-stream":
            config["kt_expert_gpu_memory"] = a.expert_gpu_memory
            if a.gpu_memory_limit:
                config["kt_gpu_memory_limit"] = a.gpu_memory_limit
        run_exp(args=config, callbacks=[meter.callback])
    return meter.result(mode, a.warmup)


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default="gpu,gpu-loss,kt-stream", help=f"comma list of {', '.join(MODES)}")
    ap.add_argument("--shape", choices=SHAPES, default="dsv2-lite")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the real model's)")
    ap.add_argument("--batch", type=int, default=16, help="sequences per step")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--warmup", type=int, default=2, help="steps left out of the timing")
    ap.add_argument("--steps", type=int, default=4, help="timed steps")
    ap.add_argument("--expert-gpu-memory", default="12GiB", help="kt[-lf]-stream modes: GPU memory for expert weights")
    ap.add_argument("--gpu-memory-limit", default=None, help="kt[-lf]-stream modes: the whole run's GPU memory cap")
    ap.add_argument("--cpu-infer", type=int, default=None, help="CPU threads of the experts operator")
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
        a.checkpoint = (
            Path(tempfile.gettempdir()) / f"kt-bench-{a.shape}-{config.num_hidden_layers}{'-small' * a.small}"
        )
    if a.child:
        logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
        for name in ("kt_core", "kt_plugins"):  # the split, the plan and the loss backend chosen
            logging.getLogger(name).setLevel(logging.INFO)
        run = run_llamafactory_mode if a.child in LLAMAFACTORY_MODES else run_trainer_mode
        Path(a.child_out).write_text(json.dumps(run(a.child, a)))
        return

    import peft
    import transformers

    info = dict(
        date=time.strftime("%Y-%m-%d"),
        device=torch.cuda.get_device_name() if a.device == "cuda" else "cpu",
        cpu=platform.processor() or platform.machine(),
        torch=torch.__version__,
        transformers=transformers.__version__,
        peft=peft.__version__,
        shape=a.shape,
        layers=config.num_hidden_layers,
        batch=a.batch,
        seq=a.seq,
        rank=a.rank,
        expert_gpu_memory=a.expert_gpu_memory,
        gpu_memory_limit=a.gpu_memory_limit,
        command=" ".join(sys.argv),
    )
    print(info, flush=True)
    write_checkpoint(config, a.checkpoint, a.device)
    argv = [arg for arg in sys.argv[1:]] + ["--checkpoint", str(a.checkpoint)]
    runs = []
    for mode in a.modes.split(","):
        if mode not in MODES:
            raise SystemExit(f"--modes: unknown mode {mode!r}, expected some of {', '.join(MODES)}")
        runs.append(run_child(mode, a, argv))
        Path(a.out).write_text(json.dumps(dict(info=info, runs=runs), indent=1))
    base = next((r for r in runs if r["mode"] == "gpu" and "error" not in r), None)
    print(f"\n{'mode':16s}{'step ms':>9s}{'tok/s':>9s}{'peak GiB':>10s}{'planned':>9s}", end="")
    print(f"{'x gpu tok/s':>12s}{'x gpu peak':>11s}")
    for r in runs:
        if "error" in r:
            print(f"{r['mode']:16s} FAILED: {r['error']}")
            continue
        ratio = (r["tok_s"] / base["tok_s"], r["peak_gib"] / base["peak_gib"]) if base else (float("nan"),) * 2
        r["vs_gpu"] = dict(tok_s=ratio[0], peak=ratio[1])
        planned = f"{r['planned_gib']:9.2f}" if r.get("planned_gib") is not None else f"{'-':>9s}"
        print(
            f"{r['mode']:16s}{r['step_ms']:9.0f}{r['tok_s']:9.0f}{r['peak_gib']:10.2f}{planned}"
            f"{ratio[0]:12.3f}{ratio[1]:11.3f}"
        )
        print(f"{'':16s}loss {[round(v, 4) for v in r['losses']]}")
    Path(a.out).write_text(json.dumps(dict(info=info, runs=runs), indent=1))


if __name__ == "__main__":
    main()
