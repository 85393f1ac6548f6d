"""Time our CPU expert kernels on one MoE layer: inference forward per variant, LoRA forward + backward, decode.

Runs the variants this CPU has (amx_bf16, amx_int8, avx512_vnni_int8, avx512_bf16, ...), the fp8 ones on the same
weights quantized to e4m3 (`--fp8-kernels`), and the plain-torch loop on the DeepSeek-V2-Lite and Qwen3-30B-A3B layer
shapes, plus the machine's DRAM read bandwidth, in one process, so that kt-kernel's numbers (the anchor's
kt_moe_bench.py, run in the same command) sit beside them.

    python benchmarks/bench_experts.py --threads 15 --out bench.json
    python benchmarks/bench_experts.py --small          # tiny shapes, smoke test

Legend: T = tokens, K = experts per token, E = experts, H = hidden, I = expert intermediate, r = LoRA rank.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from kt_core import _C, KTExperts, kernels
from kt_core.reference import experts_reference
from kt_core.runtime.pool import get_thread_pool

SHAPES = {
    "dsv2-lite": dict(E=64, K=6, H=2048, I=1408),
    "qwen3-30b-a3b": dict(E=128, K=8, H=2048, I=768),
}
SMALL = {"tiny": dict(E=8, K=2, H=256, I=128)}


def routing(T: int, E: int, K: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of random logits with softmax weights over the chosen k, as the anchor draws them."""
    top, ids = torch.randn(T, E, generator=gen).topk(K, dim=-1)
    return ids.contiguous(), torch.softmax(top, dim=-1).contiguous()


def time_loop(fn, n_sets: int, budget_s: float, max_iters: int = 200, warmup: int = 2) -> tuple[float, float, int]:
    """Median and best seconds of fn(i) over rotating input sets; phase times count the timed calls only."""
    for i in range(warmup):
        fn(i % n_sets)
    kernels.phase_times(reset=True)
    times: list[float] = []
    end = time.perf_counter() + budget_s
    i = 0
    while (time.perf_counter() < end or len(times) < 3) and len(times) < max_iters:
        t0 = time.perf_counter()
        fn(i % n_sets)
        times.append(time.perf_counter() - t0)
        i += 1
    times.sort()
    return times[len(times) // 2], times[0], len(times)


def dram_read_bandwidth(threads: int, gib: float = 2.0) -> float:
    """GB/s of the kernels' own thread pool reading a buffer far larger than the caches once per pass."""
    pool = get_thread_pool(threads)
    x = torch.ones(int(gib * 2**30), dtype=torch.uint8)
    med, _, _ = time_loop(lambda _: _C.bench.read_sum(pool, x.data_ptr(), x.numel()), 1, 1.0, max_iters=20)
    return x.numel() / med / 1e9


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def weight_bytes_read(s: dict, T: int, ids: torch.Tensor, kernel: str) -> float:
    """Bytes of expert weights a forward over these ids must read once (decode bandwidth)."""
    # int4: + fp32 scale, zero / 128; fp8: the e4m3 bytes (its scales, 4 bytes per 128 x 128, are left out)
    per_weight = 1 if "int8" in kernel or "fp8" in kernel else 0.5 + 8 / 128 if "int4" in kernel else 2
    return ids.unique().numel() * 3 * s["H"] * s["I"] * per_weight


def attach_phases(record: dict) -> None:
    """Adds the C++ phases' mean ms per call since the last read (with --phases) to a result, and prints them."""
    phases = {name: seconds / calls * 1e3 for name, (seconds, calls) in kernels.phase_times(reset=True).items()}
    if phases:
        record["phases_ms"] = phases
        print("      " + ", ".join(f"{name} {ms:.2f}" for name, ms in phases.items()), flush=True)


def bench_forward(module, s, tokens, budget_s, gen, results, name, kernel, threads):
    E, K, H = s["E"], s["K"], s["H"]
    x = torch.randn(16, H, generator=gen).to(torch.bfloat16)
    ids, w = routing(16, E, K, gen)
    y, _ = kernels.experts_forward(module, x, ids, w)
    ref = experts_reference(x.float(), ids, w, *(t.float() for t in module.reference_weights()), None, 1.0)
    err = rel_error(y, ref)
    print(f"  {name} {kernel}: rel err vs fp32 reference {err:.2e}", flush=True)
    for T in tokens:
        n_sets = 64 if T <= 16 else 2
        sets = []
        for _ in range(n_sets):
            ids, w = routing(T, E, K, gen)
            sets.append((torch.randn(T, H, generator=gen).to(torch.bfloat16), ids, w))
        if kernel == "torch":
            torch.set_num_threads(threads)
        med, best, n = time_loop(lambda i, sets=sets: kernels.experts_forward(module, *sets[i]), n_sets, budget_s)
        torch.set_num_threads(1)
        flops = 2 * 3 * H * s["I"] * K * T
        gbs = sum(weight_bytes_read(s, T, st[1], kernel) for st in sets) / n_sets / med / 1e9
        results.append(
            dict(
                model=name,
                impl="ours",
                method=kernel,
                T=T,
                ms=med * 1e3,
                ms_min=best * 1e3,
                iters=n,
                tflops=flops / med / 1e12,
                weight_gbs=gbs,
                rel_err=err,
            )
        )
        print(f"    T={T:5d} {med * 1e3:9.3f} ms {flops / med / 1e12:6.2f} TFLOPS  weights {gbs:6.1f} GB/s", flush=True)
        attach_phases(results[-1])


def bench_sft(module, s, tokens, budget_s, gen, results, name, kernel, rank=8):
    E, K, H = s["E"], s["K"], s["H"]
    lora = module.add_lora(rank, 2 * rank)
    with torch.no_grad():  # B small but nonzero so that no path is skipped
        for t in (lora.gate_up_B, lora.down_B):
            t.copy_(torch.randn(t.shape, generator=gen) * 0.002)
    factors = tuple(t.detach() for t in lora.factors())
    for T in tokens:
        x = torch.randn(T, H, generator=gen).to(torch.bfloat16)
        ids, w = routing(T, E, K, gen)
        dy = torch.randn(T, H, generator=gen).to(torch.bfloat16)
        fwd, bwd = [], []

        def step(_i, x=x, ids=ids, w=w, dy=dy, fwd=fwd, bwd=bwd):
            t0 = time.perf_counter()
            _, cache = kernels.experts_forward(module, x, ids, w, lora=factors, save_for_backward=True)
            t1 = time.perf_counter()
            kernels.experts_backward(module, x, ids, w, dy, cache=cache, lora=factors)
            fwd.append(t1 - t0)
            bwd.append(time.perf_counter() - t1)

        med, best, n = time_loop(step, 1, budget_s, max_iters=50)
        f_med, b_med = sorted(fwd[2:])[len(fwd[2:]) // 2], sorted(bwd[2:])[len(bwd[2:]) // 2]
        flops = 3 * 2 * 3 * H * s["I"] * K * T
        results.append(
            dict(
                model=name,
                impl="ours",
                method=f"{kernel}_sft",
                T=T,
                ms=med * 1e3,
                ms_min=best * 1e3,
                fwd_ms=f_med * 1e3,
                bwd_ms=b_med * 1e3,
                iters=n,
                tflops=flops / med / 1e12,
                lora_rank=rank,
            )
        )
        print(f"    SFT T={T:5d} fwd {f_med * 1e3:8.2f} bwd {b_med * 1e3:8.2f} total {med * 1e3:8.2f} ms", flush=True)
        attach_phases(results[-1])
    module.lora = None


def bench_pack_cache(gate_up, down, kernel, threads, folder, results, name) -> None:
    """Seconds to build the operator when it packs (and writes the cache file) and when it reads that file."""
    seconds = []
    for _ in range(2):
        t0 = time.perf_counter()
        module = KTExperts.from_tensors(gate_up, down, kernel=kernel, cpu_infer=threads, pack_cache=folder)
        kernels.quantization_error(module)  # builds the operator: packs, or loads the cached packing
        seconds.append(time.perf_counter() - t0)
        del module
    print(f"  {kernel}: built in {seconds[0]:.2f} s packing + writing the cache, {seconds[1]:.2f} s reading it")
    results.append(dict(model=name, method=kernel, T=0, ms=0.0, tflops=0.0, pack_s=seconds[0], cached_s=seconds[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="tiny shapes for a smoke test")
    ap.add_argument("--models", default=",".join(SHAPES))
    ap.add_argument("--tokens", default="1,16,128,1024,4096")
    ap.add_argument("--sft-tokens", default="512,2048,4096")
    ap.add_argument("--kernels", default="", help="comma list; default: every variant this CPU runs, and torch")
    ap.add_argument("--sft-kernels", default="amx_bf16,avx512_bf16_packed", help="variants timed for LoRA fwd+bwd")
    ap.add_argument(
        "--fp8-kernels",
        default="amx_bf16,avx512_bf16_packed,avx512_bf16",
        help="variants also timed on fp8 experts (e4m3, 128 x 128 block scales, as DeepSeek-V3 ships them)",
    )
    ap.add_argument("--torch-max-tokens", type=int, default=4096, help="skip the torch loop above this T")
    ap.add_argument("--threads", type=int, default=15)
    ap.add_argument("--budget-s", type=float, default=1.0, help="timing time per point")
    ap.add_argument(
        "--pack-cache", default="", help="folder: also time a build that packs + writes it, then one reading it"
    )
    ap.add_argument("--phases", action="store_true", help="also print where each point's time goes (KT_PHASE_TIMES)")
    ap.add_argument("--out", default="bench_experts.json")
    a = ap.parse_args()

    torch.set_num_threads(1)
    kernels.record_phase_times(a.phases)
    shapes = SMALL if a.small else {m: SHAPES[m] for m in a.models.split(",")}
    names = a.kernels.split(",") if a.kernels else kernels.available_kernels() + kernels.quantized_kernels()
    names = [k for k in names if k not in ("avx512", "avx2", "portable")]
    fp8_names = [k for k in a.fp8_kernels.split(",") if k and k in kernels.fp8_kernels()]
    tokens = [int(t) for t in a.tokens.split(",")]
    sft_tokens = [int(t) for t in a.sft_tokens.split(",") if t]
    gen = torch.Generator().manual_seed(0)
    info = dict(
        cpu_features=kernels.cpu_features(),
        kernels=names,
        fp8_kernels=fp8_names,
        threads=a.threads,
        host=platform.node(),
        torch=torch.__version__,
        date=time.strftime("%Y-%m-%d %H:%M:%S"),
    )
    info["dram_read_gbs"] = dram_read_bandwidth(a.threads)
    print(f"DRAM read bandwidth ({a.threads} threads, the kernels' pool): {info['dram_read_gbs']:.1f} GB/s")
    results: list[dict] = []

    def dump() -> None:
        with open(a.out, "w") as f:
            json.dump(dict(info=info, shapes=shapes, results=results), f, indent=1)

    for name, s in shapes.items():
        E, H, I = s["E"], s["H"], s["I"]
        gate_up = (torch.randn(E, 2 * I, H, generator=gen) * 0.02).to(torch.bfloat16)
        down = (torch.randn(E, H, I, generator=gen) * 0.02).to(torch.bfloat16)
        print(f"{name}: {s}", flush=True)
        for kernel in names:
            if a.pack_cache and kernel != "torch":
                bench_pack_cache(gate_up, down, kernel, a.threads, a.pack_cache, results, name)
            t0 = time.perf_counter()
            module = KTExperts.from_tensors(gate_up, down, kernel=kernel, cpu_infer=a.threads)
            q_err = kernels.quantization_error(module)  # builds (packs) the operator
            print(f"  {kernel}: built in {time.perf_counter() - t0:.1f} s, weight error {q_err}", flush=True)
            toks = [t for t in tokens if kernel != "torch" or t <= a.torch_max_tokens]
            bench_forward(module, s, toks, a.budget_s, gen, results, name, kernel, a.threads)
            if sft_tokens and kernel in a.sft_kernels.split(","):
                bench_sft(module, s, sft_tokens, a.budget_s, gen, results, name, kernel)
            dump()
            del module
        for kernel in fp8_names:  # the same weights quantized to fp8, results named <kernel>_fp8
            module = KTExperts.from_tensors(
                gate_up, down, dtype=torch.float8_e4m3fn, kernel=kernel, cpu_infer=a.threads
            )
            kernels.quantization_error(module)  # builds (packs) the operator
            bench_forward(module, s, tokens, a.budget_s, gen, results, name, f"{kernel}_fp8", a.threads)
            if sft_tokens and kernel in a.sft_kernels.split(","):
                bench_sft(module, s, sft_tokens, a.budget_s, gen, results, name, f"{kernel}_fp8")
            dump()
            del module
    dump()
    print(f"\n{'model':14s} {'method':20s} {'T':>5s} {'ms':>9s} {'TFLOPS':>6s}")
    for r in (r for r in results if "pack_s" not in r):
        print(f"{r['model']:14s} {r['method']:20s} {r['T']:5d} {r['ms']:9.3f} {r['tflops']:6.2f}")


if __name__ == "__main__":
    main()
