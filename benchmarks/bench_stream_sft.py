"""LoRA fine-tuning at low GPU memory: MoE layers split between CPU compute and GPU compute on streamed weights.

DeepSeek-V2-Lite-shaped model, random bf16 weights, LoRA r=8 on attention and on the routed experts,
gradient checkpointing, AdamW, random token ids (the set-up of loop_sft.py, whose builders this reuses):

  stream       routed experts in pinned host RAM, each layer split by the planner between the CPU operator
               and grouped GEMMs on the GPU over weights streamed one layer ahead (kt_core.enable_streaming)
  stream-int8  the same, streaming int8 copies of the weights (half the PCIe bytes)
  kt           routed experts on the CPU operator only (loop_sft.py's kt mode)
  hf           everything on the GPU: transformers + PEFT, experts_implementation grouped_mm

    python benchmarks/bench_stream_sft.py --layers 8 --batch 4 --out stream.json
    python benchmarks/bench_stream_sft.py --small --device cpu --modes stream,kt      # smoke test

The stream modes compute the loss in chunks of the sequence (no [T, vocab] logits at once); the value is
transformers' causal-LM loss. Every mode prints its per-step numbers; stream modes add the planner's split.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, str(Path(__file__).parent))
import loop_sft as bench_sft  # the model builders and the training loop


def chunked_loss_forward(model, chunk: int):
    """Makes `model(input_ids, labels)` return transformers' causal-LM loss computed chunk by chunk."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder, lm_head = base.model, base.lm_head

    def piece(h, labels):  # [n, H], [n] -> summed loss; recomputed in the backward (no logits kept)
        return F.cross_entropy(lm_head(h).float(), labels, reduction="sum")

    def forward(input_ids=None, labels=None, **kwargs):
        hidden = decoder(input_ids=input_ids).last_hidden_state  # [B, S, H]
        h = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # [B*(S-1), H]
        y = labels[:, 1:].reshape(-1)
        total = sum(
            checkpoint(piece, h[i : i + chunk], y[i : i + chunk], use_reentrant=False) for i in range(0, len(y), chunk)
        )
        return argparse.Namespace(loss=total / len(y))

    return forward


def run_stream(config, device, a, quantize):
    import kt_core
    from kt_plugins.hf_trainer import kt_prepare

    t0 = time.perf_counter()
    model = bench_sft.build_kt_model(config, device, kernel=a.kernel, cpu_infer=a.cpu_infer)
    model = kt_prepare(bench_sft.add_lora(model, a.rank))
    rt = kt_core.enable_streaming(
        model, expert_gpu_memory=a.expert_gpu_memory, device=device, quantize=quantize, keep_bytes=a.keep_bytes
    )
    if a.loss_chunk:
        model.forward = chunked_loss_forward(model, a.loss_chunk)
    bench_sft.sync(device)
    build_s = time.perf_counter() - t0
    r = bench_sft.train_steps(
        model,
        device,
        batch=a.batch,
        seq=a.seq,
        vocab=config.vocab_size,
        warmup=a.warmup,
        steps=a.steps,
        profile_path=f"{a.profile}-stream{'-int8' if quantize else ''}.txt" if a.profile else None,
    )
    reports = rt.history[a.warmup :]
    r.update(
        build_s=build_s,
        expert_gpu_gib=rt.store.gpu_bytes() / 2**30,
        pinned=rt.store.pin_ok,
        steps_report=rt.history,
        split=dict(
            streamed_per_layer=reports[-1]["streamed_per_layer"] if reports else None,
            resident_per_layer=reports[-1]["resident_per_layer"] if reports else None,
            cpu_slot_share=[x["cpu_slot_share"] for x in reports],
            cpu_s=[x["cpu_s"] for x in reports],
            pcie_s=[x["pcie_s"] for x in reports],
            pcie_gb=[x["pcie_gb"] for x in reports],
            gpu_s=[x["gpu_s"] for x in reports],
            pcie_gb_per_s=reports[-1]["pcie_gb_per_s"] if reports else None,
            cpu_tflops=reports[-1]["cpu_tflops"] if reports else None,
        ),
    )
    rt.disable()
    del model, rt
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default="hf,stream,stream-int8,kt")
    ap.add_argument("--shape", choices=bench_sft.SHAPES, default="dsv2-lite")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the real model's)")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--kernel", default="auto")
    ap.add_argument("--cpu-infer", type=int, default=None)
    ap.add_argument("--experts-implementation", default="grouped_mm")
    ap.add_argument("--expert-gpu-memory", default=None, help="expert weights on the GPU, e.g. 4GiB")
    ap.add_argument("--keep-bytes", default="1GiB", help="recomputed expert intermediates kept for the backward")
    ap.add_argument("--loss-chunk", type=int, default=1024, help="stream modes: tokens per loss chunk (0: off)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--profile", default=None, help="profile the last step of each mode into PREFIX-<mode>.txt")
    ap.add_argument("--out", default="bench_stream_sft.json")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    config = bench_sft.build_config(a.small, a.layers, a.shape)
    a.seq = min(a.seq, 64) if a.small else a.seq
    info = dict(
        device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        torch=torch.__version__,
        shape=a.shape,
        layers=config.num_hidden_layers,
        seq=a.seq,
        batch=a.batch,
        rank=a.rank,
        expert_gpu_memory=a.expert_gpu_memory,
        loss_chunk=a.loss_chunk,
        date=time.strftime("%Y-%m-%d"),
    )
    print(info, flush=True)
    runs, errors = [], []
    for mode in a.modes.split(","):
        print(f"mode {mode}: {config.num_hidden_layers} layers, {a.batch} x {a.seq} tokens", flush=True)
        torch.manual_seed(0)
        try:
            if mode.startswith("stream"):
                r = run_stream(config, device, a, "int8" if mode == "stream-int8" else None)
            else:
                r = bench_sft.run_mode(mode, config, device, a)
            r["mode"] = mode
            runs.append(r)
            print(f"  -> {mode}: {r['tok_s']:.0f} tok/s, peak GPU {r['peak_gib']:.2f} GiB", flush=True)
        except Exception as e:
            errors.append(dict(mode=mode, error=repr(e)[:2000], tb=traceback.format_exc()[-4000:]))
            traceback.print_exc()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        with open(a.out, "w") as f:
            json.dump(dict(info=info, runs=runs, errors=errors), f, indent=1, default=str)

    by = {r["mode"]: r for r in runs}
    print(f"\n{'mode':12s} {'step ms':>9s} {'tok/s':>8s} {'peak GPU GiB':>12s} {'vs hf tok/s':>11s} {'vs hf mem':>9s}")
    for r in runs:
        hf = by.get("hf")
        ratio = (r["tok_s"] / hf["tok_s"], r["peak_gib"] / hf["peak_gib"]) if hf else (float("nan"),) * 2
        r["ratio_vs_hf"] = dict(tok_s=ratio[0], peak_gpu=ratio[1])
        row = f"{r['mode']:12s} {r['step_ms']:9.0f} {r['tok_s']:8.0f} {r['peak_gib']:12.2f}"
        print(f"{row} {ratio[0]:11.3f} {ratio[1]:9.3f}")
    with open(a.out, "w") as f:
        json.dump(dict(info=info, runs=runs, errors=errors), f, indent=1, default=str)
    for e in errors:
        print("ERROR", e["mode"], e["error"][:500])


if __name__ == "__main__":
    main()
