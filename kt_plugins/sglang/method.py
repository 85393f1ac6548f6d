"""KTExpertsMethod: SGLang's FusedMoE method with the routed experts on the CPU (kt_core.KTExperts).

One layer's experts are split by id: the GPU ones (the first N, or a chosen set) keep SGLang's own method
(`gpu_method`, over a compact [N_gpu, ...] weight tensor); the rest live in host memory in a KTExperts that
holds only them (`expert_ids`: no host copy of the GPU experts). The split runs in the layer, as in training:
SGLang's GPU method is attached to the KTExperts as its GPU share (`SGLangGpuShare`), the layer stages the
routing to the host, runs the CPU experts and adds both sides (kt_core/experts/bridge.py).

Weights come from the checkpoint SGLang loads (--model-path), with no conversion: the weight_loader that
FusedMoE hands to `create_weights` is wrapped; GPU experts go on to SGLang's loader under their compact
index, CPU experts are copied into the KTExperts store (full intermediate size, as only TP rank 0 computes
them; other ranks contribute zeros to the all-reduce, as with SGLang's KTransformers backend).

Legend: T = tokens, K = experts per token, E = experts of the layer, H = hidden, I = expert intermediate.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch
from sglang.srt.layers.moe.kt_ep_wrapper import KTEPWrapperMethod
from sglang.srt.layers.quantization.unquant import UnquantizedFusedMoEMethod

from kt_core import KTExperts, run_now
from kt_core.experts import PinnedArenas, StreamOrderedForward
from kt_plugins.sglang.options import KTExpertsOptions
from kt_plugins.sglang.routing import RoutingRecorder, routing_recorder

__all__ = ["CUDA_GRAPH_MESSAGE", "KTExpertsLayerConfig", "KTExpertsMethod"]

logger = logging.getLogger(__name__)

CUDA_GRAPH_MESSAGE = (
    "kt-plugins --kt-experts: a CUDA graph of {tokens} tokens is being captured, over the {max_tokens} tokens "
    "that the CPU experts serve stream-ordered. Capture smaller batches (--cuda-graph-max-bs) or relaunch with "
    "--disable-cuda-graph."
)
# Batches up to this many tokens (decode, and prefill up to SGLang's largest prefill graph: 8192 by default)
# take the stream-ordered path; larger ones wait for their routing on the host.
STREAM_ORDERED_MAX_TOKENS = 8192

_SHARDS = {"w1": "gate", "w3": "up", "w2": "down"}  # SGLang's shard ids -> KTExperts.load_expert_ keywords


@dataclass(frozen=True)
class KTExpertsLayerConfig:
    """What `create_kt_config_from_server_args` returns for one layer when --kt-experts is on."""

    layer_idx: int
    options: KTExpertsOptions


class KTExpertsMethod(KTEPWrapperMethod):
    """FusedMoE method: GPU experts through `gpu_method`, the others through kt_core on the CPU.

    A subclass of SGLang's KTEPWrapperMethod (whose name it replaces while --kt-experts is on), so that
    SGLang's `isinstance` special cases for that backend hold for this one; its constructor is not called,
    as it requires the kt_kernel package.

    Args:
        gpu_method: the method FusedMoE would have used (only the unquantized one is supported).
        kt_config: KTExpertsLayerConfig.
    """

    def __init__(self, gpu_method, kt_config):
        if not isinstance(kt_config, KTExpertsLayerConfig):
            raise TypeError(
                "kt-plugins replaces SGLang's KTransformers method while --kt-experts is on; got a "
                f"{type(kt_config).__name__} (from --kt-weight-path?). Use one CPU experts backend."
            )
        self.gpu_method = gpu_method
        self.kt_config = kt_config
        self.wrapper = None  # KTEPWrapperMethod's kt_kernel object; ours is `cpu_experts`
        self.options = kt_config.options
        self.num_gpu_experts = -1  # set in create_weights, when E is known
        self.override_num_local_experts = True
        self.tp_rank = _tp_rank()
        self.cpu_experts: KTExperts | None = None
        self.gpu_ids: list[int] = []
        self.cpu_ids: list[int] = []
        self.gpu_share: SGLangGpuShare | None = None
        self._pending: set | None = None
        self._stream_ordered: StreamOrderedForward | None = None  # the CPU experts' capturable path
        self._routing: torch.Tensor | None = None  # [E + 1] routing counts (--kt-experts-record-routing)
        self.params_dtype = torch.bfloat16  # set in create_weights

    # ---- weights -------------------------------------------------------------------------------------

    def create_weights(
        self,
        layer: torch.nn.Module,
        num_experts: int,
        hidden_size: int,
        intermediate_size_per_partition: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ):
        """Creates the GPU experts' weights through `gpu_method` and the CPU experts' store."""
        where = f"--kt-experts (layer {self.kt_config.layer_idx})"
        if not isinstance(self.gpu_method, UnquantizedFusedMoEMethod):
            raise NotImplementedError(
                f"{where}: only unquantized (bf16 / fp16 / fp32) checkpoints are supported, this model uses "
                f"{type(self.gpu_method).__name__}"
            )
        if getattr(layer, "moe_ep_size", 1) > 1:
            raise NotImplementedError(f"{where}: expert parallelism (--ep-size > 1) is not supported; use --tp-size")
        if extra_weight_attrs.get("with_bias"):
            raise NotImplementedError(f"{where}: expert biases are not supported by the CPU operator")
        runner = layer.moe_runner_config
        activation = getattr(runner, "activation", "silu")
        if activation != "silu" or not runner.is_gated or runner.gemm1_alpha is not None or runner.swiglu_limit:
            raise NotImplementedError(
                f"{where}: only SwiGLU experts (activation 'silu') are supported, got {activation!r}"
            )

        E = num_experts
        self.params_dtype = params_dtype
        self.gpu_ids = self.options.gpu_expert_list(self.kt_config.layer_idx, E)
        gpu_set = set(self.gpu_ids)
        self.cpu_ids = [e for e in range(E) if e not in gpu_set]
        gpu_index = torch.full((E,), -1, dtype=torch.int64)  # [E] logical id -> row of SGLang's GPU weights
        gpu_index[self.gpu_ids] = torch.arange(len(self.gpu_ids))
        self._gpu_index = gpu_index
        self.global_num_experts = E
        self.num_gpu_experts = len(self.gpu_ids)
        self.gpu_method.num_gpu_experts = self.num_gpu_experts

        sglang_loader = extra_weight_attrs["weight_loader"]
        extra_weight_attrs["weight_loader"] = self._wrap_weight_loader(sglang_loader, E)
        self.gpu_method.create_weights(
            layer=layer,
            num_experts=self.num_gpu_experts,
            hidden_size=hidden_size,
            intermediate_size_per_partition=intermediate_size_per_partition,
            params_dtype=params_dtype,
            **extra_weight_attrs,
        )
        if self.tp_rank != 0 or not self.cpu_ids:
            return
        intermediate_full = intermediate_size_per_partition * getattr(layer, "moe_tp_size", 1)
        dtype = params_dtype if params_dtype in (torch.float32, torch.bfloat16) else torch.bfloat16
        with torch.device("cpu"):  # SGLang builds the model under a device context: the CPU experts stay in RAM
            self.cpu_experts = KTExperts(
                len(self.cpu_ids),
                hidden_size,
                intermediate_full,
                dtype=dtype,
                kernel=self.options.kernel,
                cpu_infer=self.options.cpu_threads,
                chunk_size=self.options.chunk_size,
                expert_ids=self.cpu_ids,
                total_experts=E,
            )
        if self.gpu_ids:
            self.gpu_share = SGLangGpuShare(self)
            self.cpu_experts.attach_gpu_share(self.gpu_share)
        self._pending = {(e, s) for e in self.cpu_ids for s in _SHARDS}

    def _wrap_weight_loader(self, sglang_loader, num_experts: int):
        def weight_loader(param, loaded_weight, weight_name, shard_id=None, expert_id=None, *args, **kwargs):
            if expert_id is None or not 0 <= int(expert_id) < num_experts:
                # Fused all-expert tensors, fused shared experts: not a routed expert of ours.
                return sglang_loader(param, loaded_weight, weight_name, shard_id, expert_id, *args, **kwargs)
            expert = int(expert_id)
            row = int(self._gpu_index[expert])
            if row >= 0:
                return sglang_loader(param, loaded_weight, weight_name, shard_id, row, *args, **kwargs)
            self._load_cpu_expert(loaded_weight, weight_name, shard_id, expert)
            return True if kwargs.get("return_success") else None

        return weight_loader

    def _load_cpu_expert(self, loaded_weight: torch.Tensor, weight_name: str, shard_id: str, expert: int) -> None:
        if shard_id not in _SHARDS or not str(weight_name).endswith("weight"):
            raise ValueError(
                f"--kt-experts (layer {self.kt_config.layer_idx}): cannot place checkpoint tensor {weight_name!r} "
                f"(shard {shard_id!r}) of expert {expert} on the CPU; expected plain gate / up / down weights"
            )
        if self.cpu_experts is None:
            return  # TP rank > 0: rank 0 computes the CPU experts
        self.cpu_experts.load_expert_(int(self.cpu_experts.host_rows[expert]), **{_SHARDS[shard_id]: loaded_weight})
        self._pending.discard((expert, shard_id))

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """Checks that every CPU expert was loaded, applies expert LoRA, then SGLang's GPU post-processing."""
        if self._pending:
            missing = sorted(self._pending)
            shown = ", ".join(f"expert {e} {_SHARDS[s]}_proj" for e, s in missing[:6])
            raise ValueError(
                f"--kt-experts (layer {self.kt_config.layer_idx}): the checkpoint did not provide {len(missing)} CPU "
                f"expert tensors ({shown}{', ...' if len(missing) > 6 else ''})"
            )
        if self.options.lora_path:
            from kt_plugins.sglang.lora import apply_expert_lora

            apply_expert_lora(self, layer, self.options.lora_path)
        if self.num_gpu_experts > 0 and hasattr(self.gpu_method, "process_weights_after_loading"):
            self.gpu_method.process_weights_after_loading(layer)
        if self.options.record_routing and self.tp_rank == 0:  # counts made now: before any CUDA graph capture
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
            recorder = routing_recorder(self.options.record_routing)
            self._routing = recorder.counter(self.kt_config.layer_idx, self.global_num_experts, device)
        if self.cpu_experts is not None and torch.cuda.is_available() and getattr(layer, "top_k", None):
            # Pinned buffers now, before SGLang captures any CUDA graph (no pinning is allowed during a capture).
            arenas = _arenas(layer.hidden_size, layer.top_k, _activation_dtype(self.cpu_experts, self.params_dtype))
            self._stream_ordered = StreamOrderedForward(self.cpu_experts, arenas)
            self.cpu_experts.operator()  # the native operator now: a missing build stops the load, not a capture
            _side_stream(torch.device("cuda", torch.cuda.current_device()))  # made outside captures as well

    # ---- compute -------------------------------------------------------------------------------------

    def create_moe_runner(self, layer: torch.nn.Module, moe_runner_config):
        """Gives `gpu_method` a runner over the GPU experts only, without routed scaling.

        DeepSeek / GLM models multiply the experts' output by routed_scaling_factor themselves when the
        method is a KTEPWrapperMethod; a GPU runner that also applied it would scale its half twice.
        """
        self.moe_runner_config = moe_runner_config
        moe_runner_config.num_local_experts = self.num_gpu_experts  # as KTEPWrapperMethod does
        gpu_config = dataclasses.replace(moe_runner_config, routed_scaling_factor=None)
        if self.num_gpu_experts > 0:
            self.gpu_method.create_moe_runner(layer, gpu_config)
        else:
            self.gpu_method.moe_runner_config = gpu_config

    def apply(self, layer: torch.nn.Module, dispatch_output):
        """Both halves of the layer's routed experts.

        Args:
            layer: the FusedMoE layer.
            dispatch_output: StandardDispatchOutput; hidden_states [T, H], topk_output.topk_ids /
                topk_weights [T, K].

        Returns:
            StandardCombineInput with hidden_states [T, H].
        """
        from sglang.srt.layers.moe.token_dispatcher import StandardCombineInput

        x = dispatch_output.hidden_states  # [T, H]
        topk_output = dispatch_output.topk_output
        if not hasattr(topk_output, "topk_ids"):
            raise NotImplementedError(
                f"--kt-experts: routing output {type(topk_output).__name__} is not supported; use the default "
                "--moe-runner-backend"
            )
        if self._routing is not None:
            RoutingRecorder.record(self._routing, topk_output.topk_ids)
        if self.cpu_experts is None:  # no CPU experts on this rank: SGLang's method alone
            if self.num_gpu_experts == 0:
                return StandardCombineInput(hidden_states=torch.zeros_like(x))
            return StandardCombineInput(hidden_states=self._gpu_apply(layer, dispatch_output))
        ids, weights = topk_output.topk_ids, topk_output.topk_weights  # [T, K], [T, K]
        cpu_dtype = self.cpu_experts.gate_up_proj.dtype
        x_in = x if x.dtype in (torch.float32, torch.bfloat16) else x.to(cpu_dtype)  # the operator's dtypes
        if x.is_cuda and 0 < x.shape[0] <= STREAM_ORDERED_MAX_TOKENS:
            return StandardCombineInput(hidden_states=self._apply_stream_ordered(layer, dispatch_output, x_in))
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(CUDA_GRAPH_MESSAGE.format(tokens=x.shape[0], max_tokens=STREAM_ORDERED_MAX_TOKENS))
        if self.gpu_share is not None:
            self.gpu_share.current = (layer, dispatch_output)
        try:
            out = self.cpu_experts(x_in, ids, weights)  # [T, H]: the CPU experts, plus the GPU share's
        finally:
            if self.gpu_share is not None:
                self.gpu_share.current = None
        return StandardCombineInput(hidden_states=out.to(x.dtype))

    def _apply_stream_ordered(self, layer, dispatch_output, x: torch.Tensor) -> torch.Tensor:
        """Both halves without a host wait (decode, CUDA graphs): the CPU experts' work enqueued on a side stream
        (kt_core/experts/stream_ordered.py) while SGLang's GPU experts run on the current one; [T, H] in x's
        dtype on the current stream."""
        topk_output = dispatch_output.topk_output
        ids, weights = topk_output.topk_ids, topk_output.topk_weights  # [T, K], [T, K]
        if self._stream_ordered is None:
            self._stream_ordered = StreamOrderedForward(self.cpu_experts, _arenas(x.shape[1], ids.shape[1], x.dtype))
        main = torch.cuda.current_stream(x.device)
        out = torch.empty_like(x)  # on the current stream, which waits below for the side stream to fill it
        if self.num_gpu_experts == 0:
            return self._stream_ordered(x, ids, weights, out)
        side = _side_stream(x.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            self._stream_ordered(x, ids, weights, out)
        gpu = self._gpu_apply(layer, dispatch_output)  # [T, H], meanwhile on the current stream
        main.wait_stream(side)
        return out.add_(gpu.to(out.dtype)).to(dispatch_output.hidden_states.dtype)

    def _gpu_apply(self, layer, dispatch_output) -> torch.Tensor:
        """SGLang's method over the GPU experts only (the other slots masked), [T, H] in x's dtype."""
        topk_output = dispatch_output.topk_output
        ids, weights = topk_output.topk_ids, topk_output.topk_weights
        valid = ids >= 0
        rows = self._gpu_index_on(ids.device)[ids.long().clamp(min=0)]  # [T, K], -1 for CPU experts
        rows = torch.where(valid, rows, -1)
        if ids.is_cuda:
            rows = rows.to(ids.dtype)
        else:
            rows, weights = _fill_skipped_slots(rows, weights, self.num_gpu_experts, ids.dtype)
        masked = dispatch_output._replace(topk_output=topk_output._replace(topk_ids=rows, topk_weights=weights))
        return self.gpu_method.apply(layer, masked).hidden_states

    def _gpu_index_on(self, device: torch.device) -> torch.Tensor:
        if self._gpu_index.device != device:
            self._gpu_index = self._gpu_index.to(device)
        return self._gpu_index

    def __repr__(self) -> str:
        return (
            f"KTExpertsMethod(layer={self.kt_config.layer_idx}, gpu_experts={self.num_gpu_experts}, "
            f"cpu_experts={len(self.cpu_ids)}, kernel={getattr(self.cpu_experts, 'kernel', None)})"
        )


class SGLangGpuShare:
    """The GPU share of a `--kt-experts` layer: SGLang's own method over the GPU experts (serving only)."""

    def __init__(self, method: KTExpertsMethod):
        self.method = method
        self.device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        self.current = None  # (layer, dispatch_output) of the call in progress, set by KTExpertsMethod.apply

    def begin(self, ids: torch.Tensor, phase: str) -> SGLangGpuShare:
        if phase != "fwd":
            raise NotImplementedError("--kt-experts: SGLang's GPU experts serve; they have no backward")
        self.device = ids.device
        return self

    # The GpuCall of every call: a fixed set of GPU experts, routed on the device by SGLang's method.
    covers_all = False
    weight_sets = None

    @property
    def experts(self) -> list[int]:
        return self.method.gpu_ids

    def forward(self, x, ids, w, parts, lora_dev, *, keep: bool) -> torch.Tensor:
        layer, dispatch_output = self.current
        return self.method._gpu_apply(layer, dispatch_output).float()

    def backward(self, *args):
        raise NotImplementedError("--kt-experts: SGLang's GPU experts serve; they have no backward")

    def submit_cpu(self, fn, *, slots: int):
        return run_now(fn)

    def end(self) -> None:
        pass


_ARENAS: dict[tuple, PinnedArenas] = {}  # (H, K, dtype) -> the pinned buffers shared by the model's layers
_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _arenas(hidden: int, top_k: int, dtype: torch.dtype) -> PinnedArenas:
    key = (hidden, top_k, dtype)
    if key not in _ARENAS:
        _ARENAS[key] = PinnedArenas(*key, max_tokens=STREAM_ORDERED_MAX_TOKENS)
        _ARENAS[key].for_tokens(STREAM_ORDERED_MAX_TOKENS)  # all of it at once: no capture finds it too small
    return _ARENAS[key]


def _activation_dtype(cpu_experts: KTExperts, params_dtype: torch.dtype) -> torch.dtype:
    # As apply() hands activations to the operator: fp32 / bf16 as they come, others in the weights' dtype.
    return params_dtype if params_dtype in (torch.float32, torch.bfloat16) else cpu_experts.gate_up_proj.dtype


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


def _tp_rank() -> int:
    try:  # sglang >= 0.5.16
        from sglang.srt.runtime_context import get_parallel
    except ImportError:
        from sglang.srt.distributed import get_tensor_model_parallel_rank

        return get_tensor_model_parallel_rank()
    return get_parallel().tp_rank


def _fill_skipped_slots(rows: torch.Tensor, weights: torch.Tensor, num_rows: int, dtype: torch.dtype):
    """Routing for SGLang's torch-native experts (no CUDA), which cannot skip -1 slots.

    Each skipped slot is pointed at a GPU row that its token does not use otherwise, with weight 0
    (the native code counts tokens per expert with `scatter_`, so a row repeated within a token is lost).

    Args:
        rows: [T, K] GPU rows, -1 for slots computed elsewhere.
        weights: [T, K].
        num_rows: GPU experts of the layer.

    Returns:
        ([T, K] rows without -1, [T, K] weights with 0 on the filled slots).
    """
    T, K = rows.shape
    if num_rows < K:
        raise NotImplementedError(
            f"--kt-experts without CUDA: SGLang's torch-native experts need at least top-k = {K} GPU experts "
            f"(or none), got {num_rows}"
        )
    on_gpu = rows >= 0  # [T, K]
    used = torch.zeros(T, num_rows, dtype=torch.long).scatter_add_(1, rows.clamp(min=0), on_gpu.long()) > 0
    free = torch.argsort(used.to(torch.int8), dim=1, stable=True)  # [T, num_rows], unused rows first
    nth_skipped = (torch.cumsum((~on_gpu).long(), dim=1) - 1).clamp(min=0)  # [T, K]
    filler = free.gather(1, nth_skipped)
    return torch.where(on_gpu, rows, filler).to(dtype), torch.where(on_gpu, weights, torch.zeros_like(weights))
