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

Checkpoints: unquantized ones (SGLang's UnquantizedFusedMoEMethod: CPU experts in bf16 / fp32), and block-FP8
ones as DeepSeek-V3 ships them (SGLang's Fp8MoEMethod with weight_block_size, e.g. [128, 128]: e4m3 weights
with fp32 `weight_scale_inv` block scales). Those stay FP8 on both sides: SGLang's FP8 method over the GPU
experts, a KTExperts(dtype=torch.float8_e4m3fn) holding the CPU experts' e4m3 weights and block scales as shipped
(no bf16 copy in host RAM); the CPU operator takes bf16 / fp32 activations.

Host RAM: a packed kernel (amx_*, avx512_bf16_packed, avx512_vnni_*) packs the CPU experts at load into its own tile
layout, and serving reads only that copy, so the weights are then freed (KTExperts.release_host_weights): one copy of
the experts in host RAM, not two. `--kt-experts-keep-host-weights` keeps them.

Legend: T = tokens, K = experts per token, E = experts of the layer, H = hidden, I = expert intermediate.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
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
# What the checkpoint holds per (expert, shard): the weight, and for block-FP8 checkpoints its block scales.
WEIGHT, SCALE = "weight", "weight_scale_inv"
_ACTIVATION_DTYPES = (torch.float32, torch.bfloat16)  # what the CPU operator takes
_SUPPORTED = "unquantized (bf16 / fp16 / fp32) and block-quantized FP8 (DeepSeek-style weight_scale_inv) checkpoints"


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
        gpu_method: the method FusedMoE would have used: SGLang's unquantized one, or its Fp8MoEMethod for a
            block-FP8 checkpoint (the CPU experts then stay FP8 too).
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
        self._kinds: tuple[str, ...] = (WEIGHT,)  # the checkpoint tensors of each (expert, shard)
        self._pending: set | None = None  # {(expert, shard id, kind)} not yet received for the CPU experts
        self._halves: dict[tuple[int, str], tuple[str, torch.Tensor]] = {}  # fp8: the first of (weight, scale)
        self._halves_lock = threading.Lock()  # SGLang's loaders (DeepSeek's) call weight_loader from a thread pool
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
        """Creates the GPU experts' weights through `gpu_method` and the CPU experts' store.

        An unquantized checkpoint gives CPU experts in params_dtype (bf16 for other dtypes); a block-FP8 one,
        CPU experts in float8_e4m3fn with their block scales (gate_up_proj_scale_inv [N_cpu, 2 ceil(I / b0),
        ceil(H / b1)], down_proj_scale_inv [N_cpu, ceil(H / b0), ceil(I / b1)]).
        """
        where = f"--kt-experts (layer {self.kt_config.layer_idx})"
        fp8_block = _checkpoint_fp8_block(self.gpu_method, where)  # None: unquantized
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
        if fp8_block is not None and self.gpu_ids and self.options.lora_path:
            raise NotImplementedError(
                f"{where}: --kt-experts-lora merges the expert LoRA into GPU-resident experts, which are FP8 in this "
                "checkpoint (merging into e4m3 weights would be lossy); keep every expert on the CPU "
                "(--kt-experts-gpu-experts 0), where the CPU operator applies it unmerged"
            )
        self._kinds = (WEIGHT, SCALE) if fp8_block is not None else (WEIGHT,)

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
        if fp8_block is not None:  # kept as shipped: e4m3 weights and their block scales
            storage = {"dtype": torch.float8_e4m3fn, "weight_block_size": fp8_block}
        else:
            storage = {"dtype": params_dtype if params_dtype in _ACTIVATION_DTYPES else torch.bfloat16}
        with torch.device("cpu"):  # SGLang builds the model under a device context: the CPU experts stay in RAM
            self.cpu_experts = KTExperts(
                len(self.cpu_ids),
                hidden_size,
                intermediate_full,
                **storage,
                kernel=self.options.kernel,
                cpu_infer=self.options.cpu_threads,
                chunk_size=self.options.chunk_size,
                expert_ids=self.cpu_ids,
                total_experts=E,
            )
        if self.gpu_ids:
            self.gpu_share = SGLangGpuShare(self)
            self.cpu_experts.attach_gpu_share(self.gpu_share)
        self._pending = {(e, s, kind) for e in self.cpu_ids for s in _SHARDS for kind in self._kinds}
        self._halves = {}

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
        """Copies one checkpoint tensor of a CPU expert into the store.

        Args:
            loaded_weight: gate / up [I, H] or down [H, I] weight; for a block-FP8 checkpoint also its block
                scales (weight_scale_inv, [ceil(rows / b0), ceil(cols / b1)]), each in its own call, in either
                order and from any thread: a copy of the first of the pair is held until the other arrives.
            weight_name: SGLang's parameter name ("...experts.w13_weight", "...experts.w2_weight_scale_inv").
            shard_id: "w1" (gate), "w3" (up) or "w2" (down).
            expert: the logical expert id.
        """
        kind = self._tensor_kind(weight_name, shard_id, expert)
        if self.cpu_experts is None:
            return  # TP rank > 0: rank 0 computes the CPU experts
        row, proj = int(self.cpu_experts.host_rows[expert]), _SHARDS[shard_id]
        self._pending.discard((expert, shard_id, kind))
        if kind == WEIGHT and not self.cpu_experts.is_fp8:
            self.cpu_experts.load_expert_(row, **{proj: loaded_weight})
            return
        with self._halves_lock:
            held = self._halves.pop((expert, shard_id), None)
            if held is None or held[0] == kind:  # the first of the pair (a repeated one replaces it)
                # A copy: the loader's tensor may be a view of a buffer it reuses (SGLang's RunAI streamer).
                self._halves[(expert, shard_id)] = (kind, loaded_weight.detach().to("cpu", copy=True))
                return
        weight, scale = (loaded_weight, held[1]) if kind == WEIGHT else (held[1], loaded_weight)
        self.cpu_experts.load_expert_(row, **{proj: weight, f"{proj}_scale_inv": scale})

    def _tensor_kind(self, weight_name: str, shard_id: str, expert: int) -> str:
        """WEIGHT or SCALE for a checkpoint tensor of a CPU expert; anything else is refused."""
        name = str(weight_name)
        kind = SCALE if SCALE in name else WEIGHT if name.endswith("weight") else None
        if shard_id not in _SHARDS or kind not in self._kinds:
            expected = "gate / up / down weights" + (" and their weight_scale_inv" if SCALE in self._kinds else "")
            raise ValueError(
                f"--kt-experts (layer {self.kt_config.layer_idx}): cannot place checkpoint tensor {weight_name!r} "
                f"(shard {shard_id!r}) of expert {expert} on the CPU; expected {expected}"
            )
        return kind

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """Checks that every CPU expert was loaded, applies expert LoRA, then SGLang's GPU post-processing."""
        if self._pending:
            missing = sorted(self._pending)
            shown = ", ".join(f"expert {e} {_SHARDS[s]}_proj {kind}" for e, s, kind in missing[:6])
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
        if self.cpu_experts is not None:
            self._pack_cpu_experts()
        if self.cpu_experts is not None and torch.cuda.is_available() and getattr(layer, "top_k", None):
            # Pinned buffers now, before SGLang captures any CUDA graph (no pinning is allowed during a capture).
            arenas = _arenas(layer.hidden_size, layer.top_k, _activation_dtype(self.cpu_experts, self.params_dtype))
            self._stream_ordered = StreamOrderedForward(self.cpu_experts, arenas)
            _side_stream(torch.device("cuda", torch.cuda.current_device()))  # made outside captures as well

    def _pack_cpu_experts(self) -> None:
        """Builds (and packs) the CPU operator at load: a missing build stops the load, not a request or a CUDA graph
        capture, and no request pays for the packing. Then frees the weights a packed kernel no longer reads."""
        experts = self.cpu_experts
        if experts.packs_weights and not self.options.keep_host_weights:  # (builds the operator)
            released = experts.release_host_weights()
            logger.info(
                "--kt-experts layer %d: %s packed the CPU experts; their weights (%.2f GiB) are freed "
                "(--kt-experts-keep-host-weights keeps them)",
                self.kt_config.layer_idx,
                experts.kernel,
                released / 2**30,
            )

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
        x_in = x.to(_activation_dtype(self.cpu_experts, x.dtype))  # the operator's dtypes (a no-op for bf16 / fp32)
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
    # SGLang's method computes from its own (FP8 or not) GPU weights and never takes the host's: an FP8 KTExperts
    # may attach it.
    takes_fp8 = True

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


def _activation_dtype(cpu_experts: KTExperts, dtype: torch.dtype) -> torch.dtype:
    """The dtype in which activations of `dtype` go to the CPU operator: fp32 / bf16 as they come, others (fp16)
    in the weights' dtype, or bf16 for FP8 weights."""
    if dtype in _ACTIVATION_DTYPES:
        return dtype
    weights = cpu_experts.gate_up_proj.dtype
    return weights if weights in _ACTIVATION_DTYPES else torch.bfloat16


def _checkpoint_fp8_block(gpu_method, where: str) -> tuple[int, int] | None:
    """The FP8 quantization block (rows, columns) of the checkpoint behind SGLang's method; None if unquantized.

    Accepts SGLang's UnquantizedFusedMoEMethod and its Fp8MoEMethod on a block-quantized FP8-serialized checkpoint
    (DeepSeek-V3's: e4m3 weights with weight_scale_inv per 128x128 block). Attributes are read with getattr, as
    they may differ between SGLang releases.

    Raises:
        NotImplementedError: any other method or FP8 flavour (per-tensor scales, FP8 quantized at load from a
            bf16 checkpoint, MXFP8, FP4 experts), naming the layer and the method's class.
    """
    if isinstance(gpu_method, UnquantizedFusedMoEMethod):
        return None
    name = type(gpu_method).__name__
    if not _is_fp8_moe_method(gpu_method):
        raise NotImplementedError(f"{where}: only {_SUPPORTED} are supported, this model's experts use {name}")
    config = getattr(gpu_method, "quant_config", None)
    block = getattr(config, "weight_block_size", None) or getattr(gpu_method, "weight_block_size", None)
    why = None
    if getattr(gpu_method, "use_mxfp8", False) or getattr(config, "use_mxfp8", False):
        why = "MXFP8 (ue8m0 scales per 1x32)"
    elif getattr(gpu_method, "is_fp4_expert", False) or getattr(config, "is_fp4_experts", False):
        why = "FP4 experts"
    elif not getattr(config, "is_checkpoint_fp8_serialized", False):
        why = "FP8 quantized at load from an unquantized checkpoint (--quantization fp8)"
    elif not getattr(gpu_method, "block_quant", block is not None) or block is None:
        why = "per-tensor FP8 scales (no weight_block_size)"
    elif not _is_block_size(block):
        why = f"weight_block_size {block!r} (expected two positive sizes)"
    if why is not None:
        raise NotImplementedError(
            f"{where}: only {_SUPPORTED} are supported, this model's experts use {name} with {why}"
        )
    return int(block[0]), int(block[1])


def _is_fp8_moe_method(gpu_method) -> bool:
    try:
        from sglang.srt.layers.quantization.fp8 import Fp8MoEMethod
    except ImportError:  # an SGLang without it, or whose FP8 module does not import here
        return False
    return isinstance(gpu_method, Fp8MoEMethod)


def _is_block_size(block) -> bool:
    return (
        isinstance(block, (list, tuple))
        and len(block) == 2
        and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)
    )


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
