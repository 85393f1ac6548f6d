"""Serving speed through the stock SGLang server: GPU-only, SGLang's own CPU offload, and `--kt-experts`.

    python3 benchmarks/bench_serve.py --shape dsv2-lite --gpu-experts 0.25 --cpu-threads 15 --out serve.json

One command, one checkpoint on disk (random bf16 weights of the real shape, written when missing), one server
at a time, each with the same KV-cache size:
- gpu:     every weight on the GPU (the speed ceiling, and the memory the others save);
- offload: `--cpu-offload-gb X`, X = the bytes of the routed experts that `kt` keeps in host memory, so both
           hold the same weights on the GPU;
- kt:      `--kt-experts --kt-experts-gpu-experts R` (the first R of each layer's experts on the GPU, the rest
           computed on the CPU by kt-plugins), CUDA graphs on; it records the routing it serves
           (`--kt-experts-record-routing`);
- kt-hot:  the same number of experts on the GPU, chosen per layer as the most routed in kt's recording
           (`--kt-experts-gpu-expert-ids <recording>`): what a user does after serving real traffic for a while.
Per server: prefill tokens/s (2048-token prompts, one at a time, 1 new token), decode tokens/s with 1 stream and
with 8 concurrent streams (short prompts, `--new-tokens` each, timed from each stream's first token to its last),
the GPU memory the server reports after loading (from its log), and its start time.

Legend: E = routed experts per layer, H = hidden, I = expert intermediate, L = MoE layers.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import re
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "integration_tests"))
from bench_sft import write_checkpoint  # noqa: E402
from sglang_server import SGLangServer  # noqa: E402
from shapes import SHAPES, build_config  # noqa: E402


def routed_experts(config) -> int:
    """E, the routed experts of each MoE layer."""
    return getattr(config, "n_routed_experts", None) or config.num_experts


def routed_expert_bytes(config) -> int:
    """bf16 bytes of every routed expert of the model: L x E x 3 x H x I x 2."""
    layers = config.num_hidden_layers - getattr(config, "first_k_dense_replace", 0)
    return layers * routed_experts(config) * 3 * config.hidden_size * config.moe_intermediate_size * 2


def prompts(vocab: int, n: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (length,), generator=g).tolist() for _ in range(n)]


def measure(server: SGLangServer, vocab: int, new_tokens: int) -> dict:
    long_prompts = prompts(vocab, 4, 2048, seed=1)
    for p in prompts(vocab, 2, 2048, seed=4):  # warm-up: kernels of this size; prompts of their own, none cached
        server.generate(p, 1)
    t0 = time.perf_counter()
    for p in long_prompts:
        server.generate(p, 1)
    prefill_tok_s = 4 * 2048 / (time.perf_counter() - t0)

    def decode_rate(streams: int) -> float:
        with concurrent.futures.ThreadPoolExecutor(streams) as pool:
            runs = list(pool.map(lambda p: server.timed_stream(p, new_tokens), prompts(vocab, streams, 32, seed=2)))
        first = max(r[0] for r in runs)
        last = max(r[1] for r in runs)
        return sum(r[2] - 1 for r in runs) / max(last - first, 1e-9)

    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # warm-up (a few tokens: offload's are slow)
        pool.submit(server.timed_stream, prompts(vocab, 1, 32, seed=3)[0], 8).result()
    return {"prefill_tok_s": prefill_tok_s, "decode_1_tok_s": decode_rate(1), "decode_8_tok_s": decode_rate(8)}


def gpu_weight_gib(log: Path) -> float | None:
    """The weight memory SGLang logs after loading ("... mem usage=12.34 GB"), in GiB."""
    found = re.findall(r"Load weight end\..*?mem usage=([\d.]+) GB", log.read_text())
    return float(found[-1]) * 1e9 / 2**30 if found else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=SHAPES, default="dsv2-lite")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the real model's)")
    ap.add_argument("--gpu-experts", type=float, default=0.25, help="kt: ratio of each layer's experts on the GPU")
    ap.add_argument("--cpu-threads", type=int, default=None, help="kt: --kt-experts-cpu-threads")
    ap.add_argument("--modes", default="gpu,offload,kt,kt-hot")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--max-total-tokens", type=int, default=65536, help="the KV cache of every server")
    ap.add_argument("--checkpoint", type=Path, default=None)
    ap.add_argument("--logs", type=Path, default=Path("bench_serve_logs"))
    ap.add_argument("--out", default="bench_serve.json")
    a = ap.parse_args()

    config = build_config(False, a.layers, a.shape)
    checkpoint = a.checkpoint or Path("/tmp") / f"kt-bench-{a.shape}-{config.num_hidden_layers}"
    write_checkpoint(config, checkpoint, "cuda" if torch.cuda.is_available() else "cpu")
    offload_gb = routed_expert_bytes(config) * (1 - a.gpu_experts) / 1e9
    a.logs.mkdir(parents=True, exist_ok=True)
    routing = (a.logs / "routing.json").resolve()  # written by kt while it serves, read by kt-hot
    routing.unlink(missing_ok=True)
    kt = ["--kt-experts"] + (["--kt-experts-cpu-threads", str(a.cpu_threads)] if a.cpu_threads else [])
    hot = round(a.gpu_experts * routed_experts(config))
    common = [
        "--max-total-tokens",
        str(a.max_total_tokens),
        "--mem-fraction-static",
        "0.85",
        "--cuda-graph-max-bs",
        "8",
    ]
    flags = {
        "gpu": [],
        "offload": ["--cpu-offload-gb", f"{offload_gb:.0f}"],
        "kt": [*kt, "--kt-experts-gpu-experts", str(a.gpu_experts), "--kt-experts-record-routing", str(routing)],
        "kt-hot": [*kt, "--kt-experts-gpu-experts", str(hot), "--kt-experts-gpu-expert-ids", str(routing)],
    }
    results = {
        "command": " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "shape": a.shape,
        "layers": config.num_hidden_layers,
        "offload_gb": offload_gb,
        "runs": [],
    }
    for mode in a.modes.split(","):
        if mode == "kt-hot" and not routing.exists():
            row = {"mode": mode, "error": f"no routing recorded: {routing} (run the kt mode first)"}
            results["runs"].append(row)
            print(json.dumps(row), flush=True)
            continue
        try:
            with SGLangServer(checkpoint, mode, common + flags[mode], a.logs, start_timeout=900) as server:
                row = {"mode": mode, "start_s": server.started_s, **measure(server, config.vocab_size, a.new_tokens)}
            row["gpu_weights_gib"] = gpu_weight_gib(server.log)
        except RuntimeError as e:
            row = {"mode": mode, "error": str(e)[-2000:]}
        results["runs"].append(row)
        print(json.dumps(row), flush=True)
        Path(a.out).write_text(json.dumps(results, indent=1))  # as it comes: a long run may be cut
    summarize(results["runs"])


def summarize(runs: list[dict]) -> None:
    """The table, with the targets' ratios: kt's decode against offload's, kt's prefill against gpu's."""
    ok = {r["mode"]: r for r in runs if "error" not in r}
    print(f"\n{'mode':10s}{'prefill':>10s}{'decode x1':>11s}{'decode x8':>11s}{'GPU weights GiB':>17s}")
    for r in runs:
        if "error" in r:
            print(f"{r['mode']:10s} failed: {r['error'][-300:]}")
            continue
        gib = f"{r['gpu_weights_gib']:.2f}" if r.get("gpu_weights_gib") is not None else "-"
        print(
            f"{r['mode']:10s}{r['prefill_tok_s']:10.0f}{r['decode_1_tok_s']:11.1f}{r['decode_8_tok_s']:11.1f}{gib:>17s}"
        )
    for name in ("kt", "kt-hot"):
        if name in ok and "offload" in ok:
            kt, off = ok[name], ok["offload"]
            print(
                f"{name} / offload decode: x1 {kt['decode_1_tok_s'] / off['decode_1_tok_s']:.2f}, "
                f"x8 {kt['decode_8_tok_s'] / off['decode_8_tok_s']:.2f} (target >= 1.5)"
            )
        if name in ok and "gpu" in ok:
            print(f"{name} / gpu prefill: {ok[name]['prefill_tok_s'] / ok['gpu']['prefill_tok_s']:.2f} (target >= 0.5)")


if __name__ == "__main__":
    main()
