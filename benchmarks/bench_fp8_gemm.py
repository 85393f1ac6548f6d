"""The streamed FP8 experts' grouped GEMMs on the GPU: straight from e4m3 (kt_core.streaming.fp8_gemm) against the
working buffer (each group of experts dequantized to bf16, then torch._grouped_mm) and against bf16 weights already
on the device (the ceiling), at one layer's widths, every product of the device path:

  gate_up fwd   x [S, H] @ W13^T -> [S, 2I]      down fwd   h [S, I] @ W2^T -> [S, H]
  gate_up bwd   dgu [S, 2I] @ W13 -> [S, H]      down bwd   dy [S, H] @ W2 -> [S, I]

S = experts x rows per expert (the tokens of a step times top-K, spread evenly). Each timing is the median of
--repeat CUDA-event-timed calls after a warm-up; the buffer path's time includes its dequantization, since a streamed
layer's weights arrive as e4m3 for each call.

    python benchmarks/bench_fp8_gemm.py                       # DeepSeek-V3 widths, 32 experts, 64/256/1024 rows each
    python benchmarks/bench_fp8_gemm.py --hidden 2048 --intermediate 1408 --experts 64 --out fp8_gemm.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from types import SimpleNamespace

import torch

from kt_core.loading.fp8 import quantize_experts_fp8
from kt_core.streaming import fp8_gemm
from kt_core.streaming.store import GroupedWeight, _dequantize_into

BLOCK = (128, 128)


def timed(fn, repeat: int) -> float:
    """Median milliseconds of `repeat` calls of fn (after two untimed ones)."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def weight_set(q: torch.Tensor, scale: torch.Tensor, which: int) -> GroupedWeight:
    w = GroupedWeight.__new__(GroupedWeight)  # what the kernel reads of a streamed weight set
    w.q, w.scale, w.which, w.shape, w.dtype = q, scale, which, q.shape, torch.bfloat16
    w.store = SimpleNamespace(block=BLOCK)
    return w


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--intermediate", type=int, default=2048)
    ap.add_argument("--experts", type=int, default=32, help="experts of the weight set (a slot's worth or fewer)")
    ap.add_argument("--rows", default="64,256,1024", help="rows per expert, comma list")
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    H, I, E = args.hidden, args.intermediate, args.experts
    dev = torch.device("cuda")
    torch.manual_seed(0)
    q_gu, s_gu, q_d, s_d = quantize_experts_fp8(
        torch.randn(E, 2 * I, H, device=dev) / H**0.5, torch.randn(E, H, I, device=dev) / I**0.5, BLOCK
    )
    sets = [weight_set(q_gu, s_gu, 0), weight_set(q_d, s_d, 1)]
    assert all(fp8_gemm.applies(w) for w in sets), "the fused kernel does not take these widths"
    dense = [_dequantize_into(torch.empty(w.shape, dtype=torch.bfloat16, device=dev), w.q, w.scale, w.which, BLOCK)
             for w in sets]  # fmt: skip
    buffers = [torch.empty_like(d) for d in dense]
    products = [("gate_up fwd", 0, True), ("down fwd", 1, True), ("gate_up bwd", 0, False), ("down bwd", 1, False)]
    rows_list = [int(r) for r in args.rows.split(",")]
    results = []
    print(f"H {H}, I {I}, {E} experts; {torch.cuda.get_device_name()}")
    print(f"{'product':12s} {'rows/expert':>11s} {'bf16 ms':>9s} {'buffer ms':>10s} {'e4m3 ms':>9s}"
          f" {'e4m3 TFLOP/s':>13s} {'vs buffer':>10s} {'vs bf16':>8s}")  # fmt: skip
    for rows in rows_list:
        S = rows * E
        offs = torch.full((E,), rows, dtype=torch.int32, device=dev).cumsum(0).to(torch.int32)
        for name, which, transposed in products:
            w, d, buf = sets[which], dense[which], buffers[which]
            n_in = w.shape[2] if transposed else w.shape[1]
            x = torch.randn(S, n_in, device=dev, dtype=torch.bfloat16)
            wt = d.transpose(1, 2) if transposed else d

            def bf16(wt=wt, x=x, offs=offs):
                return torch._grouped_mm(x, wt, offs=offs)

            def buffer(w=w, buf=buf, x=x, offs=offs, transposed=transposed):
                _dequantize_into(buf, w.q, w.scale, w.which, BLOCK)
                return torch._grouped_mm(x, buf.transpose(1, 2) if transposed else buf, offs=offs)

            def e4m3(w=w, x=x, offs=offs, transposed=transposed):
                return fp8_gemm.grouped_mm(x, w, offs, transposed=transposed)

            ref = bf16().float()
            err = ((e4m3().float() - ref).norm() / ref.norm()).item()
            ms = {k: timed(f, args.repeat) for k, f in (("bf16", bf16), ("buffer", buffer), ("e4m3", e4m3))}
            flop = 2 * S * w.shape[1] * w.shape[2]
            r = dict(product=name, rows=rows, ms=ms, e4m3_tflops=flop / ms["e4m3"] / 1e9, rel_err_vs_bf16=err,
                     vs_buffer=ms["buffer"] / ms["e4m3"], vs_bf16=ms["bf16"] / ms["e4m3"])  # fmt: skip
            results.append(r)
            times = f"{ms['bf16']:9.3f} {ms['buffer']:10.3f} {ms['e4m3']:9.3f} {r['e4m3_tflops']:13.1f}"
            print(f"{name:12s} {rows:11d} {times} {r['vs_buffer']:9.2f}x {r['vs_bf16']:7.2f}x  (rel err {err:.1e})")
    if args.out:
        info = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, hidden=H, intermediate=I, experts=E)
        with open(args.out, "w") as f:
            json.dump(dict(info=info, results=results), f, indent=1)


if __name__ == "__main__":
    main()
