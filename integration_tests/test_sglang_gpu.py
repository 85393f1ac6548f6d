"""Real SGLang servers on a GPU, with and without --kt-experts, answering the same greedy requests.

For tiny Qwen3-MoE and DeepSeek-V3 checkpoints (random weights, bf16), and a tiny DeepSeek-V3 in block FP8 as
DeepSeek ships it (e4m3 projections with 128 x 128 `weight_scale_inv`: the plain server runs SGLang's own FP8
path, ours keeps the CPU experts in FP8 and the GPU ones on SGLang's Fp8MoEMethod), one plain server and two
with the routed experts on the CPU: a quarter kept on SGLang's GPU method with decode under CUDA graphs (the
default), and all of them on the CPU without graphs; and an expert-LoRA adapter served by `--kt-experts-lora`
against the plain server on the same adapter merged into the checkpoint by PEFT. Each answers the same prompts,
one at a time and 16 at once. Compared with the reference server:
- greedy continuations token for token where bf16 allows it (reported), and
- next-token agreement with teacher forcing: both servers score the plain server's own sequences
  (`input_top_logprobs`), and their top-1 tokens agree at >= 95% of positions (the plain server against
  itself, single vs batched, is reported beside as the floor of bf16 noise);
- decode against the same server's prefill: the share of each server's greedy tokens (decode, under CUDA graphs
  where on) that its own teacher-forced scoring of prompt + continuation also ranks first. Teacher forcing goes
  through prefill, so this is what checks the decode path; the plain server's share is the floor, and ours must
  reach 95% or that floor less 3 points.

Needs SGLang on a GPU machine (README, "SGLang"): `pytest -m gpu integration_tests/test_sglang_gpu.py`
(`-k fp8`: the FP8 checkpoint alone).
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import json
import os
import shutil
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

sys.path.insert(0, str(REPO / "benchmarks"))
import bench_sft  # noqa: E402  (write_checkpoint(..., expert_dtype="fp8"): DeepSeek-V3's FP8 layout)

# Sizes SGLang's GPU kernels take (head dims of 64, hidden 256), still tiny.
SHAPES = {
    "qwen3_moe": {"hidden_size": 256, "head_dim": 64, "moe_intermediate_size": 128, "intermediate_size": 512},
    "deepseek_v3": {
        "hidden_size": 256,
        "moe_intermediate_size": 128,
        "intermediate_size": 512,
        # DeepSeek-V3's MLA widths: SGLang's MLA decode kernels take a latent of 512 + 64 (or 256 + 32) only
        "q_lora_rank": 64,
        "kv_lora_rank": 512,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        # SGLang's DeepSeek model reads these three; DeepSeek-V3's own config.json has them with these values
        "moe_layer_freq": 1,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
    },
}
# The FP8 checkpoint: DeepSeek-V3's tiny shapes above, every projection (attention's included) in e4m3 with
# 128 x 128 block scales, as DeepSeek ships it (bench_sft.is_fp8_weight; embeddings, LM head, router and norms
# bf16). SGLang loads q_a_proj and kv_a_proj_with_mqa as one fused layer and concatenates their block scales,
# which gives the fused weight's scales only when q_lora_rank is whole blocks (DeepSeek-V3: 1536): 128 here.
# Its FP8 MoE method wants moe_intermediate_size, and its merged FP8 layers (dense / shared gate_up) each half,
# in whole blocks: 128 and 512 above are.
# Weights drawn with DeepSeek-V3's initializer_range (0.02), not the bundled config's 0.2: SGLang's FP8 layers
# quantize their inputs per token and 128 columns (e4m3), our CPU experts do not, and at 0.2 the random model is
# chaotic enough that this alone flips ~15% of top-1 tokens (a CPU simulation of both; the plain FP8 server's
# own decode agreed with its prefill at 53% on the H200). At 0.02 the simulation gives ~97% for CPU experts, and
# still 76% with each expert given its neighbour's gate_up, 83% with the routed experts zeroed.
FP8_SHAPES = {**SHAPES["deepseek_v3"], "q_lora_rank": 128, "initializer_range": 0.02}
SERVER_FLAGS = ["--mem-fraction-static", "0.15", "--cuda-graph-max-bs", "16", "--log-level", "warning"]
VARIANTS = {  # the plain server first: the others are compared with it
    "plain": [],
    "kt-quarter-gpu": ["--kt-experts", "--kt-experts-gpu-experts", "0.25"],
    "kt-cpu-eager": ["--kt-experts", "--disable-cuda-graph", "--kt-experts-gpu-experts", "0"],
}
NEW_TOKENS = 32  # x 16 prompts: 512 decoded positions (sampling noise of an agreement near 90%: ~1.3 points)
LOGS = Path(os.environ.get("OUT", "/tmp")) / "sglang-gpu-logs"


def _prompts(vocab: int, n: int = 16) -> list[list[int]]:
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


def _tiny_config(root: Path, family: str, shapes: dict) -> Path:
    """The bundled tiny `family`'s config.json with `shapes` applied, written into root/config (returned)."""
    config = json.loads((REPO / "examples" / "tiny_moe" / family / "config.json").read_text())
    config.update(shapes)
    (root / "config").mkdir()
    (root / "config" / "config.json").write_text(json.dumps(config))
    return root / "config"


@pytest.fixture(scope="module", params=sorted(SHAPES))
def checkpoint(request, tmp_path_factory):
    family = request.param
    root = tmp_path_factory.mktemp(family)
    return write_checkpoint(root / f"tiny-{family}", _tiny_config(root, family, SHAPES[family]), dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory):
    """The tiny DeepSeek-V3 (FP8_SHAPES) as DeepSeek ships it: FP8 projections with their block scales, routed experts
    per expert, DeepSeek's `quantization_config` in config.json; random weights (normal(0, initializer_range), norms
    1, as transformers initializes), the bundled tokenizer."""
    from transformers import AutoConfig

    root = tmp_path_factory.mktemp("deepseek_v3-fp8")
    config = AutoConfig.from_pretrained(_tiny_config(root, "deepseek_v3", FP8_SHAPES))
    path = root / "tiny-deepseek_v3-fp8"
    bench_sft.write_checkpoint(config, path, "cpu", expert_dtype="fp8", progress=False)
    return path


def _decode_vs_prefill(server: SGLangServer, prompts: list[list[int]], outputs: list[list[int]]) -> float:
    """Share of the generated tokens that the server's own prefill over prompt + output also ranks first."""
    hits = total = 0
    for prompt, output in zip(prompts, outputs, strict=True):
        top = server.top1(prompt + output)  # top[i]: the argmax for token i + 1
        predicted = top[len(prompt) - 1 : len(prompt) - 1 + len(output)]
        hits += sum(x == y for x, y in zip(predicted, output, strict=True))
        total += len(output)
    return hits / total


def _compare(checkpoint: Path, variants: dict[str, tuple[Path, list[str]]], tag: str) -> None:
    """Serves each variant (the first is the reference) and asserts top-1 agreement >= 95% with the first and
    decode-vs-prefill agreement >= min(95%, the reference's less 3 points)."""
    vocab = json.loads((checkpoint / "config.json").read_text())["vocab_size"]
    prompts = _prompts(vocab)
    results, report, failures = {}, {}, []
    reference = next(iter(variants))
    for name, (path, flags) in variants.items():
        with SGLangServer(path, name, SERVER_FLAGS + flags, LOGS) as server:
            results[name] = _answers(server, prompts)
            if name == reference:
                sequences = [p + out for p, out in zip(prompts, results[name]["single"], strict=True)]
            results[name]["top1"] = [server.top1(s) for s in sequences]
            decode = _decode_vs_prefill(server, prompts, results[name]["single"])
        ref, ours = results[reference], results[name]
        if name == reference:
            row = {"single vs batched exact": _exact(ref["single"], ref["batched"]), "decode vs prefill": decode}
            decode_floor = min(0.95, decode - 0.03)
        else:
            row = {
                "single exact": _exact(ours["single"], ref["single"]),
                "batched exact": _exact(ours["batched"], ref["batched"]),
                "top1 agreement": _agreement(ours["top1"], ref["top1"]),
                "decode vs prefill": decode,
            }
            if row["top1 agreement"] < 0.95:
                failures.append(f"{name}: top-1 agreement {row['top1 agreement']:.3f} < 0.95")
            if decode < decode_floor:
                failures.append(f"{name}: decode vs its prefill {decode:.3f} < {decode_floor:.3f}")
        report[name] = row
        print(f"{tag} {name}: {json.dumps(row)}", flush=True)  # as it comes: a long run may be cut
        (LOGS / f"{tag}-report.json").write_text(json.dumps(report, indent=1))
    assert not failures, failures


def _compare_variants(checkpoint: Path) -> None:
    """VARIANTS on `checkpoint`, compared with its plain server."""
    _compare(checkpoint, {name: (checkpoint, flags) for name, flags in VARIANTS.items()}, checkpoint.name)


def test_kt_experts_answer_like_the_plain_server(checkpoint):
    _compare_variants(checkpoint)


def test_kt_experts_answer_like_the_plain_server_fp8(fp8_checkpoint):
    """Block-FP8 DeepSeek-V3: the reference is the plain server on SGLang's own FP8 path (block-FP8 linear layers,
    Fp8MoEMethod); ours keeps the CPU experts in e4m3 with their scales, a quarter on Fp8MoEMethod."""
    _compare_variants(fp8_checkpoint)


def test_expert_lora_serves_like_the_merged_checkpoint(checkpoint, tmp_path):
    """`--kt-experts-lora` (a quarter of the experts on the GPU: merged there, applied on the CPU for the rest)
    against the plain server on the same adapter merged into the checkpoint by PEFT."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from tests.tiny_models import randomize_lora

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    peft_model = randomize_lora(peft.get_peft_model(model, lora), std=0.05)
    adapter, merged = tmp_path / "adapter", tmp_path / f"{checkpoint.name}-merged"
    peft_model.save_pretrained(adapter)
    peft_model.merge_and_unload().to(torch.bfloat16).save_pretrained(merged)
    for tokenizer_file in checkpoint.glob("*token*"):  # as shipped beside the weights
        shutil.copy(tokenizer_file, merged)
    kt_flags = ["--kt-experts", "--kt-experts-gpu-experts", "0.25", "--kt-experts-lora", str(adapter)]
    variants = {"merged-plain": (merged, []), "kt-lora-quarter-gpu": (checkpoint, kt_flags)}
    _compare(checkpoint, variants, f"{checkpoint.name}-lora")
