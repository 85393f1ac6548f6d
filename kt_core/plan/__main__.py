"""python -m kt_core.plan: projected LoRA fine-tuning tokens/s, GPU and host memory of a model on a machine.

python -m kt_core.plan --model deepseek-v3 --machine kt-2x4090-8488c --tokens-per-step 8192
python -m kt_core.plan --model kimi-k2 --gpus 2x24GiB --pcie 25GB/s --cpu-tflops 4.8 --host-ram 1.5TiB
python -m kt_core.plan --table          # every model on every known machine, as the README shows it
python -m kt_core.plan --model deepseek-v3 --machine h200-16c --expert-gpu-memory 24GiB   # a given slot budget
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from kt_core.plan.machines import MACHINES, Machine
from kt_core.plan.models import MODELS
from kt_core.plan.projection import BYTES_PER_WEIGHT, Projection, project
from kt_core.settings import SettingError, parse_size, positive_int


def _gpus(text: str) -> tuple[int, int]:
    count, _, size = text.partition("x")
    if not size:
        raise SettingError(f"--gpus: got {text!r}, expected COUNTxSIZE, e.g. '2x24GiB'")
    return positive_int("--gpus", count), parse_size(size, "--gpus")


def _machine(a: argparse.Namespace) -> Machine:
    base = MACHINES[a.machine]
    changes = {}
    if a.gpus:
        changes["gpus"], changes["gpu_bytes"] = _gpus(a.gpus)
    if a.pcie:
        changes["pcie_bytes_per_s"] = parse_size(a.pcie.removesuffix("/s"), "--pcie")
    if a.gpu_tflops:
        changes["gpu_flops"] = a.gpu_tflops * 1e12
    if a.cpu_tflops:
        changes["cpu_flops"] = a.cpu_tflops * 1e12
    if a.host_ram:
        changes["host_bytes"] = parse_size(a.host_ram, "--host-ram")
    if changes:
        changes.update(name=f"{base.name} (changed: {', '.join(sorted(changes))})", about="")
    return dataclasses.replace(base, **changes)


def _row(model: str, machine: Machine, dtype: str, p: Projection) -> str:
    gpu = " / ".join(f"{b / 2**30:.1f}" for b in p.gpu_bytes)
    experts = MODELS[model].experts
    note = "; ".join(p.problems) or "fits"
    return (
        f"| {model} | {machine.name} | {dtype} | {p.tokens_per_s:,.0f} | {p.experts_streamed} of {experts}"
        f" | {p.layer_s * 1e3:.0f} ({p.plan.cpu_s * 1e3:.0f} / {p.plan.pcie_s * 1e3:.0f} / {p.plan.gpu_s * 1e3:.0f})"
        f" | {gpu} | {p.host_bytes / 2**30:,.0f} | {note} |"
    )


HEADER = (
    "| model | machine | experts | tokens/s | streamed experts per layer | ms per MoE layer (CPU / PCIe / GPU) "
    "| GPU GiB | host GiB | |\n|---|---|---|---|---|---|---|---|---|"
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kt_core.plan", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--model", choices=sorted(MODELS), default="deepseek-v3")
    ap.add_argument("--machine", choices=sorted(MACHINES), default="kt-2x4090-8488c")
    ap.add_argument("--tokens-per-step", type=int, default=8192)
    ap.add_argument("--seq", type=int, default=2048, help="tokens per sequence (attention scores)")
    ap.add_argument("--expert-dtype", choices=sorted(BYTES_PER_WEIGHT), default="bf16",
                    help="routed experts as stored and streamed (fp8: load_model(expert_dtype='fp8'))")  # fmt: skip
    ap.add_argument("--gpus", help="override: COUNTxSIZE per GPU, e.g. 2x24GiB")
    ap.add_argument("--pcie", help="override: per-GPU link, e.g. 25GB/s")
    ap.add_argument("--gpu-tflops", type=float, help="override: effective bf16 TFLOP/s per GPU")
    ap.add_argument("--cpu-tflops", type=float, help="override: effective TFLOP/s of the CPU experts operator")
    ap.add_argument("--host-ram", help="override: host RAM, e.g. 1.5TiB")
    ap.add_argument("--expert-gpu-memory", help="GPU memory for the streaming slots, e.g. 24GiB (0: experts on the "
                    "CPU; default: all the room the rest leaves)")  # fmt: skip
    ap.add_argument("--table", action="store_true", help="every model x machine x {bf16, fp8} at --tokens-per-step")
    a = ap.parse_args(argv)
    try:
        if a.table:
            print(HEADER)
            for model in MODELS:
                for machine in MACHINES.values():
                    for dtype in ("bf16", "fp8"):
                        print(_row(model, machine, dtype, project(MODELS[model], machine,
                                                                 tokens_per_step=a.tokens_per_step, seq=a.seq,
                                                                 expert_dtype=dtype)))  # fmt: skip
            return 0
        machine = _machine(a)
        budget = None if a.expert_gpu_memory is None else parse_size(a.expert_gpu_memory, "--expert-gpu-memory")
        p = project(MODELS[a.model], machine, tokens_per_step=a.tokens_per_step, seq=a.seq,
                    expert_dtype=a.expert_dtype, expert_gpu_memory=budget)  # fmt: skip
    except SettingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{a.model} on {machine.name}{': ' + machine.about if machine.about else ''}")
    print(HEADER)
    print(_row(a.model, machine, a.expert_dtype, p))
    return 1 if p.problems else 0


if __name__ == "__main__":
    sys.exit(main())
