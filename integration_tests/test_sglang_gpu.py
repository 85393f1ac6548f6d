"""Real SGLang servers on a GPU, with and without --kt-experts, answering the same greedy requests.

For tiny Qwen3-MoE and DeepSeek-V3 checkpoints (random weights, bf16), one plain server and two with the
routed experts on the CPU: a quarter kept on SGLang's GPU method with decode under CUDA graphs (the default),
and all of them on the CPU without graphs. Each answers the same prompts, one at a time and 8 at once. Compared with the
plain server:
- greedy continuations token for token where bf16 allows it (reported), and
- next-token agreement with teacher forcing: both servers score the plain server's own sequences
  (`input_top_logprobs`), and their top-1 tokens agree at >= 95% of positions (the plain server against
  itself, single vs batched, is reported beside as the floor of bf16 noise).

Needs SGLang on a GPU machine (README, "SGLang"): `pytest -m gpu integration_tests/test_sglang_gpu.py`.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.integration]
if not torch.cuda.is_available() or importlib.util.find_spec("sglang") is None:
    pytest.skip("needs a CUDA GPU and SGLang", allow_module_level=True)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples" / "tiny_moe"))
from make_checkpoint import write_checkpoint  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from sglang_server import SGLangServer  # noqa: E402

# Sizes SGLang's GPU kernels take (head dims of 64, hidden 256), still tiny.
SHAPES = {
    "qwen3_moe": {"hidden_size": 256, "head_dim": 64, "moe_intermediate_size": 128, "intermediate_size": 512},
    "deepseek_v3": {
        "hidden_size": 256,
        "moe_intermediate_size": 128,
        "intermediate_size": 512,
        "q_lora_rank": 64,
        "kv_lora_rank": 64,
        "qk_nope_head_dim": 64,
        "qk_rope_head_dim": 32,
        "v_head_dim": 64,
        "moe_layer_freq": 1,  # SGLang's DeepSeek model reads it; DeepSeek's own config.json has it
    },
}
SERVER_FLAGS = ["--mem-fraction-static", "0.15", "--cuda-graph-max-bs", "16", "--log-level", "warning"]
VARIANTS = {  # the plain server first: the others are compared with it
    "plain": [],
    "kt-quarter-gpu": ["--kt-experts", "--kt-experts-gpu-experts", "0.25"],
    "kt-cpu-eager": ["--kt-experts", "--disable-cuda-graph"],
}
NEW_TOKENS = 16
LOGS = Path(os.environ.get("OUT", "/tmp")) / "sglang-gpu-logs"


def _prompts(vocab: int, n: int = 8) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, vocab, (int(L),), generator=g).tolist() for L in torch.linspace(5, 60, n)]


def _answers(server: SGLangServer, prompts: list[list[int]]) -> dict[str, list]:
    single = [server.generate(p, NEW_TOKENS) for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        batched = list(pool.map(lambda p: server.generate(p, NEW_TOKENS), prompts))
    return {"single": single, "batched": batched}


def _exact(a: list[list[int]], b: list[list[int]]) -> float:
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(a)


def _agreement(a: list[list[int]], b: list[list[int]]) -> float:
    pairs = [(x, y) for xs, ys in zip(a, b, strict=True) for x, y in zip(xs, ys, strict=True)]
    return sum(x == y for x, y in pairs) / len(pairs)


@pytest.mark.parametrize("family", sorted(SHAPES))
def test_kt_experts_answer_like_the_plain_server(family, tmp_path):
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    config = json.loads((REPO / "examples" / "tiny_moe" / family / "config.json").read_text())
    config.update(SHAPES[family])
    (config_dir / "config.json").write_text(json.dumps(config))
    checkpoint = write_checkpoint(tmp_path / f"tiny-{family}", config_dir, dtype=torch.bfloat16)
    prompts = _prompts(config["vocab_size"])

    results, report, failures = {}, {}, []
    for name, flags in VARIANTS.items():
        with SGLangServer(checkpoint, name, SERVER_FLAGS + flags, LOGS) as server:
            results[name] = _answers(server, prompts)
            if name == "plain":
                sequences = [p + out for p, out in zip(prompts, results[name]["single"], strict=True)]
            results[name]["top1"] = [server.top1(s) for s in sequences]
        plain, ours = results["plain"], results[name]
        if name == "plain":
            row = {"single vs batched exact": _exact(plain["single"], plain["batched"])}
        else:
            row = {
                "single exact": _exact(ours["single"], plain["single"]),
                "batched exact": _exact(ours["batched"], plain["batched"]),
                "top1 agreement": _agreement(ours["top1"], plain["top1"]),
            }
            if row["top1 agreement"] < 0.95:
                failures.append(f"{name}: top-1 agreement {row['top1 agreement']:.3f} < 0.95")
        report[name] = row
        print(f"{family} {name}: {json.dumps(row)}", flush=True)  # as it comes: a long run may be cut
        (LOGS / f"{family}-report.json").write_text(json.dumps(report, indent=1))
    assert not failures, failures
