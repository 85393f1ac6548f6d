"""SGLang integration on the CPU: stock sglang (0.5.20 / 0.5.21, torch 2.13.0 CPU) with kt_plugins.sglang.

Run in the SGLang environment (scripts/setup_sglang.sh):
    .venv-sglang/bin/python -m pytest integration_tests/test_sglang.py -m integration

- FusedMoE with KTExpertsMethod against SGLang's own unquantized method on the same random weights, loaded
  through the layer's weight_loader as a checkpoint would be (all experts on the CPU, the first N on the
  GPU method, a chosen set on it), in fp32 and bf16; plus a PEFT-format expert LoRA.
- `python -m sglang.launch_server --help` lists the flags (the entry point is discovered as installed).
- The whole route in fresh processes: flags parsed by SGLang's parser, exported, and a `spawn`ed process
  (as SGLang starts its schedulers) that loads the plugins, builds a FusedMoE and gets our method.

Legend: T = tokens, K = experts per token, E = experts, H = hidden, I = expert intermediate, r = LoRA rank.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.integration

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

if importlib.util.find_spec("sglang") is None:
    pytest.skip("needs the SGLang environment: scripts/setup_sglang.sh", allow_module_level=True)

from sglang_cpu import init_sglang_cpu, install_torchvision_stubs, write_model_config  # noqa: E402

install_torchvision_stubs()  # before anything imports torchvision (sglang, transformers' image utils)

from kt_core.peft import expert_factors_to_peft  # noqa: E402
from kt_plugins.sglang.options import ENV_VAR, KTExpertsOptions  # noqa: E402

E, H, I, K = 8, 64, 32, 2


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = write_model_config(
        tmp_path_factory.mktemp("tiny_qwen3_moe"), num_experts=E, hidden=H, intermediate=I, top_k=K
    )
    init_sglang_cpu(path)
    return path


def _random_experts(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    gate = torch.randn(E, I, H, generator=g) / H**0.5  # [E, I, H]
    up = torch.randn(E, I, H, generator=g) / H**0.5  # [E, I, H]
    down = torch.randn(E, H, I, generator=g) / I**0.5  # [E, H, I]
    return gate.to(dtype), up.to(dtype), down.to(dtype)


def _build_layer(dtype, quant_method=None):
    from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE

    return FusedMoE(
        num_experts=E,
        hidden_size=H,
        intermediate_size=I,
        layer_id=0,
        top_k=K,
        params_dtype=dtype,
        quant_method=quant_method,
        prefix="model.layers.0.mlp.experts",
    )


def _load(layer, gate, up, down):
    # As a model's load_weights does: one call per (expert, shard), SGLang's parameter names.
    for e in range(E):
        for param, tensor, shard in (
            (layer.w13_weight, gate[e], "w1"),
            (layer.w13_weight, up[e], "w3"),
            (layer.w2_weight, down[e], "w2"),
        ):
            name = "model.layers.0.mlp.experts." + ("w13_weight" if shard != "w2" else "w2_weight")
            param.weight_loader(param, tensor, name, shard_id=shard, expert_id=e)
    layer.quant_method.process_weights_after_loading(layer)


def _routing(T, dtype, seed=1):
    from sglang.srt.layers.moe.topk import StandardTopKOutput

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g).to(dtype)  # [T, H]
    logits = torch.randn(T, E, generator=g)  # [T, E]
    weights, ids = torch.softmax(logits, dim=-1).topk(K, dim=-1)  # [T, K]
    return x, StandardTopKOutput(topk_weights=weights, topk_ids=ids.to(torch.int32), router_logits=logits)


def _ours(options: KTExpertsOptions):
    from sglang.srt.layers.quantization.unquant import UnquantizedFusedMoEMethod

    from kt_plugins.sglang.method import KTExpertsLayerConfig, KTExpertsMethod

    return KTExpertsMethod(UnquantizedFusedMoEMethod(False), KTExpertsLayerConfig(layer_idx=0, options=options))


TOLERANCE = {torch.float32: {"rtol": 1e-5, "atol": 1e-5}, torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2}}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "placement",
    [{"gpu_experts": "0"}, {"gpu_experts": "3"}, {"gpu_experts": "0.5"}, {"gpu_expert_ids": "1,4,6"}],
    ids=["all-cpu", "first-3-gpu", "half-gpu", "mask-gpu"],
)
@pytest.mark.parametrize("T", [1, 7, 33])
def test_fused_moe_matches_sglang_native(model_dir, dtype, placement, T):
    gate, up, down = _random_experts(dtype)
    native = _build_layer(dtype)
    _load(native, gate, up, down)
    ours = _build_layer(dtype, _ours(KTExpertsOptions(kernel="auto", **placement)))
    _load(ours, gate, up, down)
    method = ours.quant_method
    assert len(method.gpu_ids) + len(method.cpu_ids) == E
    assert ours.w13_weight.shape[0] == len(method.gpu_ids)  # GPU method holds only its experts

    x, topk = _routing(T, dtype)
    expected = native(x.clone(), topk)
    actual = ours(x.clone(), topk)
    torch.testing.assert_close(actual, expected, **TOLERANCE[dtype])


def test_cpu_experts_stay_in_host_memory_under_a_device_context(model_dir):
    """SGLang builds the model under its device context (a CUDA device on a GPU); the CPU experts are built in
    host memory whatever it is, and hold only their own experts (no host copy of the GPU-resident ones)."""
    with torch.device("meta"):  # stands in for the GPU's context on a machine without one
        layer = _build_layer(torch.float32, _ours(KTExpertsOptions(gpu_experts="3")))
    method = layer.quant_method
    assert layer.w13_weight.device.type == "meta" and layer.w13_weight.shape[0] == 3  # the context did apply
    cpu = method.cpu_experts
    assert cpu.gate_up_proj.device.type == "cpu" and cpu.down_proj.device.type == "cpu"
    assert cpu.gate_up_proj.shape[0] == E - 3 and cpu.total_experts == E
    assert cpu.rows_of(torch.tensor([method.cpu_ids])).tolist() == [list(range(E - 3))]


def test_chunked_prefill_and_cpu_threads(model_dir):
    gate, up, down = _random_experts(torch.float32)
    native = _build_layer(torch.float32)
    _load(native, gate, up, down)
    ours = _build_layer(torch.float32, _ours(KTExpertsOptions(gpu_experts="2", chunk_size=5, cpu_threads=2)))
    _load(ours, gate, up, down)
    x, topk = _routing(23, torch.float32)
    torch.testing.assert_close(ours(x.clone(), topk), native(x.clone(), topk), rtol=1e-5, atol=1e-5)


def test_missing_cpu_expert_is_named(model_dir):
    gate, up, down = _random_experts(torch.float32)
    ours = _build_layer(torch.float32, _ours(KTExpertsOptions(gpu_experts="2")))
    down[5] = float("nan")
    layer_params = ((ours.w13_weight, "w1", gate), (ours.w13_weight, "w3", up), (ours.w2_weight, "w2", down))
    for e in range(E):
        for param, shard, tensor in layer_params:
            if (e, shard) != (5, "w2"):
                param.weight_loader(
                    param, tensor[e], "model.layers.0.mlp.experts.w2_weight", shard_id=shard, expert_id=e
                )
    with pytest.raises(ValueError, match="expert 5 down_proj"):
        ours.quant_method.process_weights_after_loading(ours)


def _write_peft_adapter(path: Path, r: int, alpha: float, peft_version: str, swapped: bool, seed=2):
    """A PEFT adapter with expert LoRA on layer 0 as PEFT `peft_version` saves it (`swapped`: its factor layout is
    the one of PEFT >= 0.19); returns our-layout factors."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    factors = {
        "gate_up_A": torch.randn(E, r, H, generator=g) * 0.1,  # [E, r, H]
        "gate_up_B": torch.randn(E, 2 * I, r, generator=g) * 0.1,  # [E, 2I, r]
        "down_A": torch.randn(E, r, I, generator=g) * 0.1,  # [E, r, I]
        "down_B": torch.randn(E, H, r, generator=g) * 0.1,  # [E, H, r]
    }
    prefix = "base_model.model.model.layers.0.mlp.experts."
    state = {}
    # Nesting as PEFT (0.18 - 0.21) writes it for target_parameters=["gate_up_proj", "down_proj"].
    for param, nest in (("down_proj", ""), ("gate_up_proj", "base_layer.")):
        a, b = ("gate_up_A", "gate_up_B") if param == "gate_up_proj" else ("down_A", "down_B")
        lora_A, lora_B = expert_factors_to_peft(factors[a], factors[b], swapped=swapped)
        state[f"{prefix}{nest}lora_A.weight"] = lora_A.contiguous()
        state[f"{prefix}{nest}lora_B.weight"] = lora_B.contiguous()
    state["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(r, H)
    path.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        "target_modules": ["q_proj"],
        "target_parameters": ["gate_up_proj", "down_proj"],
        "peft_version": peft_version,  # as PEFT records it: the release whose factor layout the tensors above use
    }
    (path / "adapter_config.json").write_text(json.dumps(config))
    return factors


# H == 2I here: gate_up_proj's tensors have the same shapes in both layouts, only peft_version tells them apart.
@pytest.mark.parametrize(("peft_version", "swapped"), [("0.18.1", False), ("0.19.1", True)])
@pytest.mark.parametrize("gpu_experts", ["0", "3"], ids=["all-cpu", "first-3-gpu"])
def test_expert_lora_from_peft_adapter(model_dir, tmp_path, gpu_experts, peft_version, swapped):
    r, alpha = 4, 8.0
    factors = _write_peft_adapter(tmp_path / "adapter", r, alpha, peft_version, swapped)
    scaling = alpha / r
    gate, up, down = _random_experts(torch.float32)
    # Reference: SGLang's own method on the merged weights W + scaling * B @ A.
    gate_up_delta = scaling * factors["gate_up_B"] @ factors["gate_up_A"]  # [E, 2I, H]
    down_delta = scaling * factors["down_B"] @ factors["down_A"]  # [E, H, I]
    native = _build_layer(torch.float32)
    _load(native, gate + gate_up_delta[:, :I], up + gate_up_delta[:, I:], down + down_delta)
    options = KTExpertsOptions(gpu_experts=gpu_experts, lora_path=str(tmp_path / "adapter"))
    ours = _build_layer(torch.float32, _ours(options))
    _load(ours, gate, up, down)
    assert ours.quant_method.cpu_experts.lora is not None
    x, topk = _routing(9, torch.float32)
    torch.testing.assert_close(ours(x.clone(), topk), native(x.clone(), topk), rtol=1e-4, atol=1e-4)


def test_routing_is_recorded_per_layer(model_dir, tmp_path):
    from kt_plugins.sglang.routing import routing_recorder

    path = tmp_path / "routing.json"
    gate, up, down = _random_experts(torch.float32)
    ours = _build_layer(torch.float32, _ours(KTExpertsOptions(gpu_experts="2", record_routing=str(path))))
    _load(ours, gate, up, down)
    x, topk = _routing(9, torch.float32)
    ours(x, topk)
    routing_recorder(str(path)).write()
    counts = json.loads(path.read_text())["counts"]["0"]
    assert counts == torch.bincount(topk.topk_ids.long().flatten(), minlength=E).tolist()


def test_options_parse_and_validate(tmp_path):
    assert KTExpertsOptions(gpu_experts="3").gpu_expert_list(0, 8) == [0, 1, 2]
    assert KTExpertsOptions(gpu_experts="0.25").gpu_expert_list(0, 8) == [0, 1]
    assert KTExpertsOptions(gpu_expert_ids="6,1").gpu_expert_list(0, 8) == [1, 6]
    per_layer = tmp_path / "hot.json"
    per_layer.write_text(json.dumps({"0": [2, 3], "1": [7]}))
    options = KTExpertsOptions(gpu_expert_ids=str(per_layer))
    assert options.gpu_expert_list(1, 8) == [7] and options.gpu_expert_list(5, 8) == []
    assert KTExpertsOptions.from_env_value(options.to_env()) == options
    for bad in ({"gpu_experts": "1.5"}, {"gpu_experts": "-1"}, {"gpu_experts": "many"}, {"cpu_threads": 0}):
        with pytest.raises(ValueError, match="--kt-experts"):
            KTExpertsOptions(**bad)
    with pytest.raises(ValueError, match="out of range"):
        KTExpertsOptions(gpu_expert_ids="9").gpu_expert_list(0, 8)
    with pytest.raises(ValueError, match="unknown keys"):
        KTExpertsOptions.from_env_value('{"cpu_thread": 4}')


def _run(code: str, *args: str, timeout=600) -> subprocess.CompletedProcess:
    env_code = f"import sys; sys.path.insert(0, {str(HERE)!r})\n" + textwrap.dedent(code)
    return subprocess.run(
        [sys.executable, "-c", env_code, *args], capture_output=True, text=True, timeout=timeout, env=_clean_env()
    )


def _clean_env():
    import os

    env = dict(os.environ)
    env.pop(ENV_VAR, None)
    env.pop("SGLANG_PLUGINS", None)
    return env


def test_launch_server_help_lists_flags():
    result = _run(
        """
        import runpy, sys
        from sglang_cpu import install_torchvision_stubs
        install_torchvision_stubs()
        sys.argv = ["sglang.launch_server", "--help"]
        runpy.run_module("sglang.launch_server", run_name="__main__")
        """
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for flag in (
        "--kt-experts",
        "--kt-experts-cpu-threads",
        "--kt-experts-gpu-experts",
        "--kt-experts-gpu-expert-ids",
        "--kt-experts-kernel",
        "--kt-experts-chunk-size",
        "--kt-experts-lora",
    ):
        assert flag in result.stdout, f"{flag} missing from --help"
    assert "kt-plugins CPU experts" in result.stdout


SPAWN_ROUTE = """
    import json, multiprocessing as mp, os, sys
    from sglang_cpu import install_torchvision_stubs, write_model_config
    install_torchvision_stubs()
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import prepare_server_args

    model_dir = write_model_config(__import__("pathlib").Path(sys.argv[1]), num_experts=8, hidden=64,
                                   intermediate=32, top_k=2)
    load_plugins()  # as launch_server's __main__ does, before parsing
    assert "KT_SGLANG_EXPERTS" not in os.environ
    server_args = prepare_server_args(["--model-path", str(model_dir), "--device", "cpu", "--kt-experts",
        "--kt-experts-gpu-experts", "0.25", "--kt-experts-cpu-threads", "2", "--kt-experts-kernel", "auto",
        "--kt-experts-chunk-size", "16"])
    assert not hasattr(server_args, "kt_experts")  # SGLang's sealed record keeps only its own fields

    import sglang_cpu
    ctx = mp.get_context("spawn")  # how SGLang starts its schedulers
    queue = ctx.Queue()
    child = ctx.Process(target=sglang_cpu.build_layer_in_scheduler, args=(str(model_dir), queue))
    child.start()
    result = queue.get(timeout=600)
    child.join(timeout=60)
    print("RESULT " + json.dumps(result))
"""


def test_options_reach_spawned_scheduler_and_swap_the_method(tmp_path):
    result = _run(SPAWN_ROUTE, str(tmp_path / "model"))
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert result.returncode == 0 and lines, result.stdout[-2000:] + result.stderr[-4000:]
    report = json.loads(lines[-1][len("RESULT ") :])
    assert report.get("error") is None, report
    assert report["options"] == {
        "cpu_threads": 2,
        "gpu_expert_ids": None,
        "gpu_experts": "0.25",
        "kernel": "auto",
        "chunk_size": 16,
        "lora_path": None,
        "record_routing": None,
    }
    assert report["method"] == "KTExpertsMethod"
    assert report["is_sglang_kt_method"]  # SGLang's own isinstance special cases see it
    assert report["gpu_experts"] == 2 and report["cpu_experts"] == 6
    assert report["max_error"] < 1e-5


def test_bad_flags_fail_before_launch(tmp_path):
    result = _run(
        """
        import sys
        from pathlib import Path
        from sglang_cpu import install_torchvision_stubs, write_model_config
        install_torchvision_stubs()
        from sglang.srt.plugins import load_plugins
        from sglang.srt.server_args import prepare_server_args
        model = write_model_config(Path(sys.argv[1]), num_experts=8, hidden=64, intermediate=32, top_k=2)
        load_plugins()
        base = ["--model-path", str(model), "--device", "cpu", "--kt-experts"]
        for extra in (["--kt-weight-path", "/weights"], ["--kt-experts-gpu-experts", "2.5"]):
            try:
                prepare_server_args(base + extra)
            except ValueError as exc:
                print("ERROR", exc)
        """,
        str(tmp_path / "model"),
    )
    errors = [line for line in result.stdout.splitlines() if line.startswith("ERROR ")]
    assert len(errors) == 2, result.stdout[-2000:] + result.stderr[-3000:]
    assert "--kt-weight-path" in errors[0] and "ratio must lie in [0, 1)" in errors[1]
