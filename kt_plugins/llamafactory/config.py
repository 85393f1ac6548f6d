"""The `kt` keys of a LLaMA-Factory YAML: which ones exist, what they mean, how they are validated.

LLaMA-Factory never sees these keys: the parser takeover (takeover.py) removes them first, so stock
LLaMA-Factory runs its plain Hugging Face path and kt-plugins builds the model. Every key is checked here,
at parse time, with kt_core.settings: the error names the key as written in the YAML, the value and what
it may be. A key that cannot take effect (a GPU budget without a GPU, full fine-tuning of frozen experts)
is an error; one accepted for compatibility that does nothing says so in a one-line warning.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kt_core import settings as checks

__all__ = ["KT_KEYS", "MEMORY_KNOBS", "KTSettings", "check_per_rank", "check_training_args", "split_kt_args"]

logger = logging.getLogger("llamafactory.kt_plugins")  # under LLaMA-Factory's own log handlers

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
        cpu_infer: CPU threads of the experts operator (None: the CPUs this process may use). More than
            those CPUs warns; more than 4x them runs one thread per CPU (kt_core.settings.cpu_threads).
        chunk_size: a positive integer bounding the tokens of one CPU-experts call (and so its scratch
            memory; same result); None, the default, gives each call the whole batch.
        kt_maxlen: default max_new_tokens for chat / api.
        kt_use_cuda_graph: accepted for compatibility; true warns that the Hugging Face engine captures no
            CUDA graphs.
        kt_mode: "normal" (accepted for compatibility; another value warns that the normal mode runs).
        kt_force_think: start every answer with "<think>\\n".
        kt_kernel: CPU kernel ("auto", "avx512_bf16", ...; see kt_core.available_kernels()).
        kt_expert_lora: put LoRA on the routed experts when lora_target covers them ("all" does).
        kt_device: where the non-expert layers go ("cuda:0", "cpu", or a comma-separated list of GPUs). Unset:
            this rank's device (cuda:LOCAL_RANK under torchrun / FORCE_TORCHRUN=1, cuda:0 for one process; cpu
            without a GPU). Under torchrun every rank trains a whole copy on its own device: a list of GPUs, or a
            device that is not this rank's, is refused (check_per_rank), and so is a kt_optimize_rule that names
            several GPUs or another rank's GPU.
        kt_shared_experts: with several ranks on a node (FORCE_TORCHRUN=1 NPROC_PER_NODE=n), where the node's one
            copy of the frozen expert weights lives: unset or true, a file in /dev/shm that local rank 0 writes and
            every rank maps; a folder (an existing one in host memory: a tmpfs or hugetlbfs mount) puts the file
            there; false gives every rank its own copy (n times the host memory). No effect with one rank per
            node (kt_core.load_model(shared_experts=...)).
        kt_expert_dtype: unset (an FP8 checkpoint's routed experts are dequantized to bf16 at load) or "fp8"
            (kept as shipped, e4m3 with their block scales: half the host RAM and PCIe bytes;
            kt_core.load_model(expert_dtype="fp8")).
        kt_gpu_memory_limit: the most GPU memory the WHOLE RUN may hold ("70GiB"), everything counted: the
            non-expert weights, the LoRA factors with their gradients and optimizer state, the expert weights
            kt_expert_gpu_memory gives (slots and residents), the activations of per_device_train_batch_size x
            cutoff_len tokens and the loss. The memory plan (kt_core.streaming.memory_plan) checks it at parse
            time, before anything is loaded, and refuses with the key and value to change; with
            kt_expert_gpu_memory the resident experts are trimmed to what fits. Unset: CUDA's free memory.
        kt_host_memory_limit: the most host memory the run may hold ("400GiB"): the expert stores, one layer
            being read, CPU-placed modules; checked before loading. Unset: MemAvailable.
        kt_expert_gpu_memory: GPU memory for the EXPERT WEIGHTS ONLY: the two streaming slots plus the resident
            experts ("10GiB"); not a cap on the run (kt_gpu_memory_limit is). Setting it turns streaming on:
            each MoE layer is split between CPU compute and GPU compute on PCIe-streamed expert weights
            (kt_core.enable_streaming); needs a CUDA GPU. `kt_gpu_memory_budget` is its former name (accepted
            with a warning).
        kt_stream_quantize: None, or "int8" to halve the streamed bytes.
        kt_stream_keep_bytes: GPU bytes of a checkpointed layer's expert intermediates kept between its
            recomputation and its backward when streaming ("1GiB").
        kt_stream_mode: how streaming splits each layer: "auto" (the planner's cost model), "gpu" (every expert
            streamed and computed on the GPU), "cpu" (every expert on the CPU).
        kt_stream_dequant_bytes: FP8 experts: GPU bytes of the bf16 buffer a group of streamed experts is
            dequantized into ("512MiB"; taken from kt_expert_gpu_memory).
        kt_loss: the causal-LM loss of pt / sft training steps without [tokens x vocab] logits
            (kt_core.loss): "auto" (Liger-Kernel on CUDA when installed, else our chunked loss), "liger",
            "cce", "chunked", or "off" (false) for transformers' own loss.
        kt_keep_host_weights: keep the routed experts' weights in host RAM beside a packed kernel's copy. By default
            (false) a bf16 run's layers on amx_bf16 / avx512_bf16_packed free them once packed at train start: the
            packed forward and backward read only their own copy, so host RAM holds the experts once
            (kt_core.pack_experts(release=True)); chat / api free them at each layer's first forward on the packed
            copy (KTExperts.release_after_packing), export keeps them. Kept anyway with several ranks, under FSDP /
            DeepSpeed and for kernels that read them.
    """

    use_kt: bool = False
    kt_optimize_rule: str | None = None
    cpu_infer: int | None = None
    chunk_size: int | None = None
    kt_maxlen: int = 4096
    kt_use_cuda_graph: bool = False
    kt_mode: str = "normal"
    kt_force_think: bool = False
    kt_kernel: str = "auto"
    kt_expert_lora: bool = True
    kt_device: str | None = None
    kt_shared_experts: bool | str | None = None
    kt_expert_dtype: str | None = None
    kt_gpu_memory_limit: str | None = None
    kt_host_memory_limit: str | None = None
    kt_expert_gpu_memory: str | None = None
    kt_stream_quantize: str | None = None
    kt_stream_keep_bytes: str = "1GiB"
    kt_stream_mode: str = "auto"
    kt_stream_dequant_bytes: str = "512MiB"
    kt_loss: str = "auto"
    kt_keep_host_weights: bool = False
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

    def describe(self) -> str:
        """What will run, for the takeover log line: the kernel `kt_kernel` resolves to, the real chunking."""
        from kt_core import resolve_kernel

        kernel = resolve_kernel(self.kt_kernel)
        parts = [
            f"kernel {kernel}" + (f" (kt_kernel: {self.kt_kernel})" if self.kt_kernel != kernel else ""),
            f"chunk_size {self.chunk_size} tokens per CPU-experts call"
            if self.chunk_size
            else "no chunking (each CPU-experts call takes the whole batch)",
            f"cpu_infer {self.cpu_infer}" if self.cpu_infer else "cpu_infer: the CPUs this process may use",
            f"rules {self.resolve_rule()}" if self.kt_optimize_rule else "rules: the family's defaults",
            f"expert LoRA {'on' if self.kt_expert_lora else 'off'}",
        ]
        if self.kt_device:
            parts.append(f"device {self.kt_device}")
        if self.kt_expert_gpu_memory is not None:
            quantized = f", {self.kt_stream_quantize}" if self.kt_stream_quantize else ""
            parts.append(f"expert streaming: {self.kt_expert_gpu_memory} of GPU memory for expert weights{quantized}")
        if self.kt_gpu_memory_limit:
            parts.append(f"the whole run within {self.kt_gpu_memory_limit} of GPU memory")
        return "; ".join(parts)


KT_KEYS = tuple(f.name for f in dataclasses.fields(KTSettings) if f.name not in ("config_dir", "given"))
# The keys a GPU memory plan refusal asks to change (kt_core.streaming.memory_plan.Knobs).
MEMORY_KNOBS = {
    "limit": "kt_gpu_memory_limit",
    "batch": "per_device_train_batch_size",
    "seq_len": "cutoff_len",
    "experts": "kt_expert_gpu_memory",
    "keep": "kt_stream_keep_bytes",
}


def _optional(check: Callable[[str, Any], Any]) -> Callable[[str, Any], Any]:
    return lambda key, value: None if value is None else check(key, value)


def _text(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise checks.SettingError(f"{key}: got {value!r}, expected a non-empty string")
    return value.strip()


def _size_text(key: str, value: Any) -> str | int:
    checks.parse_size(value, key)
    return value  # kept as written ("10GiB"): kt_core reads it with the same parser, and the logs show it


def _device_list(key: str, value: Any) -> str:
    import torch

    text = _text(key, value)
    for part in text.split(","):
        try:
            device = torch.device(part.strip())
        except RuntimeError:
            raise checks.SettingError(
                f"{key}: got {value!r}, expected a device ('cuda:0', 'cpu') or a comma-separated list of GPUs"
            ) from None
        if device.type == "cuda":
            checks.require_cuda(key, value, "the non-expert layers cannot go to a GPU")
    return text


def _shared_experts(key: str, value: Any) -> bool | str:
    if isinstance(value, (bool, int)) or (isinstance(value, str) and not value.strip().startswith(("/", ".", "~"))):
        try:
            return checks.boolean(key, value)
        except checks.SettingError:
            if not isinstance(value, str):
                raise
    folder = Path(_text(key, value)).expanduser()
    if not folder.is_dir():
        raise checks.SettingError(
            f"{key}: got {value!r}, expected true, false or an existing folder in host memory (/dev/shm, a tmpfs "
            "or hugetlbfs mount) for the node's shared expert file"
        )
    return str(folder)


def _kernel(key: str, value: Any) -> str:
    from kt_core import resolve_kernel

    name = _text(key, value)
    try:
        resolve_kernel(name)
    except ValueError as exc:
        raise checks.SettingError(f"{key}: {exc}") from None
    return name


def _kt_mode(key: str, value: Any) -> str:
    mode = _text(key, value)
    if mode != "normal":
        logger.warning("%s: %r has no effect in kt-plugins; the normal mode runs", key, mode)
    return mode


def _cuda_graph(key: str, value: Any) -> bool:
    on = checks.boolean(key, value)
    if on:
        logger.warning("%s: true has no effect: LLaMA-Factory's Hugging Face engine runs without CUDA graphs", key)
    return on


def _chunk_size(key: str, value: Any) -> int:
    return checks.positive_int(key, value, what="tokens per CPU-experts call; leave it out for no chunking")


def _loss_mode(key: str, value: Any) -> str:
    from kt_core import normalize_loss_mode  # YAML reads `off` as false: both mean "off"

    return normalize_loss_mode(value, key=key)


# Key -> check(key as written, value) -> the value to use. Every key of KTSettings has one.
_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "use_kt": checks.boolean,
    "kt_optimize_rule": _optional(_text),
    "cpu_infer": checks.cpu_threads,
    "chunk_size": _optional(_chunk_size),
    "kt_maxlen": lambda key, value: checks.positive_int(key, value, what="default max_new_tokens"),
    "kt_use_cuda_graph": _cuda_graph,
    "kt_mode": _kt_mode,
    "kt_force_think": checks.boolean,
    "kt_kernel": _kernel,
    "kt_expert_lora": checks.boolean,
    "kt_device": _optional(_device_list),
    "kt_shared_experts": _optional(_shared_experts),
    "kt_expert_dtype": lambda key, value: checks.choice(key, value, (None, "fp8")),
    "kt_gpu_memory_limit": _optional(_size_text),
    "kt_host_memory_limit": _optional(_size_text),
    "kt_expert_gpu_memory": _optional(_size_text),
    "kt_stream_quantize": lambda key, value: checks.choice(key, value, (None, "int8")),
    "kt_stream_keep_bytes": _size_text,
    "kt_stream_mode": lambda key, value: checks.choice(key, value, ("auto", "gpu", "cpu")),
    "kt_stream_dequant_bytes": _size_text,
    "kt_loss": _loss_mode,
    "kt_keep_host_weights": checks.boolean,
}


def _check_values(found: dict[str, Any]) -> dict[str, Any]:
    """Each key through its check, then the checks that span keys (only when use_kt is on)."""
    use_kt = checks.boolean("use_kt", found.get("use_kt", False))
    if not use_kt:
        ignored = sorted(k for k in found if k != "use_kt")
        if ignored:
            logger.warning("kt-plugins keys %s have no effect without use_kt: true", ", ".join(ignored))
        return {"use_kt": False}
    values = {key: _CHECKS[key](key, value) if key in _CHECKS else value for key, value in found.items()}
    budget = values.get("kt_expert_gpu_memory")
    if budget is not None:
        checks.require_cuda("kt_expert_gpu_memory", budget, "expert streaming computes on a CUDA GPU")
        device = values.get("kt_device")
        if device and not device.split(",")[0].strip().startswith("cuda"):
            raise checks.SettingError(
                f"kt_expert_gpu_memory: got {budget!r} with kt_device {device!r}; expert streaming computes on "
                "the GPU the model runs on: set kt_device to a CUDA device or remove kt_expert_gpu_memory"
            )
    return values


def check_rule_file(settings: KTSettings) -> None:
    """Fails at parse time, naming `kt_optimize_rule`, when the rule file cannot be found.

    Raises:
        SettingError: with the paths tried.
    """
    if not settings.kt_optimize_rule:
        return
    from kt_core.placement import resolve_rule_file

    try:
        resolve_rule_file(settings.resolve_rule())
    except FileNotFoundError as exc:
        raise checks.SettingError(f"kt_optimize_rule: {exc}") from None


def _cuda_devices(value: Any) -> set[str]:
    """The CUDA devices a rule's options name, wherever they sit (device, devices, a legacy transfer_map)."""
    if isinstance(value, str):
        return {value.strip()} if value.strip().startswith("cuda") else set()
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return set().union(*(_cuda_devices(v) for v in value)) if value else set()
    return set()


def check_per_rank(settings: KTSettings) -> None:
    """Under torchrun (WORLD_SIZE > 1: FORCE_TORCHRUN=1, NNODES, ...), refuses what cannot hold on every rank.

    Each rank trains a whole copy of the non-expert layers on its own device (cuda:LOCAL_RANK, as the Trainer
    puts it; cpu without a GPU) and DDP keeps the copies equal: a layer split over several GPUs, or a device named
    in the YAML (one YAML serves every rank, so it names another rank's GPU on all but one of them), cannot.
    With one rank per node, kt_shared_experts has no effect and says so.

    Raises:
        SettingError: naming the key, the value, and what to write instead.
    """
    import os

    import torch

    from kt_core.distributed import local_ranks

    ranks = local_ranks()
    if "kt_shared_experts" in settings.given and not ranks.shared:
        logger.warning("kt_shared_experts has no effect with one rank on this node (LOCAL_WORLD_SIZE unset or 1)")
    world = os.environ.get("WORLD_SIZE", "1").strip() or "1"
    if not world.isdigit() or int(world) <= 1:
        return
    # This rank's device, as kt_core.load_model and the Trainer pick it (device=None).
    mine = f"cuda:{ranks.rank % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu"
    why = (
        f"under torchrun (WORLD_SIZE={world}) each rank trains the non-expert layers on its own device "
        f"(cuda:LOCAL_RANK; here local rank {ranks.rank} of {ranks.size}: {mine})"
    )

    def fits(devices: set[str]) -> bool:  # the same answer on every rank: one YAML names one device for all
        return not devices or (devices == {mine} and (not ranks.shared or mine == "cpu"))

    if settings.kt_device is not None:
        devices = {str(torch.device(d.strip())) for d in settings.kt_device.split(",")}
        if not fits(devices):
            raise checks.SettingError(
                f"kt_device: got {settings.kt_device!r}; {why}. Remove kt_device (each rank then takes its own), "
                "or, to split the layers over several GPUs, run one process per node (no FORCE_TORCHRUN)"
            )
    if settings.kt_optimize_rule:
        from kt_core.placement import load_rules, resolve_rule_file

        rule_file = resolve_rule_file(settings.resolve_rule())
        named = set().union(*(_cuda_devices(rule.replace.kwargs) for rule in load_rules(rule_file)))
        if not fits(named):
            raise checks.SettingError(
                f"kt_optimize_rule: {rule_file} puts layers on {', '.join(sorted(named))}; {why}. Use rules that "
                "name no GPU (the default device is each rank's: e.g. cpu-only.yaml for the experts, or no "
                "kt_optimize_rule), or run one process per node (no FORCE_TORCHRUN) to split the layers over GPUs"
            )


def check_training_args(settings: KTSettings, finetuning_args, do_train: bool) -> None:
    """Refuses LLaMA-Factory training arguments that would silently leave the experts untrained.

    Args:
        settings: the kt-plugins settings of the run.
        finetuning_args: LLaMA-Factory's FinetuningArguments.
        do_train: whether this run trains.

    Raises:
        SettingError: `finetuning_type` other than lora while training.
    """
    kind = getattr(finetuning_args, "finetuning_type", "lora")
    if do_train and kind != "lora":
        raise checks.SettingError(
            f"finetuning_type: got {kind!r} with use_kt: true, expected 'lora': kt-plugins keeps the routed "
            "experts' base weights frozen on the CPU operator (most of the model's weights), so they would not "
            "train. Use finetuning_type: lora (lora_target: all puts LoRA on the experts too)."
        )


def _is_ours(key: str) -> bool:
    return key in KT_KEYS or key.startswith("kt_")


def split_kt_args(
    args: dict[str, Any] | list[str], config_dir: Path | None = None
) -> tuple[dict[str, Any] | list[str], KTSettings | None]:
    """Removes our keys from LLaMA-Factory's arguments (dict from a YAML, or a CLI list).

    Also maps `infer_backend: ktransformers` to `huggingface`. Returns the cleaned arguments and the
    settings, or None when `use_kt` is not set to true.

    Raises:
        ValueError: an unknown `kt_` key (the message lists the known ones); a `SettingError` (a ValueError)
            for a value a key cannot take, naming the key, the value and what it may be.
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
    if "kt_gpu_memory_budget" in found:  # the former name of kt_expert_gpu_memory
        found["kt_expert_gpu_memory"] = checks.renamed(
            "kt_gpu_memory_budget", found.pop("kt_gpu_memory_budget"), "kt_expert_gpu_memory",
            found.get("kt_expert_gpu_memory"),
        )  # fmt: skip
    unknown = sorted(k for k in found if k not in KT_KEYS)
    if unknown:
        raise ValueError(
            f"unknown kt-plugins key(s) {', '.join(unknown)} in the LLaMA-Factory arguments; known keys: "
            + ", ".join(KT_KEYS)
        )
    values = _check_values(found)
    if not values.get("use_kt"):
        return cleaned, None
    settings = KTSettings(**values, config_dir=config_dir, given=frozenset(values))
    check_rule_file(settings)
    check_per_rank(settings)
    return cleaned, settings


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
