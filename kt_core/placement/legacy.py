"""KTransformers rule files keep working: their classes and kwargs translated to ours.

KTransformers' (Gen-1 kt-sft) rules and LLaMA-Factory 0.9.4's `examples/ktransformers/kt_optimize_rules`
name classes of the `ktransformers` package:

- `ktransformers.operators.experts.KTransformersExperts` with `generate_device: cpu` and
  `backend: AMXInt8 | AMXBF16 | llamafile` -> our CPU experts operator; the backend picks the kernel
  (an AMX kernel when this CPU runs one, else "auto", with a logged notice). `out_device`, `prefill_*` and
  `generate_op` have no equivalent: our operator returns its result on the input's device.
- anything else (attention, linear, rotary, MoE block, gate, model) -> Hugging Face's own module on
  the device the rule names (`generate_device`, else `prefill_device`); the model rule's
  `transfer_map: {30: "cuda:1"}` splits the decoder layers over GPUs.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

__all__ = [
    "LEGACY_RULE_FILES",
    "is_legacy_class",
    "legacy_backend_to_kernel",
    "legacy_device",
    "resolve_legacy_rule_name",
]

logger = logging.getLogger(__name__)

LEGACY_PACKAGE = "ktransformers."
LEGACY_EXPERT_CLASSES = ("KTransformersExperts", "KExpertsCPU", "KSFTExpertsCPU")
# kwargs of KTransformers' classes that our runtime has no use for (logged at debug level).
LEGACY_IGNORED_KWARGS = frozenset(
    {
        "prefill_op",
        "generate_op",
        "out_device",
        "per_layer_prefill_intput_threshold",
        "per_layer_prefill_input_threshold",
        "absorb_for_prefill",
        "chunked_prefill_size",
        "backend",
        "generate_device",
        "prefill_device",
    }
)

# Legacy rule file names (as LLaMA-Factory configs and KTransformers docs write them) -> `family/variant.yaml`,
# which kt_core.placement.files resolves to the family's own rules/ file, else to the generic rules/variant.yaml.
LEGACY_RULE_FILES = {
    "DeepSeek-V2-Lite-Chat-sft.yaml": "deepseek_v2/single-gpu.yaml",
    "DeepSeek-V2-Lite-Chat-sft-amx.yaml": "deepseek_v2/single-gpu.yaml",
    "DeepSeek-V2-Lite-Chat-sft-amx-multi-gpu.yaml": "deepseek_v2/multi-gpu.yaml",
    "DeepSeek-V2-Chat-sft-amx.yaml": "deepseek_v2/single-gpu.yaml",
    "DeepSeek-V3-Chat-sft-amx.yaml": "deepseek_v3/single-gpu.yaml",
    "DeepSeek-V3-Chat-sft-amx-multi-gpu.yaml": "deepseek_v3/multi-gpu.yaml",
    "DeepSeek-V3-Chat-sft-amx-multi-gpu-4.yaml": "deepseek_v3/multi-gpu-4.yaml",
    "Qwen3Moe-sft-amx.yaml": "qwen3_moe/single-gpu.yaml",
}
# Prefix of a legacy file name -> our family folder, for names not in the table above.
_LEGACY_FAMILY_PREFIXES = (
    ("deepseek-v2", "deepseek_v2"),
    ("deepseek-v3", "deepseek_v3"),
    ("deepseek-r1", "deepseek_v3"),
    ("kimi-k2", "deepseek_v3"),
    ("qwen3moe", "qwen3_moe"),
    ("qwen3-moe", "qwen3_moe"),
    ("qwen2moe", "qwen2_moe"),
    ("qwen2-moe", "qwen2_moe"),
    ("mixtral", "mixtral"),
    ("glm4moe", "glm4_moe"),
    ("glm-4.5", "glm4_moe"),
)
_MULTI_GPU_RE = re.compile(r"-multi-gpu(?:-(\d+))?\.ya?ml$", re.IGNORECASE)


def is_legacy_class(class_path: str) -> bool:
    """Whether a rule's class names a KTransformers class."""
    return class_path.startswith(LEGACY_PACKAGE)


def is_legacy_experts_class(class_path: str) -> bool:
    """Whether a KTransformers class is one of its routed-experts operators."""
    return is_legacy_class(class_path) and class_path.rsplit(".", 1)[-1] in LEGACY_EXPERT_CLASSES


def legacy_device(kwargs: dict) -> str | None:
    """The device a KTransformers rule asks for: generate_device, else prefill_device, else device."""
    for key in ("generate_device", "prefill_device", "device"):
        if kwargs.get(key):
            return str(kwargs[key])
    return None


def legacy_backend_to_kernel(backend: str | None, *, where: str) -> str:
    """Maps KTransformers' `backend` (AMXBF16, AMXInt8, llamafile) to one of our kernels."""
    from kt_core import kernels

    if backend is None:
        return "auto"
    if backend.upper().startswith("AMX"):
        # AMXInt8 quantized online in KTransformers; ours runs the closest AMX variant this build has.
        preferred = ("amx_int8", "amx", "amx_bf16") if "INT8" in backend.upper() else ("amx_bf16", "amx")
        available = kernels.available_kernels()
        for name in preferred:
            if name in available:
                return name
        logger.warning(
            "%s: backend %s asks for AMX, which this CPU or build does not run; using kernel 'auto' (%s)",
            where,
            backend,
            kernels.resolve_kernel("auto"),
        )
        return "auto"
    if backend.lower() != "llamafile":
        logger.warning("%s: unknown KTransformers backend %r; using kernel 'auto'", where, backend)
    return "auto"


def resolve_legacy_rule_name(path: str | Path) -> str | None:
    """Maps a legacy file name (`DeepSeek-V3-Chat-sft-amx-multi-gpu.yaml`) to `family/variant.yaml`."""
    name = Path(path).name
    if name in LEGACY_RULE_FILES:
        return LEGACY_RULE_FILES[name]
    lowered = name.lower()
    for prefix, family in _LEGACY_FAMILY_PREFIXES:
        if lowered.startswith(prefix):
            multi = _MULTI_GPU_RE.search(name)
            if multi is None:
                return f"{family}/single-gpu.yaml"
            count = multi.group(1)
            return f"{family}/multi-gpu-{count}.yaml" if count and count != "2" else f"{family}/multi-gpu.yaml"
    return None
