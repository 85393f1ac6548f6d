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
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.integration]
if not torch.cuda.is_available() or importlib.util.find_spec("sglang") is None:
    pytest.skip("needs a CUDA GPU and SGLang", allow_module_level=True)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples" / "tiny_moe"))
from make_checkpoint import write_checkpoint  # noqa: E402

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
BASE_FLAGS = [
    "--attention-backend", "triton", "--sampling-backend", "pytorch", "--skip-tokenizer-init",
    "--mem-fraction-static", "0.15", "--cuda-graph-max-bs", "16", "--tp-size", "1", "--log-level", "warning",
]  # fmt: skip
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


class Server:
    def __init__(self, checkpoint: Path, name: str, flags: list[str]):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        LOGS.mkdir(parents=True, exist_ok=True)
        self.log = LOGS / f"{checkpoint.name}-{name}.log"
        cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(checkpoint), "--port", str(self.port)]
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(cmd + BASE_FLAGS + flags, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 420
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server {name} exited:\n" + self.log.read_text()[-4000:])
            try:
                urllib.request.urlopen(self.url + "/health_generate", timeout=5)
                return
            except OSError:
                time.sleep(2)
        self.stop()
        raise RuntimeError(f"server {name} did not start within 420 s:\n" + self.log.read_text()[-4000:])

    def generate(self, prompt: list[int]) -> list[int]:
        body = {
            "input_ids": prompt,
            "sampling_params": {"temperature": 0, "max_new_tokens": NEW_TOKENS, "ignore_eos": True},
        }
        return _post(self.url + "/generate", body)["output_ids"]

    def top1(self, sequence: list[int]) -> list[int]:
        """The server's argmax next token at each position of `sequence` (teacher forcing)."""
        body = {
            "input_ids": sequence,
            "sampling_params": {"temperature": 0, "max_new_tokens": 1},
            "return_logprob": True,
            "logprob_start_len": 0,
            "top_logprobs_num": 1,
        }
        rows = _post(self.url + "/generate", body)["meta_info"]["input_top_logprobs"]
        return [row[0][1] for row in rows if row]

    def answers(self, prompts: list[list[int]]) -> dict[str, list]:
        single = [self.generate(p) for p in prompts]
        with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
            batched = list(pool.map(self.generate, prompts))
        return {"single": single, "batched": batched}

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(20)


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
        server = Server(checkpoint, name, flags)
        try:
            results[name] = server.answers(prompts)
            if name == "plain":
                sequences = [p + out for p, out in zip(prompts, results[name]["single"], strict=True)]
            results[name]["top1"] = [server.top1(s) for s in sequences]
        finally:
            server.stop()
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
