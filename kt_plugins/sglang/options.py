"""The `--kt-experts` command-line options and their trip to SGLang's scheduler processes.

SGLang keeps only its own fields when it turns the parsed arguments into `ServerArgs` (a sealed record),
and it starts its schedulers with the `spawn` method. So the options travel as one JSON environment
variable, `KT_SGLANG_EXPERTS`, set in the launching process before any scheduler starts; every scheduler
inherits it and reads it back when it builds the model. Setting the variable by hand does the same for
`sglang.Engine(...)`, which has no command line.

The options are checked where they enter, in the launching process before any scheduler is spawned
(kt_core.settings; a JSON file of expert ids is read and checked there too), and the errors name the flag.
This module imports neither torch nor sglang: it runs in every SGLang process, for `--help` too; the
checks import kt_core (and so torch) only once `--kt-experts` is given.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

__all__ = ["ENV_VAR", "KTExpertsOptions", "add_cli_args", "options_from_args", "options_from_env"]

ENV_VAR = "KT_SGLANG_EXPERTS"

# --flag -> (field, argparse kwargs). The flags all start with --kt-experts so that `--help` groups them.
_FLAGS = {
    "--kt-experts-cpu-threads": (
        "cpu_threads",
        {
            "type": int,
            "metavar": "N",
            "help": "CPU threads computing the routed experts, the calling thread included "
            "(default: the CPUs this process may use, or KT_CPU_INFER).",
        },
    ),
    "--kt-experts-gpu-experts": (
        "gpu_experts",
        {
            "type": str,
            "metavar": "N|RATIO",
            "help": "Routed experts of each layer kept on the GPU: a count (experts 0..N-1, as SGLang's "
            "--kt-num-gpu-experts) or a ratio in [0, 1) of the layer's experts (default: 0, all on the CPU).",
        },
    ),
    "--kt-experts-gpu-expert-ids": (
        "gpu_expert_ids",
        {
            "type": str,
            "metavar": "IDS|FILE",
            "help": "Which experts stay on the GPU, instead of the first N: comma-separated ids for every "
            "layer ('0,5,17'), or a JSON file mapping layer index to a list of ids (e.g. the hottest experts "
            "measured per layer).",
        },
    ),
    "--kt-experts-kernel": (
        "kernel",
        {
            "type": str,
            "metavar": "NAME",
            "help": "CPU kernel: 'auto' (best this CPU runs) or a variant of kt_core.available_kernels() "
            "(default: auto).",
        },
    ),
    "--kt-experts-chunk-size": (
        "chunk_size",
        {
            "type": int,
            "metavar": "TOKENS",
            "help": "Tokens per CPU kernel call in long prefills; bounds scratch memory (default: whole batch).",
        },
    ),
    "--kt-experts-record-routing": (
        "record_routing",
        {
            "type": str,
            "metavar": "FILE",
            "help": "Count how often each routed expert is chosen, per layer, and write the counts to FILE every "
            "30 s and at exit; pass FILE back with --kt-experts-gpu-expert-ids and --kt-experts-gpu-experts N "
            "to keep each layer's N most routed experts on the GPU.",
        },
    ),
    "--kt-experts-lora": (
        "lora_path",
        {
            "type": str,
            "metavar": "DIR",
            "help": "PEFT adapter trained with kt-plugins: its expert LoRA (target_parameters on "
            "mlp.experts.gate_up_proj / down_proj) is applied by the CPU experts. Serve the rest of the "
            "adapter with SGLang's own --lora-paths.",
        },
    ),
    "--kt-experts-keep-host-weights": (
        "keep_host_weights",
        {
            "action": "store_true",
            "help": "Keep the CPU experts' weights in host memory beside the packed kernel's own copy (twice the "
            "host RAM). By default a packed kernel (amx_*, avx512_bf16_packed, avx512_vnni_*) packs them at load "
            "and the weights are freed: serving reads only the packed copy.",
        },
    ),
}


@dataclass(frozen=True)
class KTExpertsOptions:
    """What `--kt-experts` and its options asked for.

    Attributes:
        cpu_threads: threads of kt_core's pool; None keeps its default.
        gpu_experts: "N" (experts 0..N-1 on the GPU) or "RATIO" in [0, 1); "0" puts every expert on the CPU.
        gpu_expert_ids: comma-separated ids, a JSON file {layer: [ids]}, or a routing-counts file written by
            record_routing (each layer's gpu_experts most routed experts); overrides gpu_experts otherwise.
        kernel: kt_core kernel name or "auto".
        chunk_size: tokens per kernel call; None = whole batch.
        lora_path: PEFT adapter directory whose expert LoRA the CPU experts apply.
        record_routing: file to write the per-layer routing counts to (kt_plugins/sglang/routing.py).
        keep_host_weights: keep the CPU experts' weights beside a packed kernel's copy (KTExperts.release_host_weights
            is not called).
    """

    cpu_threads: int | None = None
    gpu_experts: str = "0"
    gpu_expert_ids: str | None = None
    kernel: str = "auto"
    chunk_size: int | None = None
    lora_path: str | None = None
    record_routing: str | None = None
    keep_host_weights: bool = False

    def __post_init__(self):
        from kt_core import settings as checks

        # Frozen: the checked values (a thread count capped at 4x the CPUs) are set through object.__setattr__.
        object.__setattr__(self, "cpu_threads", checks.cpu_threads("--kt-experts-cpu-threads", self.cpu_threads))
        if self.chunk_size is not None:
            chunk = checks.positive_int("--kt-experts-chunk-size", self.chunk_size, what="tokens per CPU kernel call")
            object.__setattr__(self, "chunk_size", chunk)
        if not isinstance(self.kernel, str) or not self.kernel:
            raise checks.SettingError(f"--kt-experts-kernel: got {self.kernel!r}, expected 'auto' or a kernel name")
        _parse_count_or_ratio(self.gpu_experts)
        if self.gpu_expert_ids is not None:
            if Path(self.gpu_expert_ids).is_file():
                _, ranked = _read_id_file(self.gpu_expert_ids)
                if ranked and _parse_count_or_ratio(self.gpu_experts) in ((0, None), (None, 0.0)):
                    raise ValueError(
                        f"--kt-experts-gpu-expert-ids {self.gpu_expert_ids}: a routing-counts file ranks the experts; "
                        "say how many of each layer stay on the GPU with --kt-experts-gpu-experts N (or a ratio)"
                    )
            else:
                _parse_ids(self.gpu_expert_ids, "--kt-experts-gpu-expert-ids")
        if self.record_routing is not None and not Path(self.record_routing).resolve().parent.is_dir():
            raise ValueError(
                f"--kt-experts-record-routing: the folder of {self.record_routing!r} does not exist (the counts are "
                "written there)"
            )
        if not isinstance(self.keep_host_weights, bool):
            got = self.keep_host_weights
            raise checks.SettingError(f"--kt-experts-keep-host-weights: got {got!r}, expected a bool")
        if self.lora_path is not None and not Path(self.lora_path).is_dir():
            raise ValueError(f"--kt-experts-lora: {self.lora_path!r} is not a directory (expected a PEFT adapter)")

    def gpu_expert_list(self, layer_idx: int, num_experts: int) -> list[int]:
        """Returns the sorted ids of the layer's experts that stay on the GPU.

        Args:
            layer_idx: the model layer (keys a JSON id file).
            num_experts: E of that layer.
        """
        if self.gpu_expert_ids is not None:
            if Path(self.gpu_expert_ids).is_file():
                per_layer, ranked = _read_id_file(self.gpu_expert_ids)
                ids = per_layer.get(layer_idx, [])
                where = f"--kt-experts-gpu-expert-ids {self.gpu_expert_ids} (layer {layer_idx})"
                if ranked:  # routing counts: the first N of the ranking, N from --kt-experts-gpu-experts
                    ids = ids[: self._gpu_count(num_experts)]
            else:
                ids, where = (
                    _parse_ids(self.gpu_expert_ids, "--kt-experts-gpu-expert-ids"),
                    "--kt-experts-gpu-expert-ids",
                )
            bad = [e for e in ids if not 0 <= int(e) < num_experts]
            if bad:
                raise ValueError(f"{where}: expert ids {bad} are out of range [0, {num_experts})")
            return sorted({int(e) for e in ids})
        return list(range(self._gpu_count(num_experts)))

    def _gpu_count(self, num_experts: int) -> int:
        count, ratio = _parse_count_or_ratio(self.gpu_experts)
        n = count if count is not None else round(ratio * num_experts)
        if n > num_experts:
            raise ValueError(f"--kt-experts-gpu-experts {n}: the layer has only {num_experts} experts")
        return n

    def to_env(self) -> str:
        """Serializes the options for ENV_VAR."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_env_value(cls, value: str) -> KTExpertsOptions:
        """Parses what `to_env` wrote; an unknown key raises (a launcher newer than this package)."""
        try:
            data = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{ENV_VAR}: not valid JSON ({exc}): {value!r}") from None
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{ENV_VAR}: unknown keys {sorted(unknown)} (known: {sorted(known)})")
        return cls(**data)


def _parse_count_or_ratio(spec: str) -> tuple[int | None, float | None]:
    """ "8" -> (8, None); "0.25" -> (None, 0.25)."""
    text = str(spec).strip()
    try:
        count = int(text)
    except ValueError:
        pass
    else:
        if count < 0:
            raise ValueError(f"--kt-experts-gpu-experts must be >= 0, got {count}")
        return count, None
    try:
        ratio = float(text)
    except ValueError:
        raise ValueError(f"--kt-experts-gpu-experts: expected a count or a ratio in [0, 1), got {spec!r}") from None
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"--kt-experts-gpu-experts: a ratio must lie in [0, 1), got {spec!r}")
    return None, ratio


def _read_id_file(path: str) -> tuple[dict[int, list[int]], bool]:
    """({layer: [expert ids]}, False) from a JSON file of the form {"0": [3, 17], "1": [5]}, or ({layer: every
    expert id, most routed first}, True) from a routing-counts file {"counts": {"0": [count per expert], ...}}
    (--kt-experts-record-routing).

    Raises:
        ValueError: naming the flag and the file: unreadable, not JSON, or not that shape.
    """
    where = f"--kt-experts-gpu-expert-ids {path}"
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{where}: cannot read the file ({exc})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f'{where}: not valid JSON ({exc}); expected {{"layer": [expert ids]}}') from None
    if not isinstance(data, dict):
        raise ValueError(f'{where}: expected a JSON object {{"layer": [expert ids]}}, got {type(data).__name__}')
    ranked = isinstance(data.get("counts"), dict)
    if ranked:
        data = {layer: _ranking(counts, f"{where}: layer {layer}") for layer, counts in data["counts"].items()}
    per_layer: dict[int, list[int]] = {}
    for layer, ids in data.items():
        if not str(layer).strip().isdigit():
            raise ValueError(f'{where}: key {layer!r} is not a layer index (expected "0", "1", ...)')
        good = isinstance(ids, list) and all(isinstance(e, int) and not isinstance(e, bool) and e >= 0 for e in ids)
        if not good:
            raise ValueError(f"{where}: layer {layer}: expected a list of expert ids (integers >= 0), got {ids!r}")
        per_layer[int(layer)] = ids
    return per_layer, ranked


def _ranking(counts, where: str) -> list[int]:
    """Expert ids by routing count, most routed first (ties: lower id first)."""
    if not isinstance(counts, list) or not all(isinstance(c, int) and c >= 0 for c in counts):
        raise ValueError(f"{where}: expected a list of routing counts (integers >= 0), got {counts!r}")
    return sorted(range(len(counts)), key=lambda e: (-counts[e], e))


def _parse_ids(text: str, flag: str) -> list[int]:
    try:
        return [int(tok) for tok in text.split(",") if tok.strip()]
    except ValueError:
        raise ValueError(f"{flag}: expected comma-separated expert ids or a JSON file, got {text!r}") from None


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    """Adds `--kt-experts` and its options to SGLang's parser (skipping any that SGLang itself defines)."""
    taken = getattr(parser, "_option_string_actions", {})
    if "--kt-experts" in taken:
        return  # registered already (the hook ran twice) or SGLang grew a flag of that name
    group = parser.add_argument_group(
        "kt-plugins CPU experts",
        "Compute each MoE layer's routed experts on the CPU with kt-plugins' operator, weights read from "
        "--model-path as they are (no conversion step).",
    )
    group.add_argument(
        "--kt-experts",
        action="store_true",
        help="Turn the CPU experts backend on (routed experts computed by kt-plugins on the CPU).",
    )
    defaults = {f.name: f.default for f in fields(KTExpertsOptions)}  # no instance: `--help` checks nothing
    for flag, (field, kwargs) in _FLAGS.items():
        if flag not in taken:
            group.add_argument(flag, dest=f"kt_experts_{field}", default=defaults[field], **kwargs)


def options_from_args(args: argparse.Namespace) -> KTExpertsOptions | None:
    """Returns the options when `--kt-experts` was given, else None."""
    if not getattr(args, "kt_experts", False):
        return None
    defaults = {f.name: f.default for f in fields(KTExpertsOptions)}
    values = {field: getattr(args, f"kt_experts_{field}", defaults[field]) for field, _ in _FLAGS.values()}
    return KTExpertsOptions(**values)


def options_from_env(environ: dict | None = None) -> KTExpertsOptions | None:
    """Returns the options the launching process exported, or None when `--kt-experts` is off."""
    value = (environ if environ is not None else os.environ).get(ENV_VAR)
    return KTExpertsOptions.from_env_value(value) if value else None
