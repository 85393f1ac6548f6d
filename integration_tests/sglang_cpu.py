"""Running SGLang's layers on a CPU-only test machine (test environment only, never the package).

- PyPI's torchvision is a CUDA build: its `_C` extension needs libtorch_cuda and fails to register its ops,
  after which `import torchvision` (pulled in by transformers / sglang) raises "operator torchvision::nms
  does not exist". Defining the two op schemas first lets the import through; nothing here calls them.
- SGLang's layers need a world-size-1 process group and a published ServerArgs even at TP 1.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch

_stub_library = None


def install_torchvision_stubs() -> None:
    """Defines torchvision::nms / qnms schemas so that the CUDA torchvision wheel imports on the CPU."""
    global _stub_library
    if _stub_library is not None:
        return
    try:
        torch.ops.torchvision.nms  # noqa: B018 - a working torchvision registered it already
        return
    except (AttributeError, RuntimeError):
        pass
    # FRAGMENT: another test module's stubs (LLaMA-Factory's) may have defined them in this process.
    library = torch.library.Library("torchvision", "FRAGMENT")
    for schema in (
        "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
        "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    ):
        with contextlib.suppress(RuntimeError):  # defined already
            library.define(schema)
    _stub_library = library


def write_model_config(directory: Path, *, num_experts: int, hidden: int, intermediate: int, top_k: int) -> Path:
    """Writes a tiny Qwen3-MoE config.json (ServerArgs resolves --model-path against it)."""
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "hidden_size": hidden,
        "moe_intermediate_size": intermediate,
        "intermediate_size": 2 * intermediate,
        "num_experts": num_experts,
        "num_experts_per_tok": top_k,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": hidden // 4,
        "vocab_size": 128,
        "max_position_embeddings": 256,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    }
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def init_sglang_cpu(model_dir: Path, port: int = 29643) -> None:
    """World-size-1 gloo group, model-parallel groups and a published ServerArgs for `model_dir`."""
    install_torchvision_stubs()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    from sglang.srt.distributed import parallel_state
    from sglang.srt.distributed.parallel_state import (
        init_distributed_environment,
        initialize_model_parallel,
        model_parallel_is_initialized,
    )
    from sglang.srt.runtime_context import SpawnRanks, get_parallel, publish, reset_context
    from sglang.srt.server_args import ServerArgs

    if not torch.distributed.is_initialized():
        init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo")
    if not model_parallel_is_initialized():
        reset_context()
        publish(ServerArgs(model_path=str(model_dir), device="cpu"), role="test", ranks=SpawnRanks(world_rank=0))
        if parallel_state._WORLD is not None:
            get_parallel().override_permanently(world_group=parallel_state._WORLD)
        initialize_model_parallel(backend="gloo")


def build_layer_in_scheduler(model_dir: str, queue) -> None:
    """Target of a `spawn`ed process standing in for an SGLang scheduler: loads the plugins as
    run_scheduler_process does, builds a FusedMoE on random weights and reports what it got."""
    import traceback

    try:
        install_torchvision_stubs()
        from sglang.srt.plugins import load_plugins

        load_plugins()
        from kt_plugins.sglang.options import options_from_env

        options = options_from_env()
        init_sglang_cpu(Path(model_dir), port=29657)
        from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE
        from sglang.srt.layers.moe.kt_ep_wrapper import KTEPWrapperMethod
        from sglang.srt.layers.moe.topk import StandardTopKOutput

        E, H, I, K, T = 8, 64, 32, 2, 11
        layer = FusedMoE(
            num_experts=E,
            hidden_size=H,
            intermediate_size=I,
            layer_id=0,
            top_k=K,
            params_dtype=torch.float32,
            prefix="model.layers.0.mlp.experts",
        )
        g = torch.Generator().manual_seed(0)
        gate, up = torch.randn(E, I, H, generator=g) / H**0.5, torch.randn(E, I, H, generator=g) / H**0.5
        down = torch.randn(E, H, I, generator=g) / I**0.5
        for e in range(E):
            for param, tensor, shard in (
                (layer.w13_weight, gate[e], "w1"),
                (layer.w13_weight, up[e], "w3"),
                (layer.w2_weight, down[e], "w2"),
            ):
                param.weight_loader(param, tensor, "experts.w13_weight", shard_id=shard, expert_id=e)
        layer.quant_method.process_weights_after_loading(layer)

        x = torch.randn(T, H, generator=g)  # [T, H]
        logits = torch.randn(T, E, generator=g)  # [T, E]
        weights, ids = torch.softmax(logits, dim=-1).topk(K, dim=-1)  # [T, K]
        out = layer(x.clone(), StandardTopKOutput(weights, ids.to(torch.int32), logits))
        reference = torch.zeros_like(x)
        for t in range(T):
            for k in range(K):
                e = int(ids[t, k])
                h = torch.nn.functional.silu(gate[e] @ x[t]) * (up[e] @ x[t])  # [I]
                reference[t] += weights[t, k] * (down[e] @ h)
        method = layer.quant_method
        queue.put(
            {
                "options": options.__dict__ if options else None,
                "method": type(method).__name__,
                "is_sglang_kt_method": isinstance(method, KTEPWrapperMethod),
                "gpu_experts": method.num_gpu_experts,
                "cpu_experts": len(getattr(method, "cpu_ids", [])),
                "max_error": float((out - reference).abs().max()),
            }
        )
    except Exception:
        queue.put({"error": traceback.format_exc()})
