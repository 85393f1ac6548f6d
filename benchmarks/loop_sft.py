"""Profiling tool, not user-path numbers: LoRA fine-tuning in a hand-written training loop, routed experts
(and their LoRA) on the CPU vs everything on the GPU. What users run is measured by bench_sft.py (the stock
Trainer / LLaMA-Factory from a checkpoint on disk); this loop isolates the model's step from the framework.

A DeepSeek-V2-Lite-shaped model with random bf16 weights, LoRA r=8 on attention (`target_modules`) and on
the fused routed experts (`target_parameters`), gradient checkpointing, AdamW, random token ids:

  kt   non-expert weights built directly on the GPU, routed experts built directly in host RAM as
       KTExperts (the full model never exists on the GPU), then stock `get_peft_model` and `kt_prepare`
  hf   the same model and LoRA, all on the GPU: transformers + PEFT as a user with a big GPU runs it

    python benchmarks/loop_sft.py --out sft.json                      # both, 27 layers, 1 x 2048 tokens
    python benchmarks/loop_sft.py --modes kt --layers 8 --steps 5
    python benchmarks/loop_sft.py --small --device cpu                # tiny shapes, smoke test
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import resource
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from shapes import EXPERT_TARGETS, SHAPES, attention_targets, build_config


def _is_experts(module) -> bool:
    return type(module).__name__.endswith("Experts") and isinstance(getattr(module, "gate_up_proj", None), torch.Tensor)


def build_kt_model(config, device: torch.device, *, kernel: str, cpu_infer: int | None):
    """Non-expert weights on `device`, routed experts as KTExperts in host RAM; nothing else materialized.

    Parameters are created on the meta device, the experts modules are replaced by KTExperts around random
    host tensors, then every remaining parameter is allocated on `device` and initialized there.
    """
    from transformers import AutoModelForCausalLM

    from kt_core import KTExperts
    from kt_core.loading.meta import meta_parameters, set_tensor

    with meta_parameters():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    bound = 0.02 * 3**0.5  # uniform with the std of transformers' init (0.02)
    random_layer = {}  # drawn once per shape, copied into every layer (own memory each, cheap to build)
    for name, module in list(model.named_modules()):
        if not _is_experts(module):
            continue
        shapes = (tuple(module.gate_up_proj.shape), tuple(module.down_proj.shape))
        if shapes not in random_layer:
            random_layer[shapes] = [
                torch.empty(shape, dtype=torch.bfloat16).uniform_(-bound, bound, generator=gen) for shape in shapes
            ]
        gate_up, down = (t.clone() for t in random_layer[shapes])
        experts = KTExperts.from_tensors(
            gate_up, down, kernel=kernel, cpu_infer=cpu_infer, hidden_act=getattr(config, "hidden_act", "silu")
        )
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, experts)
    with torch.no_grad():
        for name, p in list(model.named_parameters()):
            if p.device.type != "meta":
                continue
            t = torch.empty(p.shape, dtype=p.dtype, device=device)
            if "norm" in name:
                t.fill_(1.0)
            elif name.endswith("bias"):
                t.zero_()
            else:
                t.normal_(0.0, 0.02)
            set_tensor(model, name, t)
    random_layer.clear()
    return model.to(device)  # buffers (rotary frequencies); KTExperts stays in host RAM


def build_hf_model(config, device: torch.device, experts_implementation: str):
    """The same model fully on `device`, as transformers builds it."""
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.config._experts_implementation = experts_implementation
    return model


def add_lora(model, rank: int):
    from peft import LoraConfig, get_peft_model

    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
        target_modules=attention_targets(model.config),
        target_parameters=EXPERT_TARGETS,
    )
    return get_peft_model(model, config)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def profiled(path: str | None, device: torch.device):
    """A torch.profiler context that writes its kernel and host-op tables to `path` (a no-op context if None)."""
    import contextlib

    if not path:
        return contextlib.nullcontext()
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])

    @contextlib.contextmanager
    def run():
        with profile(activities=activities) as prof:
            yield
        sync(device)
        events = prof.key_averages()
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        with open(path, "w") as f:
            f.write(events.table(sort_by=key, row_limit=45, max_name_column_width=70) + "\n")
            f.write(events.table(sort_by="cpu_time_total", row_limit=30, max_name_column_width=70) + "\n")
        print(f"    profile of the last step: {path}", flush=True)

    return run()


def make_optimizer(params):
    """AdamW as the transformers Trainer builds it by default on torch >= 2.8 (`adamw_torch_fused`).

    Fused matters for host-resident expert LoRA: one multi-threaded pass over the factors instead of a
    dozen single-threaded ones.
    """
    try:
        return torch.optim.AdamW(params, lr=1e-4, fused=True)
    except (RuntimeError, ValueError):  # a device or dtype the fused kernel does not take
        return torch.optim.AdamW(params, lr=1e-4)


def train_steps(model, device, *, batch, seq, vocab, warmup, steps, expert_timer=None, profile_path=None):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params)
    g = torch.Generator().manual_seed(0)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times, losses, expert_s = [], [], []
    for i in range(warmup + steps):
        ids = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
        if expert_timer is not None:
            expert_timer.take()
        sync(device)
        t0 = time.perf_counter()
        with profiled(profile_path if i == warmup + steps - 1 else None, device):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync(device)
        dt = time.perf_counter() - t0
        losses.append(loss.item())
        if i >= warmup:
            times.append(dt)
            if expert_timer is not None:
                expert_s.append(expert_timer.take()[0])
        print(f"    step {i}: {dt * 1e3:9.1f} ms  loss {losses[-1]:.3f}", flush=True)
    med = statistics.median(times)
    out = dict(
        step_ms=med * 1e3,
        step_ms_all=[t * 1e3 for t in times],
        tok_s=batch * seq / med,
        peak_gib=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan"),
        losses=losses,
        trainable=sum(p.numel() for p in params),
    )
    if expert_s:
        out["cpu_expert_share"] = statistics.median(e / t for e, t in zip(expert_s, times, strict=True))
    return out


def run_mode(mode, config, device, a):
    t0 = time.perf_counter()
    if mode == "kt":
        from kt_core.runtime.expert_time import ExpertTimer
        from kt_plugins.hf_trainer import kt_prepare

        model = build_kt_model(config, device, kernel=a.kernel, cpu_infer=a.cpu_infer)
        model = kt_prepare(add_lora(model, a.rank))
        timer = ExpertTimer(model)
        kernel = next(m.kernel for m in model.modules() if type(m).__name__ == "KTExperts")
    else:
        model = add_lora(build_hf_model(config, device, a.experts_implementation), a.rank)
        timer, kernel = None, None
    sync(device)
    build_s = time.perf_counter() - t0
    gpu_after_build = torch.cuda.memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    print(f"  {mode}: built in {build_s:.1f} s, {gpu_after_build:.2f} GiB on the GPU", flush=True)
    r = train_steps(
        model,
        device,
        batch=a.batch,
        seq=a.seq,
        vocab=config.vocab_size,
        warmup=a.warmup,
        steps=a.steps,
        expert_timer=timer,
        profile_path=f"{a.profile}-{mode}.txt" if getattr(a, "profile", None) else None,
    )
    r.update(mode=mode, build_s=build_s, gpu_gib_after_build=gpu_after_build, kernel=kernel)
    r["host_max_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(
        f"  -> {mode}: {r['tok_s']:.0f} tok/s, step {r['step_ms']:.0f} ms, peak GPU {r['peak_gib']:.2f} GiB"
        + (f", CPU expert share {r['cpu_expert_share']:.2f}" if "cpu_expert_share" in r else ""),
        flush=True,
    )
    del model, timer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default="hf,kt", help="comma list of kt (CPU experts) and hf (all on the GPU)")
    ap.add_argument("--shape", choices=SHAPES, default="dsv2-lite", help="model shapes")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the real model's)")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--kernel", default="auto", help="CPU kernel of the experts")
    ap.add_argument("--cpu-infer", type=int, default=None, help="CPU threads of the experts operator")
    ap.add_argument("--experts-implementation", default="grouped_mm", help="transformers' experts impl (hf mode)")
    ap.add_argument("--device", default=None, help="default: cuda when there is one")
    ap.add_argument("--small", action="store_true", help="tiny shapes (smoke test)")
    ap.add_argument("--out", default="loop_sft.json")
    a = ap.parse_args()

    import peft
    import transformers

    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    config = build_config(a.small, a.layers, a.shape)
    seq = min(a.seq, 64) if a.small else a.seq
    a.seq = seq
    info = dict(
        torch=torch.__version__,
        transformers=transformers.__version__,
        peft=peft.__version__,
        device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        cpu=platform.processor() or platform.machine(),
        layers=config.num_hidden_layers,
        seq=seq,
        batch=a.batch,
        rank=a.rank,
        shape=a.shape,
        targets=dict(target_modules=attention_targets(config), target_parameters=EXPERT_TARGETS),
        cpu_infer=a.cpu_infer,
        date=time.strftime("%Y-%m-%d"),
    )
    print(info, flush=True)
    runs, errors = [], []

    def dump():
        with open(a.out, "w") as f:
            json.dump(dict(info=info, runs=runs, errors=errors), f, indent=1)

    for mode in a.modes.split(","):
        print(f"mode {mode}: {config.num_hidden_layers} layers, {a.batch} x {seq} tokens", flush=True)
        try:
            runs.append(run_mode(mode, config, device, a))
        except Exception as e:  # keep the other mode's numbers
            errors.append(dict(mode=mode, error=repr(e)[:2000], tb=traceback.format_exc()[-4000:]))
            print(f"  {mode} FAILED: {e!r}"[:2000], flush=True)
            traceback.print_exc()
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        dump()

    print(f"\n{'mode':5s} {'layers':>6s} {'step ms':>9s} {'tok/s':>8s} {'peak GPU GiB':>12s}")
    for r in runs:
        print(
            f"{r['mode']:5s} {config.num_hidden_layers:6d} {r['step_ms']:9.0f} {r['tok_s']:8.0f} {r['peak_gib']:12.2f}"
        )
    by_mode = {r["mode"]: r for r in runs}
    if "kt" in by_mode and "hf" in by_mode:
        kt, hf = by_mode["kt"], by_mode["hf"]
        info["ratios"] = dict(
            tok_s_kt_over_hf=kt["tok_s"] / hf["tok_s"], peak_gpu_kt_over_hf=kt["peak_gib"] / hf["peak_gib"]
        )
        ratios = info["ratios"]
        print(f"kt / hf: tokens/s {ratios['tok_s_kt_over_hf']:.3f}, peak GPU {ratios['peak_gpu_kt_over_hf']:.3f}")
    dump()
    for e in errors:
        print("ERROR", e["mode"], e["error"][:500])


if __name__ == "__main__":
    main()
