"""KTExperts: a drop-in replacement for the `*Experts` modules of transformers >= 5 that runs on the CPU.

Same call as Hugging Face's experts modules: `experts(hidden_states [T, H], top_k_index [T, K],
top_k_weights [T, K]) -> [T, H]`. The routed-expert weights stay in host memory whatever `model.to()` is
asked for; activations may live on a GPU, in which case they travel through pinned host buffers and the
result comes back on the input's device.

Where an expert runs: on the CPU, unless a GPU share is attached (`attach_gpu_share`: streaming, or a
serving engine's own GPU experts), which decides at each call which experts the GPU computes; the layer
splits the slots, runs both sides and adds them up (kt_core/experts/bridge.py).

Legend: T = tokens, K = experts per token, E = experts, H = hidden, I = expert intermediate, r = LoRA rank.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import nn

from kt_core import kernels
from kt_core.experts.bridge import ExpertsFunction
from kt_core.experts.share import GpuShare
from kt_core.lora import ExpertLoRA

__all__ = ["KTExperts"]

_SUPPORTED_ACTIVATIONS = ("silu", "swish")
FP8 = torch.float8_e4m3fn
_WEIGHT_DTYPES = (torch.bfloat16, torch.float32, FP8)


class KTExperts(nn.Module):
    """One MoE layer's routed experts, computed by the CPU operator.

    Args:
        num_experts: E.
        hidden_size: H.
        intermediate_size: I (per expert).
        dtype: weight dtype in host memory: torch.bfloat16, torch.float32, or torch.float8_e4m3fn for experts kept
            block-quantized as DeepSeek-V3 / Kimi ship them (half of bf16's host RAM; the weights gain fp32 block
            scales `gate_up_proj_scale_inv` / `down_proj_scale_inv`, and run on `kernels.fp8_kernels()`, which
            convert them in registers: the result is that of the fp32-dequantized weights).
        weight_block_size: the fp8 quantization block (rows, columns), as the checkpoint's quantization_config.
        kernel: "auto" (best this CPU runs, or the KT_KERNEL environment variable), or a name from
            `kt_core.kernels.available_kernels()`, or "torch" for the plain-torch reference.
        cpu_infer: CPU threads of the shared pool; None keeps the pool's current size.
        lora_rank: when > 0, per-expert LoRA on gate_up and down with this rank.
        lora_alpha: LoRA alpha (defaults to 2 * lora_rank).
        hidden_act: the experts' activation; only SwiGLU ("silu") is implemented.
        chunk_size: tokens per call into the C++ operator (None: the whole batch at once).
        pack_cache: folder caching the packed (and quantized) weights of packed kernels across loads;
            None reads the KT_PACK_CACHE environment variable (unset: no cache).
        pack_cache_key: label of this layer's cache file (e.g. checkpoint and layer name); the file's key
            also covers kernel, dtype, shapes and a fingerprint of the weights.
        expert_ids: the layer's expert ids whose weights these `num_experts` rows hold, in row order, when
            host memory holds only some experts (the others are computed by an attached GPU share);
            None: all of them, expert e in row e.
        total_experts: the layer's number of experts when `expert_ids` is given.
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        *,
        dtype: torch.dtype = torch.bfloat16,
        weight_block_size: Sequence[int] = (128, 128),
        kernel: str = "auto",
        cpu_infer: int | None = None,
        lora_rank: int = 0,
        lora_alpha: float | None = None,
        hidden_act: str = "silu",
        chunk_size: int | None = None,
        pack_cache: str | os.PathLike | None = None,
        pack_cache_key: str | None = None,
        expert_ids: Sequence[int] | None = None,
        total_experts: int | None = None,
    ):
        super().__init__()
        if chunk_size is not None and (type(chunk_size) is not int or chunk_size <= 0):
            raise ValueError(
                f"KTExperts: chunk_size must be a positive number of tokens per CPU call (or None: the whole "
                f"batch at once), got {chunk_size!r}"
            )
        if dtype not in _WEIGHT_DTYPES:
            raise ValueError(
                f"KTExperts: weight dtype must be torch.bfloat16, torch.float32 or torch.float8_e4m3fn, got {dtype}"
            )
        block = tuple(int(b) for b in weight_block_size)
        if len(block) != 2 or min(block) <= 0:
            raise ValueError(f"KTExperts: weight_block_size must be two positive sizes, got {weight_block_size!r}")
        if hidden_act not in _SUPPORTED_ACTIVATIONS:
            raise ValueError(
                f"KTExperts: activation {hidden_act!r} is not supported (expected one of {_SUPPORTED_ACTIVATIONS})"
            )
        self.num_experts = num_experts
        self.hidden_dim = hidden_size
        self.intermediate_dim = intermediate_size
        self.kernel = kernels.resolve_kernel(kernel, dtype)
        self.weight_block_size = block
        self.cpu_infer = cpu_infer
        # Tokens per call into the C++ operator (None: the whole batch at once); bounds scratch memory.
        self.chunk_size = chunk_size
        # Folder of saved packed weights (None: the KT_PACK_CACHE environment variable, else off), and a label
        # (checkpoint and layer name) for this layer's file there; see kt_core/runtime/pack_cache.py.
        self.pack_cache = pack_cache
        self.pack_cache_key = pack_cache_key
        E, H, I = num_experts, hidden_size, intermediate_size
        # Frozen base weights, named as in transformers so that state dicts line up.
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, H, dtype=dtype), requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(E, H, I, dtype=dtype), requires_grad=False)
        if dtype == FP8:  # the block scales (weight_scale_inv), named as transformers' FP8 experts name them
            self.gate_up_proj_scale_inv = nn.Parameter(
                torch.ones(self.fp8_scale_shape("gate_up_proj")), requires_grad=False
            )
            self.down_proj_scale_inv = nn.Parameter(torch.ones(self.fp8_scale_shape("down_proj")), requires_grad=False)
        self.lora: ExpertLoRA | None = None
        # False while the adapter is switched off (PEFT's `with model.disable_adapter():`): base experts only.
        self.lora_enabled = True
        # Logical expert id -> row of the host weights (-1: computed elsewhere); None when row e is expert e.
        self.total_experts = num_experts
        self.host_rows: torch.Tensor | None = None
        if expert_ids is not None:
            self._set_expert_ids(list(expert_ids), total_experts)
        # The C++ operator over these weights, and the (kernel, weight pointers) it was built for: see operator().
        self._op = None
        self._op_key: tuple | None = None
        self._packed_source = None  # what holds the tiles `_op` borrows, if it borrows them (use_operator)
        self._weights_released = False  # release_host_weights: the weights are meta tensors, `_op` reads its tiles
        # Forward-only use (chat, serving): the first forward the packed copy computes frees the weights
        # (kernels.experts_forward calls release_host_weights); set by the LLaMA-Factory plugin for inference.
        self.release_after_packing = False
        # The GPU side of the split (None: every expert on the CPU); not a submodule, not in the state dict.
        self.gpu_share: GpuShare | None = None
        if lora_rank:
            self.add_lora(lora_rank, lora_alpha if lora_alpha is not None else 2 * lora_rank)

    # ---- construction -------------------------------------------------------------------------------

    @property
    def is_fp8(self) -> bool:
        """Whether the weights are kept block-quantized (float8_e4m3fn with fp32 block scales)."""
        return self.gate_up_proj.dtype == FP8

    def fp8_scale_shape(self, name: str) -> tuple[int, int, int]:
        """Shape of the block scales of `name` ("gate_up_proj" or "down_proj"): gate_up [E, 2 ceil(I / b0),
        ceil(H / b1)] (gate's block rows, then up's: the checkpoint quantizes them apart), down [E, ceil(H / b0),
        ceil(I / b1)]."""
        from kt_core.loading.fp8 import expert_scale_shapes

        shapes = expert_scale_shapes(self.num_experts, self.hidden_dim, self.intermediate_dim, self.weight_block_size)
        return shapes[0] if name == "gate_up_proj" else shapes[1]

    def reference_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up_proj, down_proj) as the plain-torch reference takes them: the weights, or for fp8 weights their
        fp32 dequantization (made per call)."""
        if not self.is_fp8:
            return self.gate_up_proj, self.down_proj
        from kt_core.loading.fp8 import dequantize_experts_fp8

        return dequantize_experts_fp8(
            self.gate_up_proj,
            self.gate_up_proj_scale_inv,
            self.down_proj,
            self.down_proj_scale_inv,
            self.weight_block_size,
            torch.float32,
        )

    @classmethod
    def from_tensors(
        cls,
        gate_up_proj: torch.Tensor,
        down_proj: torch.Tensor,
        *,
        gate_up_proj_scale_inv: torch.Tensor | None = None,
        down_proj_scale_inv: torch.Tensor | None = None,
        **kwargs,
    ) -> KTExperts:
        """Builds the module around existing weights (shared, not copied, when already CPU-contiguous).

        Args:
            gate_up_proj: [E, 2I, H], gate rows first.
            down_proj: [E, H, I].
            gate_up_proj_scale_inv, down_proj_scale_inv: the block scales of fp8 weights (shapes as
                `fp8_scale_shape`), required with them. fp8 weights are kept as fp8 unless `dtype` says otherwise
                (then dequantized); bf16 / fp32 weights with dtype=torch.float8_e4m3fn are quantized as DeepSeek's
                release quantizes (per expert, gate and up apart).
            **kwargs: as for the constructor (dtype, weight_block_size, kernel, cpu_infer, lora_rank, ...).
        """
        if gate_up_proj.dim() != 3 or down_proj.dim() != 3:
            raise ValueError(
                "KTExperts.from_tensors: expected gate_up_proj [E, 2I, H] and down_proj [E, H, I], got "
                f"{tuple(gate_up_proj.shape)} and {tuple(down_proj.shape)}"
            )
        E, two_I, H = gate_up_proj.shape
        if two_I % 2 or tuple(down_proj.shape) != (E, H, two_I // 2):
            raise ValueError(
                f"KTExperts.from_tensors: down_proj must be [E, H, I] = [{E}, {H}, {two_I // 2}] to match "
                f"gate_up_proj {tuple(gate_up_proj.shape)}, got {tuple(down_proj.shape)}"
            )
        kwargs.setdefault("dtype", gate_up_proj.dtype)
        module = cls.__new__(cls)
        cls.__init__(module, E, H, two_I // 2, **kwargs)
        dtype, block = module.gate_up_proj.dtype, module.weight_block_size
        from kt_core.loading.fp8 import dequantize_experts_fp8, quantize_experts_fp8

        scales = None
        if gate_up_proj.dtype == FP8 or down_proj.dtype == FP8:
            if gate_up_proj.dtype != down_proj.dtype or gate_up_proj_scale_inv is None or down_proj_scale_inv is None:
                raise ValueError(
                    "KTExperts.from_tensors: fp8 weights need both gate_up_proj and down_proj as fp8 with their "
                    "gate_up_proj_scale_inv and down_proj_scale_inv"
                )
            scales = (gate_up_proj_scale_inv.detach().cpu(), down_proj_scale_inv.detach().cpu())
            if dtype != FP8:
                gate_up_proj, down_proj = dequantize_experts_fp8(
                    gate_up_proj.detach().cpu(), scales[0], down_proj.detach().cpu(), scales[1], block, dtype
                )
        elif dtype == FP8:
            q_gu, s_gu, q_d, s_d = quantize_experts_fp8(gate_up_proj.detach().cpu(), down_proj.detach().cpu(), block)
            gate_up_proj, down_proj, scales = q_gu, q_d, (s_gu, s_d)
        module.gate_up_proj = nn.Parameter(_host_contiguous(gate_up_proj, dtype), requires_grad=False)
        module.down_proj = nn.Parameter(_host_contiguous(down_proj, dtype), requires_grad=False)
        if dtype == FP8:
            for name, scale in zip(("gate_up_proj", "down_proj"), scales, strict=True):
                if tuple(scale.shape) != module.fp8_scale_shape(name):
                    raise ValueError(
                        f"KTExperts.from_tensors: {name}_scale_inv has shape {tuple(scale.shape)}, expected "
                        f"{module.fp8_scale_shape(name)} for {block} blocks"
                    )
                param = nn.Parameter(_host_contiguous(scale, torch.float32), requires_grad=False)
                setattr(module, f"{name}_scale_inv", param)
        return module

    @classmethod
    def from_module(cls, experts: nn.Module, **kwargs) -> KTExperts:
        """Converts a transformers `*Experts` module (fused gate_up_proj / down_proj parameters).

        Args:
            experts: e.g. Qwen3MoeExperts, DeepseekV3NaiveMoe, MixtralExperts.
            **kwargs: as for the constructor.
        """
        for name in ("gate_up_proj", "down_proj"):
            if not isinstance(getattr(experts, name, None), torch.Tensor):
                raise TypeError(
                    f"KTExperts.from_module: {type(experts).__name__} has no fused `{name}` parameter; "
                    "expected a transformers >= 5 experts module (gate_up_proj [E, 2I, H], down_proj [E, H, I])"
                )
        if getattr(experts, "has_bias", False) or getattr(experts, "is_transposed", False):
            raise ValueError(
                f"KTExperts.from_module: {type(experts).__name__} uses biases or transposed weights, "
                "which the CPU operator does not implement"
            )
        act = getattr(getattr(experts, "config", None), "hidden_act", None)
        if act is not None:
            kwargs.setdefault("hidden_act", act)
        for name in ("gate_up_proj_scale_inv", "down_proj_scale_inv"):  # transformers' FP8 experts
            if isinstance(getattr(experts, name, None), torch.Tensor):
                kwargs.setdefault(name, getattr(experts, name).detach())
        return cls.from_tensors(experts.gate_up_proj.detach(), experts.down_proj.detach(), **kwargs)

    def add_lora(self, rank: int, alpha: float) -> ExpertLoRA:
        """Attaches fresh expert LoRA factors (B = 0, so the output is unchanged until trained)."""
        self.lora = ExpertLoRA(self.num_experts, self.hidden_dim, self.intermediate_dim, rank=rank, alpha=alpha)
        return self.lora

    def _set_expert_ids(self, expert_ids: list[int], total_experts: int | None) -> None:
        if len(expert_ids) != self.num_experts or len(set(expert_ids)) != len(expert_ids):
            raise ValueError(
                f"KTExperts: expert_ids must list {self.num_experts} distinct expert ids (one per row), got "
                f"{len(expert_ids)}"
            )
        total = total_experts if total_experts is not None else max(expert_ids, default=-1) + 1
        if any(not 0 <= e < total for e in expert_ids):
            raise ValueError(f"KTExperts: expert_ids must lie in [0, total_experts={total}), got {expert_ids}")
        self.total_experts = total
        rows = torch.full((total + 1,), -1, dtype=torch.int64)  # rows[-1] = rows[total]: id -1 stays -1
        rows[torch.tensor(expert_ids, dtype=torch.int64)] = torch.arange(len(expert_ids))
        self.host_rows = rows

    def rows_of(self, ids: torch.Tensor, *, strict: bool = False) -> torch.Tensor:
        """Expert ids [T, K] (host, int64, -1 = skip) -> rows of the host weights.

        With `strict`, an id whose weights are not in host memory is an error (no GPU share computes it).
        """
        if self.host_rows is None:
            return ids
        if bool(((ids < -1) | (ids >= self.total_experts)).any()):
            kernels.check_expert_ids(ids, self.total_experts)
        rows = self.host_rows[ids]
        if strict and bool(((rows < 0) & (ids >= 0)).any()):
            missing = sorted(set(ids[(rows < 0) & (ids >= 0)].tolist()))
            raise ValueError(
                f"KTExperts: experts {missing[:8]} were routed to but their weights are not in host memory and no "
                "GPU share is attached to compute them"
            )
        return rows

    def attach_gpu_share(self, share: GpuShare) -> None:
        """Lets `share` compute some experts on a GPU from now on (see kt_core/experts/share.py).

        fp8 weights take a share that dequantizes them itself (`takes_fp8`: streaming's StreamedShare)."""
        if self.host_weights_released and getattr(share, "reads_host_weights", False):
            raise ValueError(
                f"KTExperts: {type(share).__name__} copies the host weights to the GPU, and this layer released them "
                "once packed (release_host_weights); restore_host_weights() gives them back"
            )
        if self.is_fp8 and not getattr(share, "takes_fp8", False):
            raise NotImplementedError(
                f"KTExperts: fp8 expert weights need a GPU share that dequantizes them ({type(share).__name__} takes "
                "bf16 / fp32 weights); stream them with kt_core.enable_streaming, or keep this layer's experts in bf16"
            )
        if self.gpu_share is not None and self.gpu_share is not share:
            raise RuntimeError(
                f"KTExperts: a GPU share ({type(self.gpu_share).__name__}) is already attached; detach it first"
            )
        self.gpu_share = share

    def detach_gpu_share(self) -> None:
        """Back to every expert on the CPU."""
        self.gpu_share = None

    @property
    def packs_weights(self) -> bool:
        """Whether the kernel computes from a packed copy of its own (built, and packed, now if need be): the layer can
        then release its host weights (`release_host_weights`)."""
        return self.kernel != kernels.TORCH_KERNEL and self.operator().packs

    def packed_operator(self):
        """The CPU operator when it is built over the current weights and computes from a packed copy of its own
        (kt_core.streaming.tiles reads that copy); None otherwise. Builds nothing."""
        if self.kernel == kernels.TORCH_KERNEL or self._op is None or self._op_key != self._operator_key():
            return None
        return self._op if self._op.packs else None

    def pending_pack_bytes(self) -> int:
        """Host bytes that building the operator now would allocate for its packed copy: 0 when it is built over the
        weights as they are, or when the kernel computes from the weights themselves."""
        if self.kernel == kernels.TORCH_KERNEL or self._op_key == self._operator_key():
            return 0
        return sum(nbytes for _, nbytes in kernels.new_operator(self).packed_layout())

    @property
    def host_weights_released(self) -> bool:
        """Whether `release_host_weights` freed the weights (the packed kernel's copy is all that is left)."""
        return self._weights_released

    def release_host_weights(self) -> int:
        """Frees the experts' weights in host memory, keeping only the packed kernel's copy.

        A packed kernel (amx_*, avx512_bf16_packed, avx512_vnni_*) computes from its own copy of the weights in its
        tile layout, made once at load, so the weights themselves are a second copy: releasing them halves the
        layer's host RAM (bf16 and fp8 alike; the quantized int8 / int4 copies are smaller still). The layer is
        packed now if it was not. The forward is bit for bit the same, and so is the backward of the bf16-format
        kernels (amx_bf16, avx512_bf16_packed) with bf16 activations, which reads the forward's tiles: training
        works. Afterwards `gate_up_proj` / `down_proj` are meta tensors (shape and dtype kept, no data; fp8 block
        scales are kept, a few KB), and what needs the weights raises, naming this call: calls off the packed path
        (fp32 activations on a bf16 format, the exact backward of the int8 / int4 kernels), loading weights in
        (`load_expert_`), another kernel, streaming them to a GPU. `restore_host_weights()` gives them back; merging
        the expert LoRA does so itself. The memory is returned when nothing else holds the tensors.

        Returns:
            Bytes of the weights released (0 when they already were).

        Raises:
            ValueError: the kernel computes from the weights themselves (unpacked kernels, "torch").
        """
        if self.host_weights_released:
            return 0
        if self.gpu_share is not None and getattr(self.gpu_share, "reads_host_weights", False):
            raise ValueError(
                f"KTExperts.release_host_weights: the attached GPU share ({type(self.gpu_share).__name__}) copies "
                "these weights to the GPU; release only layers whose experts the CPU computes"
            )
        if not self.packs_weights:
            raise ValueError(
                f"KTExperts.release_host_weights: kernel {self.kernel!r} computes from the weights themselves "
                f"({self.gate_up_proj.dtype}), so they must stay; the packed kernels (amx_*, avx512_bf16_packed, "
                "avx512_vnni_*) keep a copy of their own"
            )
        self._op.release_weights()
        released = 0
        for name in ("gate_up_proj", "down_proj"):
            weight = getattr(self, name)
            released += weight.numel() * weight.element_size()
            self._set_weight(name, torch.empty(weight.shape, dtype=weight.dtype, device="meta"))
        self._weights_released = True
        self._op_key = self._operator_key()
        return released

    def restore_host_weights(self) -> int:
        """Gives the weights back after `release_host_weights`, written from the packed copy (exact: the bf16 and
        fp8 packed formats keep every bit), and the operator reads them from there on without packing again.

        Returns:
            Bytes of the weights restored (0 when they were not released).

        Raises:
            RuntimeError: the packed copy is quantized (int8 / int4 kernels): the weights cannot be recovered from it.
        """
        if not self.host_weights_released:
            return 0
        gate_up = torch.empty(self.gate_up_proj.shape, dtype=self.gate_up_proj.dtype)
        down = torch.empty(self.down_proj.shape, dtype=self.down_proj.dtype)
        try:
            self._op.unpack_weights(kernels.get_thread_pool(self.cpu_infer), gate_up.data_ptr(), down.data_ptr(), True)
        except RuntimeError as exc:
            raise RuntimeError(
                f"KTExperts.restore_host_weights: kernel {self.kernel!r} keeps a quantized copy, from which the "
                "released weights cannot be recovered; load the layer again"
            ) from exc
        self._set_weight("gate_up_proj", gate_up)
        self._set_weight("down_proj", down)
        self._weights_released = False
        self._op_key = self._operator_key()  # the operator reads these now: same packed copy, nothing to redo
        return sum(t.numel() * t.element_size() for t in (gate_up, down))

    def _set_weight(self, name: str, tensor: torch.Tensor) -> None:
        # A registered parameter stays one; a tensor a distributed engine moved out of the registry (DeepSpeed:
        # kt_core.distributed.deepspeed) stays a plain attribute.
        if name in self._parameters:
            setattr(self, name, nn.Parameter(tensor, requires_grad=False))
        else:
            object.__setattr__(self, name, tensor)

    def operator(self):
        """The C++ operator over this layer's weights (built, and packed, on first use or when they were replaced)."""
        key = self._operator_key()
        if self._op_key != key:
            if self.host_weights_released:
                raise RuntimeError(
                    f"KTExperts: kernel {self.kernel!r} needs the expert weights, which were released once packed "
                    "for the previous kernel (release_host_weights); restore_host_weights() before changing kernels"
                )
            self._op = kernels.build_operator(self)
            self._op_key = key  # a shared packed copy stays mapped (`_packed_source`): ops built on it may live on
        return self._op

    def use_operator(self, op, packed_source=None) -> None:
        """Takes `op`, built over this layer's weights as they are now (kernels.new_operator), as the operator until
        they are replaced; `packed_source` (kept alive with it) holds the packed tiles it borrows
        (kt_core.distributed.shared_packs)."""
        self._op, self._op_key, self._packed_source = op, self._operator_key(), packed_source

    def _operator_key(self) -> tuple:
        key = (self.kernel, self.gate_up_proj.data_ptr(), self.down_proj.data_ptr())
        if self.is_fp8:
            key += (self.gate_up_proj_scale_inv.data_ptr(), self.down_proj_scale_inv.data_ptr())
        return key

    def active_lora_factors(self) -> tuple[torch.Tensor, ...]:
        """The LoRA factors a forward applies: none without an adapter or while `lora_enabled` is False."""
        return self.lora.factors() if self.lora is not None and self.lora_enabled else ()

    def load_expert_(
        self,
        expert: int,
        *,
        gate: torch.Tensor | None = None,
        up: torch.Tensor | None = None,
        down: torch.Tensor | None = None,
        gate_scale_inv: torch.Tensor | None = None,
        up_scale_inv: torch.Tensor | None = None,
        down_scale_inv: torch.Tensor | None = None,
    ) -> None:
        """Copies one expert's weights in (checkpoint layout: gate / up [I, H], down [H, I]).

        fp8 weights come with their block scales (`*_scale_inv`, [ceil(rows / b0), ceil(cols / b1)]): an fp8 layer
        keeps both, a bf16 / fp32 one takes their dequantization.
        """
        if self.host_weights_released:
            raise RuntimeError(
                f"KTExperts.load_expert_: expert {expert}: this layer's host weights were released once packed "
                "(release_host_weights); restore_host_weights() gives them back first"
            )
        I = self.intermediate_dim
        given = {"gate": (gate, gate_scale_inv), "up": (up, up_scale_inv), "down": (down, down_scale_inv)}
        if self.is_fp8 or any(w is not None and w.dtype == FP8 for w, _ in given.values()):
            return self._load_fp8_expert(expert, given)
        with torch.no_grad():
            if gate is not None:
                self.gate_up_proj[expert, :I].copy_(gate)
            if up is not None:
                self.gate_up_proj[expert, I:].copy_(up)
            if down is not None:
                self.down_proj[expert].copy_(down)

    def _load_fp8_expert(self, expert: int, given: dict) -> None:
        from kt_core.loading.fp8 import dequantize_fp8_blockwise

        I, block = self.intermediate_dim, self.weight_block_size
        half = self.fp8_scale_shape("gate_up_proj")[1] // 2
        for proj, (weight, scale) in given.items():
            if weight is None:
                continue
            if weight.dtype != FP8 or scale is None:
                raise ValueError(
                    f"KTExperts.load_expert_: expert {expert} {proj}: an fp8 layer takes float8_e4m3fn weights with "
                    f"their {proj}_scale_inv, got {weight.dtype}" + (" without scales" if scale is None else "")
                )
            if not self.is_fp8:  # a bf16 / fp32 layer: dequantized
                self.load_expert_(expert, **{proj: dequantize_fp8_blockwise(weight, scale, block, torch.float32)})
                continue
            target, scales = (
                (self.down_proj[expert], self.down_proj_scale_inv[expert])
                if proj == "down"
                else (
                    self.gate_up_proj[expert, :I] if proj == "gate" else self.gate_up_proj[expert, I:],
                    self.gate_up_proj_scale_inv[expert, :half]
                    if proj == "gate"
                    else self.gate_up_proj_scale_inv[expert, half:],
                )
            )
            if tuple(scale.shape) != tuple(scales.shape):
                raise ValueError(
                    f"KTExperts.load_expert_: expert {expert} {proj}_scale_inv has shape {tuple(scale.shape)}, "
                    f"expected {tuple(scales.shape)} for {block} blocks"
                )
            with torch.no_grad():
                target.copy_(weight)
                scales.copy_(scale)

    # ---- compute -------------------------------------------------------------------------------------

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """Routed-experts output.

        Args:
            hidden_states: [T, H] on any device, bf16 or fp32.
            top_k_index: [T, K] expert ids in [0, total_experts), or -1 for slots computed elsewhere.
            top_k_weights: [T, K] routing weights (receive a gradient when they require one).

        Returns:
            [T, H] on hidden_states' device and dtype.
        """
        factors = self.active_lora_factors()
        if not torch.is_grad_enabled():
            # Inference (generation, evaluation, serving): a Function's needs_input_grad follows requires_grad even
            # under torch.no_grad(), so trainable LoRA factors would have the forward keep a cache for no backward.
            hidden_states, top_k_weights = hidden_states.detach(), top_k_weights.detach()
            factors = tuple(f.detach() for f in factors)
        return ExpertsFunction.apply(self, hidden_states, top_k_index, top_k_weights, *factors)

    def _apply(self, fn, recurse=True):
        # The routed experts live in host memory: `model.to("cuda")` / `.half()` move everything else.
        return self

    def extra_repr(self) -> str:
        return (
            f"experts={self.num_experts}, hidden={self.hidden_dim}, intermediate={self.intermediate_dim}, "
            f"dtype={self.gate_up_proj.dtype}, kernel={self.kernel}"
            + (f", of {self.total_experts} (the others on a GPU)" if self.host_rows is not None else "")
            + (f", gpu_share={type(self.gpu_share).__name__}" if self.gpu_share is not None else "")
            + (", host weights released (packed copy only)" if self.host_weights_released else "")
        )


def _host_contiguous(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # Zero-copy when the tensor already is a CPU-contiguous tensor of the right dtype.
    return t.detach().to(device="cpu", dtype=dtype).contiguous()
