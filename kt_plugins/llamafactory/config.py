"""The `kt` keys of a LLaMA-Factory YAML: which ones exist, what they mean, how they are validated.

LLaMA-Factory never sees these keys: the parser takeover (takeover.py) removes them first, so stock
LLaMA-Factory runs its plain Hugging Face path and kt-plugins builds the model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["KT_KEYS", "KTSettings", "split_kt_args"]

# Keys of KTransformers' LLaMA-Factory integration that we honour or accept for compatibility.
LEGACY_KEYS = (
    "use_kt",
    "kt_optimize_rule",
    "cpu_infer",
    "chunk_size",
    "kt_maxlen",
    "kt_use_cuda_graph",
    "kt_mode",
    "kt_force_think",
)


@dataclass
class KTSettings:
    """What `use_kt: true` and its companions ask for.

    Attributes:
        use_kt: route the routed experts to the CPU operator.
        kt_optimize_rule: placement rules: a rules/ path, a file relative to the YAML or the working
            directory, or a KTransformers name such as examples/kt_optimize_rules/Qwen3Moe-sft-amx.yaml.
        cpu_infer: CPU threads of the experts operator (None: the CPUs this process may use).
        chunk_size: tokens per CPU-experts call in long prefills.
        kt_maxlen: default max_new_tokens for chat / api.
        kt_use_cuda_graph: accepted for compatibility (the Hugging Face engine does not capture graphs).
        kt_mode: "normal" (accepted for compatibility).
        kt_force_think: start every answer with "<think>\\n".
        kt_kernel: CPU kernel ("auto", "avx512_bf16", ...; see kt_core.available_kernels()).
        kt_expert_lora: put LoRA on the routed experts when lora_target covers them ("all" does).
        kt_device: where the non-expert layers go ("cuda:0", "cpu", or a comma-separated list of GPUs).
        kt_gpu_memory_limit / kt_host_memory_limit: budgets for the memory plan ("70GiB").
        kt_gpu_memory_budget: when set ("10GiB"), each MoE layer is split between CPU compute and GPU
            compute on PCIe-streamed expert weights within this much GPU memory (kt_core.enable_streaming).
        kt_stream_quantize: None, or "int8" to halve the streamed bytes.
        kt_stream_keep_bytes: GPU bytes of a checkpointed layer's expert intermediates kept between its
            recomputation and its backward when streaming ("1GiB").
        kt_loss: the causal-LM loss of pt / sft training steps without [tokens x vocab] logits
            (kt_core.loss): "auto" (Liger-Kernel or cut-cross-entropy on CUDA when installed, else our
            chunked loss), "liger", "cce", "chunked", or "off" (false) for transformers' own loss.
    """

    use_kt: bool = False
    kt_optimize_rule: str | None = None
    cpu_infer: int | None = None
    chunk_size: int = 8192
    kt_maxlen: int = 4096
    kt_use_cuda_graph: bool = False
    kt_mode: str = "normal"
    kt_force_think: bool = False
    kt_kernel: str = "auto"
    kt_expert_lora: bool = True
    kt_device: str | None = None
    kt_gpu_memory_limit: str | None = None
    kt_host_memory_limit: str | None = None
    kt_gpu_memory_budget: str | None = None
    kt_stream_quantize: str | None = None
    kt_stream_keep_bytes: str = "1GiB"
    kt_loss: str = "auto"
    config_dir: Path | None = dataclasses.field(default=None, repr=False)  # the YAML's folder
    given: frozenset[str] = dataclasses.field(default=frozenset(), repr=False)  # keys the user wrote

    def resolve_rule(self) -> str | None:
        """The rule file to hand to kt_core: relative paths are tried against the YAML's folder first."""
        if not self.kt_optimize_rule:
            return None
        rule = Path(self.kt_optimize_rule).expanduser()
        if not rule.is_absolute() and self.config_dir is not None and (self.config_dir / rule).is_file():
            return str(self.config_dir / rule)
        return str(rule)  # the working directory, rules/, or a legacy name: kt_core.resolve_rule_file decides


KT_KEYS = tuple(f.name for f in dataclasses.fields(KTSettings) if f.name not in ("config_dir", "given"))
_BOOL = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _coerce(key: str, value: Any) -> Any:
    field_type = {f.name: f.type for f in dataclasses.fields(KTSettings)}[key]
    if "bool" in field_type and isinstance(value, str):
        if value.lower() not in _BOOL:
            raise ValueError(f"`{key}` must be true or false, got {value!r}")
        return _BOOL[value.lower()]
    if "int" in field_type and value is not None and not isinstance(value, bool):
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ValueError(f"`{key}` must be an integer, got {value!r}") from None
    return value


def _is_ours(key: str) -> bool:
    return key in KT_KEYS or key.startswith("kt_")


def split_kt_args(
    args: dict[str, Any] | list[str], config_dir: Path | None = None
) -> tuple[dict[str, Any] | list[str], KTSettings | None]:
    """Removes our keys from LLaMA-Factory's arguments (dict from a YAML, or a CLI list).

    Also maps `infer_backend: ktransformers` to `huggingface`. Returns the cleaned arguments and the
    settings, or None when `use_kt` is not set to true.

    Raises:
        ValueError: an unknown `kt_` key (the message lists the known ones) or a badly typed value.
    """
    found: dict[str, Any] = {}
    if isinstance(args, dict):
        cleaned = {}
        for key, value in args.items():
            if _is_ours(key):
                found[key] = value
            else:
                cleaned[key] = value
        if cleaned.get("infer_backend") == "ktransformers":
            cleaned["infer_backend"] = "huggingface"
    else:
        cleaned, found = _split_cli(list(args))
    unknown = sorted(k for k in found if k not in KT_KEYS)
    if unknown:
        raise ValueError(
            f"unknown kt-plugins key(s) {', '.join(unknown)} in the LLaMA-Factory arguments; known keys: "
            + ", ".join(KT_KEYS)
        )
    values = {k: _coerce(k, v) for k, v in found.items()}
    if not values.get("use_kt"):
        return cleaned, None
    return cleaned, KTSettings(**values, config_dir=config_dir, given=frozenset(values))


def _split_cli(argv: list[str]) -> tuple[list[str], dict[str, Any]]:
    """`--use_kt true`, `--use_kt=true` and bare `--use_kt` forms."""
    cleaned: list[str] = []
    found: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        token = argv[i]
        key, eq, value = token[2:].partition("=") if token.startswith("--") else ("", "", "")
        if key and _is_ours(key):
            if not eq:
                has_value = i + 1 < len(argv) and not argv[i + 1].startswith("--")
                value = argv[i + 1] if has_value else "true"
                i += 1 if has_value else 0
            found[key] = value
        elif key == "infer_backend" and (value if eq else argv[i + 1 : i + 2]) in ("ktransformers", ["ktransformers"]):
            cleaned.append("--infer_backend=huggingface")
            i += 0 if eq else 1
        else:
            cleaned.append(token)
        i += 1
    return cleaned, found
