"""A stock SGLang server in a subprocess, for the GPU tests and benchmarks/bench_serve.py.

    with SGLangServer(checkpoint, "plain", flags, logs=Path("logs")) as server:
        server.generate(prompt_ids, max_new_tokens=16)

Requests send token ids (servers run with --skip-tokenizer-init) and greedy sampling.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

# Launch flags the GPU machine's trimmed SGLang needs (no FA3, no flashinfer sampling), token ids in and out.
BASE_FLAGS = [
    "--attention-backend", "triton", "--sampling-backend", "pytorch", "--skip-tokenizer-init",
    "--tp-size", "1",
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict, timeout: float = 600) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


class SGLangServer:
    """`python -m sglang.launch_server` on `checkpoint` with BASE_FLAGS + `flags`, its output in logs/<name>.log.

    Raises RuntimeError (with the log's end) when the server exits or is not up within `start_timeout` s.
    """

    def __init__(self, checkpoint: Path, name: str, flags: list[str], logs: Path, start_timeout: float = 420):
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        logs.mkdir(parents=True, exist_ok=True)
        self.log = logs / f"{Path(checkpoint).name}-{name}.log"
        # -P: the working directory stays off sys.path (a source checkout there would shadow the installed kt_core)
        cmd = [sys.executable, "-P", "-m", "sglang.launch_server", "--model-path", str(checkpoint)]
        cmd += ["--port", str(self.port)]
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(cmd + BASE_FLAGS + flags, stdout=log, stderr=subprocess.STDOUT)
        self.started_s = self._wait_up(start_timeout)

    def _wait_up(self, timeout: float) -> float:
        t0 = time.time()
        while time.time() < t0 + timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server {self.name} exited:\n" + self.log.read_text()[-4000:])
            try:
                urllib.request.urlopen(self.url + "/health_generate", timeout=5)
                return time.time() - t0
            except OSError:
                time.sleep(2)
        self.stop()
        raise RuntimeError(f"server {self.name} did not start within {timeout:.0f} s:\n" + self.log.read_text()[-4000:])

    def generate(self, prompt: list[int], max_new_tokens: int) -> list[int]:
        """Greedy continuation of `prompt` (token ids), EOS ignored."""
        params = {"temperature": 0, "max_new_tokens": max_new_tokens, "ignore_eos": True}
        return post(self.url + "/generate", {"input_ids": prompt, "sampling_params": params})["output_ids"]

    def timed_stream(self, prompt: list[int], max_new_tokens: int) -> tuple[float, float, int]:
        """Streams a greedy continuation: (seconds to the first token, seconds to the last, tokens received)."""
        params = {"temperature": 0, "max_new_tokens": max_new_tokens, "ignore_eos": True}
        body = json.dumps({"input_ids": prompt, "sampling_params": params, "stream": True}).encode()
        req = urllib.request.Request(self.url + "/generate", body, {"Content-Type": "application/json"})
        t0, first, tokens = time.perf_counter(), None, 0
        with urllib.request.urlopen(req, timeout=600) as r:
            for line in r:
                line = line.strip()
                if not line.startswith(b"data:") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                if chunk.get("output_ids") and first is None:
                    first = time.perf_counter() - t0
                tokens = chunk.get("meta_info", {}).get("completion_tokens", tokens)
        return first or 0.0, time.perf_counter() - t0, tokens

    def top1(self, sequence: list[int]) -> list[int]:
        """The server's argmax next token at each position of `sequence` (teacher forcing)."""
        body = {
            "input_ids": sequence,
            "sampling_params": {"temperature": 0, "max_new_tokens": 1},
            "return_logprob": True,
            "logprob_start_len": 0,
            "top_logprobs_num": 1,
        }
        rows = post(self.url + "/generate", body)["meta_info"]["input_top_logprobs"]
        return [row[0][1] for row in rows if row]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(20)

    def __enter__(self) -> SGLangServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
