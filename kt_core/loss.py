"""Causal-LM loss that never materializes the [tokens x vocab] logits.

    loss = enable_efficient_loss(model, mode="auto")  # model: a transformers causal LM, PEFT-wrapped or not
    ...
    loss.disable()  # or disable_efficient_loss(model)

transformers >= 5 models compute `logits = self.lm_head(hidden[:, slice, :])` and then
`loss = self.loss_function(logits=logits, labels=labels, vocab_size=..., **kwargs)` inside `forward`. In a
training step (labels given, gradients on) that costs [T, V] logits in the compute dtype, their fp32 copy and
the gradient of both: ~40 GiB at 16 x 2048 tokens and a 102,400 vocabulary. Installed here, without
touching the model's forward or class:

- a forward pre-hook on the model the caller holds (and on the causal LM inside it) notes whether `labels`
  were passed as a keyword while gradients are on: the training step;
- in such a step, a forward pre-hook on `lm_head` keeps its input (the final hidden states) and hands
  lm_head a zero-token slice, so the model's forward goes on with empty [B, 0, V] logits;
- the model's `loss_function` (transformers' own setter) computes transformers' `ForCausalLMLoss` from the
  kept hidden states and lm_head's weight: label shift, `ignore_index`, `shift_labels`, and
  `num_items_in_batch` (sum / num_items_in_batch when given, else the mean over non-ignored labels);
- the model's own forward still adds what it adds (the router auxiliary loss), and the output of that step
  has `logits=None` (the Trainer reads only `outputs["loss"]`).

Every other call (generation, evaluation without gradients, a forward without labels, DPO-style log-prob
computations) runs transformers' code unchanged and returns the logits. Backends, by `mode`:
"liger" (Liger-Kernel's fused linear cross-entropy, CUDA), "cce" (Apple's cut-cross-entropy, CUDA, no bias;
opt-in: its hidden-state gradient measured 5x transformers' own bf16 error, see tests/test_loss.py),
"chunked" (ours, any device: chunks of tokens, fp32 log-softmax, the chunk's logits recomputed in the
backward), "auto" (liger on CUDA tensors; chunked otherwise), "off".
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging

import torch
from torch import nn

__all__ = [
    "LOSS_MODES",
    "EfficientLoss",
    "causal_lm_loss",
    "chunked_linear_cross_entropy",
    "disable_efficient_loss",
    "enable_efficient_loss",
    "loss_workspace_bytes",
    "normalize_loss_mode",
]

logger = logging.getLogger(__name__)

LOSS_MODES = ("auto", "liger", "cce", "chunked", "off")
# (distribution, tested range [low, high), module and function used). Only the versions we ran are accepted:
# the libraries' entry points have changed signature between minor releases.
LIBRARIES = {
    "liger": ("liger-kernel", "0.8", "0.9", "liger_kernel.transformers.functional", "liger_fused_linear_cross_entropy"),
    "cce": ("cut-cross-entropy", "25.1", "25.2", "cut_cross_entropy", "linear_cross_entropy"),
}
CHUNK_LOGITS_BYTES = 256 << 20  # fp32 logits of one chunk: 655 tokens at a 102,400 vocabulary


def normalize_loss_mode(value: str | bool | None, key: str = "mode") -> str:
    """The canonical loss mode of a user setting (YAML reads `off` as false, `on` as true).

    Raises:
        ValueError: a value outside LOSS_MODES; the message names `key`.
    """
    if value is None or value is False:
        return "off"
    if value is True:
        return "auto"
    mode = str(value).strip().lower()
    if mode not in LOSS_MODES:
        raise ValueError(f"`{key}` must be one of {', '.join(LOSS_MODES)} (or true / false), got {value!r}")
    return mode


def _library(name: str):
    """The loss function of library `name`, or the reason it cannot be used (a string)."""
    dist, low, high, module_name, function = LIBRARIES[name]
    try:
        version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        extra = "kt-plugins[loss]" if name == "liger" else f"{dist}>={low},<{high}"
        return f"{dist} is not installed (pip install '{extra}')"
    from packaging.version import Version

    if not Version(low) <= Version(version) < Version(high):
        return f"{dist} {version} is outside the tested range >={low},<{high} (pip install '{dist}>={low},<{high}')"
    try:
        return getattr(importlib.import_module(module_name), function)
    except Exception as error:  # a broken triton / CUDA install surfaces here
        return f"{dist} {version} failed to import: {error}"


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Sum over tokens of cross_entropy(hidden @ weight.T + bias, target), one chunk of tokens at a time.

    N = tokens (all with a target), H = hidden, V = vocab, C = tokens per chunk. The forward keeps only the
    log-sum-exp of each token ([N] fp32); the backward recomputes a chunk's logits, turns them into
    softmax - onehot and multiplies it out, so no [N, V] tensor ever exists.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, chunk_tokens):
        # hidden [N, H], weight [V, H], bias [V] | None, target [N] -> scalar fp32
        n = hidden.shape[0]
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)  # [N]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk_tokens):
            end = min(start + chunk_tokens, n)
            logits = _chunk_logits(hidden[start:end], weight, bias)  # [C, V] fp32
            lse[start:end] = torch.logsumexp(logits, dim=-1)  # [C]
            picked = logits.gather(1, target[start:end, None]).squeeze(1)  # [C]
            total += (lse[start:end] - picked).sum()
        ctx.save_for_backward(hidden, weight, bias, target, lse)
        ctx.chunk_tokens = chunk_tokens
        return total

    @staticmethod
    def backward(ctx, grad_total):
        hidden, weight, bias, target, lse = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None  # [N, H]
        # fp32 accumulators across chunks; each chunk's product is rounded once, as the stock backward's
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_bias else None
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], ctx.chunk_tokens):
                end = min(start + ctx.chunk_tokens, hidden.shape[0])
                h = hidden[start:end]  # [C, H]
                probs = _chunk_logits(h, weight, bias).sub_(lse[start:end, None]).exp_()  # [C, V] softmax
                rows = torch.arange(end - start, device=probs.device)
                probs[rows, target[start:end]] -= 1.0  # d(lse - picked) / d logits
                probs.mul_(grad_total)
                grad_logits = probs.to(hidden.dtype)  # [C, V]: the stock `.float()` backward rounds so
                if need_hidden:
                    grad_hidden[start:end] = grad_logits @ weight  # [C, H]
                if need_weight:
                    grad_weight += (grad_logits.t() @ h).float()  # [V, H]
                if need_bias:
                    grad_bias += probs.sum(0)  # [V]
        grad_weight = grad_weight.to(weight.dtype) if need_weight else None
        grad_bias = grad_bias.to(bias.dtype) if need_bias else None
        return grad_hidden, grad_weight, grad_bias, None, None


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """[C, H] -> [C, V] fp32: the product rounded to the compute dtype first, as `lm_head(x).float()` does."""
    with torch.autocast(h.device.type, enabled=False):
        return nn.functional.linear(h, weight, bias).float()


def chunked_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """Sum of the token cross-entropies of `hidden @ weight.T + bias` against `target`, in fp32.

    Args:
        hidden: [N, H] final hidden states.
        weight: [V, H] output-embedding weight (frozen or trainable).
        target: [N] next-token ids; `ignore_index` entries add nothing.
        bias: [V] or None.
        ignore_index: the label of tokens without a target.
        chunk_tokens: tokens per chunk (None: CHUNK_LOGITS_BYTES of fp32 logits per chunk).

    Returns:
        A scalar fp32 tensor; gradients reach `hidden`, `weight` and `bias` without [N, V] tensors.
    """
    valid = (target != ignore_index).nonzero().squeeze(1)  # [n]
    if chunk_tokens is None:
        chunk_tokens = max(1, CHUNK_LOGITS_BYTES // (4 * weight.shape[0]))
    return _ChunkedLinearCrossEntropy.apply(hidden[valid], weight, bias, target[valid], chunk_tokens)


def causal_lm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    bias: torch.Tensor | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
    backend: str = "chunked",
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """transformers' `ForCausalLMLoss` computed from hidden states instead of logits.

    Args:
        hidden: [B, S, H] (or [N, H]) final hidden states, the input of lm_head.
        weight: [V, H] lm_head weight; bias: [V] or None.
        labels: [B, S] token ids (-100: no target), shifted here; ignored when `shift_labels` is given.
        num_items_in_batch: when given, the loss is sum / num_items_in_batch (gradient accumulation);
            otherwise the mean over tokens with a target (NaN when there are none, as transformers').
        shift_labels: [B, S] already-shifted targets.
        backend: "chunked", "liger" or "cce" (the last two need CUDA tensors).
        chunk_tokens: tokens per chunk of the chunked backend.

    Returns:
        A scalar fp32 loss.
    """
    if shift_labels is None:
        labels = nn.functional.pad(labels, (0, 1), value=ignore_index)  # [B, S + 1]
        shift_labels = labels[..., 1:]  # [B, S]: token i predicts token i + 1
    hidden = hidden.reshape(-1, hidden.shape[-1])  # [N, H]
    target = shift_labels.reshape(-1).to(hidden.device)  # [N]
    # Under autocast, lm_head would run in the autocast dtype: cast as it would (the casts are differentiable).
    if torch.is_autocast_enabled(hidden.device.type):
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    elif weight.dtype != hidden.dtype:
        weight = weight.to(hidden.dtype)
        bias = bias.to(hidden.dtype) if bias is not None else None
    if backend == "chunked":
        total = chunked_linear_cross_entropy(
            hidden, weight, target, bias=bias, ignore_index=ignore_index, chunk_tokens=chunk_tokens
        )
    else:
        function = _library(backend)
        if isinstance(function, str):
            raise RuntimeError(f"kt loss backend {backend!r}: {function}")
        if not hidden.is_cuda:
            raise RuntimeError(f"kt loss backend {backend!r} needs CUDA tensors, got {hidden.device}; use 'chunked'")
        if backend == "liger":
            accum = torch.float32 if weight.requires_grad else None  # fp32 weight-gradient sum across chunks
            total = function(
                hidden, weight, target, bias=bias, ignore_index=ignore_index, reduction="sum", accum_dtype=accum
            )
        else:
            if bias is not None:
                raise RuntimeError("kt loss backend 'cce' has no lm_head bias; use 'liger' or 'chunked'")
            # filter_eps=None: exact gradients (the default skips small softmax entries)
            total = function(hidden, weight, target, ignore_index=ignore_index, reduction="sum", filter_eps=None)
        total = total.float()
    if num_items_in_batch is None:
        return total / (target != ignore_index).sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def loss_workspace_bytes(
    tokens: int,
    vocab_size: int,
    hidden_size: int,
    *,
    backend: str = "chunked",
    dtype: torch.dtype = torch.bfloat16,
    lm_head_trainable: bool = False,
    chunk_tokens: int | None = None,
) -> int:
    """Peak GPU bytes the loss of one training step allocates over its forward and backward, for the memory plan.

    Counts what the loss creates on top of its inputs (the hidden states and lm_head's weight): logits or
    their chunks, the hidden-state gradient, and lm_head's weight gradient when it is trained. An upper
    bound by construction of each path; tests/test_loss.py's CUDA test prints it next to the measured peak.

    Args:
        tokens: tokens per micro-batch (batch x sequence); vocab_size, hidden_size: lm_head's shape.
        backend: "off" (transformers' loss), "chunked", "liger" or "cce" (EfficientLoss.backend).
        dtype: the compute dtype of lm_head.
        lm_head_trainable: whether lm_head's weight gets a gradient (False under LoRA).
        chunk_tokens: the chunked backend's chunk (None: its default).
    """
    n, v, h, d = tokens, vocab_size, hidden_size, torch.tensor([], dtype=dtype).element_size()
    weight_grad = (4 + 2 * d) * v * h if lm_head_trainable else 0  # fp32 accumulator, a chunk's product, the cast
    if backend == "off":  # logits, their fp32 copy, the saved log-softmax, then its gradient and the input's
        return (12 + d) * n * v + d * n * h + (d * v * h if lm_head_trainable else 0)
    if backend == "cce":  # blockwise in registers: the two input gradients and an fp32 log-sum-exp per token
        return 2 * d * n * h + 8 * n + weight_grad
    if backend == "liger":  # liger's chunk: next power of 2 of tokens / ceil(V / H)
        chunk = 1 << max(0, (-(-n // -(-v // h)) - 1).bit_length())
    elif backend == "chunked":
        chunk = chunk_tokens or max(1, CHUNK_LOGITS_BYTES // (4 * v))
    else:
        raise ValueError(f"`backend` must be one of off, chunked, liger, cce, got {backend!r}")
    # a chunk's logits (compute dtype, fp32, and their gradient), the per-token log-sum-exp, the gathered
    # hidden rows with their gradient and its scatter back
    return (4 + 2 * d) * min(chunk, n) * v + 4 * n + 3 * d * n * h + weight_grad


def _causal_lm(model: nn.Module) -> nn.Module:
    """The transformers model inside `model` that owns lm_head and `loss_function` (PEFT: the base model)."""
    from transformers import PreTrainedModel

    for module in model.modules():
        if isinstance(module, PreTrainedModel) and isinstance(module.get_output_embeddings(), nn.Module):
            return module
    raise ValueError(f"enable_efficient_loss: no causal LM with an lm_head inside {type(model).__name__}")


def _liger_patched(causal_lm: nn.Module) -> bool:
    """Whether Liger-Kernel's monkey patching replaced the model's forward (class or instance)."""
    forward = causal_lm.__dict__.get("forward", type(causal_lm).forward)
    forward = getattr(forward, "__func__", forward)
    return getattr(forward, "__module__", "").startswith("liger_kernel")


def _fast_path_refusal(causal_lm: nn.Module) -> str | None:
    """Why this model's loss cannot be computed from hidden states and lm_head's weight, or None."""
    lm_head = causal_lm.get_output_embeddings()
    if type(lm_head) is not nn.Linear:  # PEFT's LoRA / modules_to_save wrappers, quantized heads
        return f"lm_head is a {type(lm_head).__name__}, not a plain nn.Linear (LoRA or modules_to_save on it?)"
    for key in ("final_logit_softcapping", "logit_scale"):
        if getattr(causal_lm.config, key, None) not in (None, 1.0):
            return f"the model transforms its logits after lm_head (config.{key})"
    return None


class EfficientLoss:
    """What `enable_efficient_loss` attached to one model; `disable()` takes it off again.

    Attributes:
        mode: the requested mode ("auto", "liger", "cce", "chunked").
        backend: what computes the loss on the lm_head's current device ("liger", "cce", "chunked", or
            "off" when the model is not eligible: `reason` says why).
        last_backend: what computed the last loss (None before the first training step).
    """

    def __init__(self, model: nn.Module, causal_lm: nn.Module, mode: str, chunk_tokens: int | None):
        self.mode = mode
        self.chunk_tokens = chunk_tokens
        self.reason: str | None = None
        self.last_backend: str | None = None
        self._causal_lm = causal_lm
        self._armed: list[bool] = []  # one entry per hooked forward in progress: labels given with grad on
        self._hidden: torch.Tensor | None = None  # [B, S, H] lm_head's input in the current training step
        self._backends: dict[str, str] = {}  # device type -> backend
        self._handles = []
        self._previous_loss_function = causal_lm.__dict__.get("_loss_function")
        self._warned_unarmed = False
        self._warned_sharded = False
        self._stock_loss_function = causal_lm.loss_function
        for hooked in dict.fromkeys((model, causal_lm)):  # PEFT calls the causal LM's forward without hooks
            self._handles.append(hooked.register_forward_pre_hook(self._arm, with_kwargs=True))
            self._handles.append(hooked.register_forward_hook(self._disarm, always_call=True))
        self._handles.append(causal_lm.get_output_embeddings().register_forward_pre_hook(self._take_hidden))
        causal_lm.loss_function = self._loss_function

    @property
    def backend(self) -> str:
        return self._backend(self._causal_lm.get_output_embeddings().weight.device)

    def disable(self) -> None:
        """Removes the hooks and gives the model back its previous loss function."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if getattr(self._causal_lm.__dict__.get("_loss_function"), "__self__", None) is self:
            if self._previous_loss_function is None:
                del self._causal_lm.__dict__["_loss_function"]
            else:
                self._causal_lm.loss_function = self._previous_loss_function

    def _backend(self, device: torch.device) -> str:
        if device.type not in self._backends:
            self._backends[device.type] = self._choose_backend(device)
        return self._backends[device.type]

    def _choose_backend(self, device: torch.device) -> str:
        if self.mode != "auto":
            return self.mode
        if device.type != "cuda":
            return "chunked"
        found = _library("liger")
        if not isinstance(found, str):
            return "liger"
        logger.info("efficient causal-LM loss: chunked (%s)", found)
        return "chunked"

    def _arm(self, module, args, kwargs):
        self._armed.append(kwargs.get("labels") is not None and torch.is_grad_enabled())

    def _disarm(self, module, args, output):
        if self._armed:
            self._armed.pop()
        if self._armed:
            return None
        self._hidden = None
        logits = output.get("logits") if isinstance(output, dict) else None
        if isinstance(logits, torch.Tensor) and logits.numel() == 0 and logits.dim() >= 2 and logits.shape[-2] == 0:
            return type(output)(**{k: v for k, v in output.items() if k != "logits"})  # logits=None
        return None

    def _take_hidden(self, module, args):
        if not (self._armed and self._armed[-1]) or self._causal_lm.get_output_embeddings() is not module:
            return None
        weight = module.weight
        if weight.dim() != 2 or weight.shape[1] != args[0].shape[-1]:  # sharded outside its forward (ZeRO-3)
            if not self._warned_sharded:
                self._warned_sharded = True
                logger.warning("efficient causal-LM loss: lm_head's weight is sharded (%s); full logits", weight.shape)
            return None
        self._hidden = args[0]  # [B, S, H]
        return (args[0].narrow(-2, 0, 0), *args[1:])  # lm_head computes [B, 0, V]

    def _loss_function(
        self, logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100, shift_labels=None, **kwargs
    ):
        hidden, self._hidden = self._hidden, None
        if hidden is None or logits.numel() != 0:
            if hidden is None and torch.is_grad_enabled() and not self._warned_unarmed:
                self._warned_unarmed = True
                logger.warning(
                    "efficient causal-LM loss: a step with gradients computed full logits; pass `labels` as a "
                    "keyword and call enable_efficient_loss on the outermost model (after PEFT wraps it)"
                )
            return self._stock_loss_function(
                logits=logits,
                labels=labels,
                vocab_size=vocab_size,
                num_items_in_batch=num_items_in_batch,
                ignore_index=ignore_index,
                shift_labels=shift_labels,
                **kwargs,
            )
        lm_head = self._causal_lm.get_output_embeddings()
        self.last_backend = self._backend(hidden.device)
        return causal_lm_loss(
            hidden,
            lm_head.weight,
            labels,
            bias=lm_head.bias,
            num_items_in_batch=num_items_in_batch,
            ignore_index=ignore_index,
            shift_labels=shift_labels,
            backend=self.last_backend,
            chunk_tokens=self.chunk_tokens,
        )


def enable_efficient_loss(
    model: nn.Module, mode: str | bool = "auto", *, chunk_tokens: int | None = None
) -> EfficientLoss | None:
    """Computes the causal-LM loss of training steps without [tokens x vocab] logits (see the module doc).

    Args:
        model: a transformers causal LM, or a wrapper of one (PEFT): the model the training loop calls.
        mode: "auto" (Liger-Kernel on CUDA; our chunked loss elsewhere or without it),
            "liger", "cce", "chunked", or "off" (false) to leave transformers' loss in place.
        chunk_tokens: tokens per chunk of the chunked loss (None: 256 MiB of fp32 logits per chunk).

    Returns:
        The attached EfficientLoss (its `backend` says what computes the loss), or None for "off".
        Calling it again replaces what an earlier call attached.

    Raises:
        ValueError: an unknown mode, or a model the explicitly requested mode cannot serve (the message
            says why); "auto" logs the reason in one line and leaves transformers' loss instead.
        RuntimeError: "liger" / "cce" requested but not importable in the tested version range.
    """
    mode = normalize_loss_mode(mode)
    causal_lm = _causal_lm(model)
    disable_efficient_loss(causal_lm)
    if mode == "off":
        return None
    if _liger_patched(causal_lm):  # LLaMA-Factory's `enable_liger_kernel: true`: already fused, keep it
        logger.info("efficient causal-LM loss: Liger-Kernel's patched forward already computes it; nothing attached")
        return None
    refusal = _fast_path_refusal(causal_lm)
    if refusal is not None:
        if mode != "auto":
            raise ValueError(f"efficient causal-LM loss mode {mode!r}: {refusal}; use 'auto' or 'off'")
        logger.info("efficient causal-LM loss not attached: %s; transformers' loss stays", refusal)
        return None
    if mode in LIBRARIES:
        found = _library(mode)
        if isinstance(found, str):
            raise RuntimeError(f"efficient causal-LM loss mode {mode!r}: {found}")
    attached = EfficientLoss(model, causal_lm, mode, chunk_tokens)
    logger.info(
        "efficient causal-LM loss on (%s on %s)", attached.backend, causal_lm.get_output_embeddings().weight.device
    )
    return attached


def disable_efficient_loss(model: nn.Module) -> bool:
    """Takes off what enable_efficient_loss attached to `model`; returns whether there was anything."""
    attached = getattr(_causal_lm(model).__dict__.get("_loss_function"), "__self__", None)
    if isinstance(attached, EfficientLoss):
        attached.disable()
        return True
    return False
