"""`load_model`: a Hugging Face MoE checkpoint with its routed experts in host RAM on the CPU operator.

Steps, none of which holds more than one experts layer beyond the expert stores:
1. read config.json and the shard headers; find the family;
2. build the model on the meta device and resolve the placement (rules or built-in defaults);
3. compute the memory plan and refuse, before loading anything, when it cannot fit;
4. load the non-expert tensors to their devices;
5. stream the expert tensors layer by layer into the expert stores (`KTExperts`), dequantizing FP8; with several
   ranks on the node (torchrun), local rank 0 streams them into one file in host memory that every rank of the
   node maps (FP8 stores with their block scales), and the other ranks read no expert tensor
   (kt_core/distributed/shared_store.py);
6. tie weights, check that nothing is missing, hook activations across devices.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from kt_core.architectures import Architecture, get_architecture
from kt_core.distributed import SharedExperts, local_ranks
from kt_core.distributed.shared_packs import share_packed_weights
from kt_core.distributed.shared_store import DEFAULT_FOLDER
from kt_core.loading.checkpoint import Checkpoint, CheckpointError
from kt_core.loading.fp8 import (
    dequantize_fp8_blockwise,
    expert_scale_shapes,
    expert_store_dtype,
    fp8_block_size,
    write_fp8_expert,
)
from kt_core.loading.keys import CheckpointMap, ExpertTensor, map_checkpoint
from kt_core.loading.memory import MemoryPlan, expert_store_bytes
from kt_core.loading.meta import build_meta_model, set_tensor, still_on_meta
from kt_core.loading.multi_gpu import device_boundaries, install_device_hooks
from kt_core.loading.packed_int import PACKED_SUFFIX, dequantize_packed, packed_args
from kt_core.placement import (
    PlacementPlan,
    PlacementRule,
    RuleError,
    default_rules,
    load_rules,
    resolve_placement,
)

__all__ = ["apply_devices", "load_model", "plan_memory", "resolve_devices", "resolve_rules"]

logger = logging.getLogger(__name__)

_STORE_DTYPES = (torch.bfloat16, torch.float32)


def resolve_devices(device: str | torch.device | Sequence[str] | None) -> list[str]:
    """Normalizes `device` into a list; None means this rank's GPU when there is one (cuda:0 for a single process,
    cuda:LOCAL_RANK under torchrun, as the Trainer picks it), else cpu."""
    if device is None:
        if not torch.cuda.is_available():
            return ["cpu"]
        return [f"cuda:{local_ranks().rank % torch.cuda.device_count()}"]
    devices = [str(device)] if isinstance(device, (str, torch.device)) else [str(d) for d in device]
    if not devices:
        raise ValueError("device: give at least one device")
    for d in devices:
        dev = torch.device(d)
        if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
            raise ValueError(f"device {d!r}: CUDA is not available here ({torch.cuda.device_count()} GPUs visible)")
    return devices


def resolve_rules(rules, arch: Architecture, devices: Sequence[str]) -> list[PlacementRule]:
    """Rules from None (the family's defaults), a YAML path / shipped or legacy name, or a list."""
    if rules is None:
        return default_rules(arch, devices)
    if isinstance(rules, (str, Path)):
        return load_rules(rules)
    return list(rules)


def plan_placement(model: nn.Module, rules, arch: Architecture, devices: Sequence[str], *, kernel, cpu_infer):
    """The placement plan of `model` (rules resolved as in resolve_rules), experts options attached.

    Raises:
        RuleError: the caller's rules put no routed-experts module on an expert backend (the model would run
            without CPU experts and without expert LoRA), or place something on a CUDA device this machine
            does not have; the message names the rule file (and rule).
    """
    plan = resolve_placement(
        model,
        resolve_rules(rules, arch, devices),
        arch=arch,
        default_device=devices[0],
        devices=devices,
        expert_options={"kernel": kernel, "cpu_infer": cpu_infer},
    )
    source = str(rules) if isinstance(rules, (str, Path)) else "the placement rules given"
    _check_rule_devices(plan, arch, source)
    if rules is not None:
        _check_experts_placed(model, plan, arch, source)
    return plan


def _check_rule_devices(plan: PlacementPlan, arch: Architecture, source: str) -> None:
    """A rule naming a GPU this machine lacks fails here, by name, rather than inside torch's `.to()`."""
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for device in dict.fromkeys([*plan.used_devices(), *plan.layer_devices]):
        dev = torch.device(device)
        if dev.type != "cuda" or (dev.index or 0) < visible:
            continue
        where = plan.device_sources.get(device, source)
        have = "no CUDA device (torch.cuda.is_available() is False)" if not visible else f"{visible} CUDA device(s)"
        raise RuleError(
            f"{where}: device {device!r}, but this machine has {have}. Use rules written for it, e.g. "
            f"rules/{arch.name}/cpu-only.yaml without a GPU."
        )


def _check_experts_placed(model: nn.Module, plan: PlacementPlan, arch: Architecture, source: str) -> None:
    """Rules that leave every experts module to Hugging Face's code are a mistake, not a placement."""
    if plan.experts:
        return
    from kt_core.placement import list_expert_backends

    backends = tuple(list_expert_backends().values())
    experts = [name for name, _ in model.named_modules() if arch.is_experts_module(name)]
    if any(isinstance(model.get_submodule(name), backends) for name in experts):
        return  # converted already (a second pass over a model kt_core built)
    example = f" (its experts modules are named like {experts[0]!r})" if experts else ""
    raise RuleError(
        f"{source}: no rule puts a routed-experts module of {type(model).__name__}{example} on the CPU "
        "operator, so the model would run without CPU experts and without expert LoRA. Match the experts "
        f"with a rule (see rules/{arch.name}/cpu-only.yaml) or leave the rules out for the family's defaults."
    )


_SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def _resolve_dtype(dtype: torch.dtype | str | None, config, checkpoint: Checkpoint, fp8: bool) -> torch.dtype:
    """The caller's dtype, else the config's, else the checkpoint's floating dtype; bf16 for FP8."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if dtype is not None:
        return dtype
    if fp8:
        return torch.bfloat16
    configured = getattr(config, "dtype", None)
    if isinstance(configured, str):
        configured = getattr(torch, configured, None)
    if configured in _SAFETENSORS_DTYPES.values():
        return configured
    for info in checkpoint.tensors.values():
        if info.dtype in _SAFETENSORS_DTYPES:
            return _SAFETENSORS_DTYPES[info.dtype]
    return torch.bfloat16


def plan_memory(
    checkpoint: Checkpoint,
    model: nn.Module,
    plan: PlacementPlan,
    mapping: CheckpointMap,
    store_dtype: torch.dtype,
) -> MemoryPlan:
    """Bytes per device and in host RAM that loading will use (from shapes only)."""
    memory = MemoryPlan()
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if plan.expert_module_of(name) is not None:
            continue
        device = plan.device_of(name)
        memory.device_bytes[device] = memory.device_bytes.get(device, 0) + t.numel() * t.element_size()
    for name in plan.experts:
        E, two_I, H = model.get_submodule(name).gate_up_proj.shape
        memory.expert_bytes += expert_store_bytes(E, H, two_I // 2, store_dtype, fp8_block_size(checkpoint.config_dict))
    for tensors in mapping.experts.values():
        layer = sum(checkpoint.tensors[t.key].nbytes for t in tensors)
        memory.staging_bytes = max(memory.staging_bytes, layer)
    return memory


def load_model(
    path: str | Path,
    *,
    device: str | torch.device | Sequence[str] | None = None,
    rules: str | Path | Sequence[PlacementRule] | None = None,
    kernel: str = "auto",
    cpu_infer: int | None = None,
    gpu_memory_limit: int | str | Mapping[str, int | str] | None = None,
    host_memory_limit: int | str | None = None,
    dtype: torch.dtype | str | None = None,
    progress: bool = True,
    config=None,
    shared_experts: bool | str | Path | None = None,
    expert_dtype: torch.dtype | str | None = None,
) -> nn.Module:
    """Loads a local MoE checkpoint with its routed experts on the CPU operator.

    Args:
        path: checkpoint folder (config.json, safetensors shards, index).
        device: target of the non-expert tensors: "cuda:0", "cpu", or a list of devices to split the
            decoder layers over. None: cuda:0 when there is a GPU, else cpu.
        rules: placement rules: None for the family's defaults, a YAML file (ours, a KTransformers one,
            or a legacy name such as "DeepSeek-V3-Chat-sft-amx-multi-gpu.yaml"), or a list of rules.
        kernel: CPU kernel of the experts ("auto", "avx512_bf16", ..., "torch").
        cpu_infer: CPU threads of the experts operator; None keeps the pool's default.
        gpu_memory_limit: bytes usable per GPU ("70GiB", or {device: size}); None: CUDA's free memory.
        host_memory_limit: bytes of host RAM usable; None: MemAvailable.
        dtype: weight dtype; None: the checkpoint's (bf16 for FP8 checkpoints). Expert stores are
            bf16 unless this is fp32.
        progress: show a progress bar.
        config: a transformers config to build the model from instead of the checkpoint's config.json
            (a host framework that patched it, e.g. attention implementation or use_cache).
        shared_experts: with several ranks on this node (torchrun's LOCAL_WORLD_SIZE > 1), the expert weights
            live once per node in a file that every rank maps: None or True puts it in /dev/shm, a folder puts
            it there (host memory, e.g. a tmpfs or hugetlbfs mount, keeps it off the disk), False gives every
            rank its own copy. Ignored with one rank per node.
        expert_dtype: the routed experts' dtype in host RAM. None: `dtype`'s (bf16 for FP8 checkpoints, whose
            experts are dequantized at load). "fp8" (torch.float8_e4m3fn) keeps an FP8 checkpoint's experts as
            shipped: half the host RAM, computed by kt_core.kernels.fp8_kernels() and streamed as FP8.
            kt_core/loading/fp8.py: expert_store_dtype.

    Returns:
        The transformers model (eval mode) whose experts modules are expert-backend modules.

    Raises:
        UnknownArchitectureError, CheckpointError, RuleError, MemoryPlanError: with what to fix.
    """
    devices = resolve_devices(device)
    with Checkpoint(path) as checkpoint:
        arch = get_architecture(checkpoint.config_dict)
        fp8_block = fp8_block_size(checkpoint.config_dict)
        dequantized = fp8_block is not None or _packed_args(checkpoint) is not None  # to bf16 as it is read
        config_dict = {
            k: v for k, v in checkpoint.config_dict.items() if not (dequantized and k == "quantization_config")
        }
        config = arch.build_config(config_dict) if config is None else config
        dtype = _resolve_dtype(dtype, config, checkpoint, fp8_block is not None)
        store_dtype = dtype if dtype in _STORE_DTYPES else torch.bfloat16
        store_dtype = expert_store_dtype(expert_dtype, fp8_block is not None, kernel, store_dtype)
        model = build_meta_model(config, dtype)
        plan = plan_placement(model, rules, arch, devices, kernel=kernel, cpu_infer=cpu_infer)
        mapping = map_checkpoint(checkpoint, model, arch)
        memory = plan_memory(checkpoint, model, plan, mapping, store_dtype)
        memory.check(gpu_memory_limit=gpu_memory_limit, host_memory_limit=host_memory_limit)
        logger.info("%s: %s", checkpoint.path.name, memory)
        shared = _open_shared(checkpoint, model, plan, mapping, store_dtype, shared_experts, fp8_block)

        total = sum(checkpoint.tensors[k].nbytes for k in mapping.tensors.values())
        total += sum(checkpoint.tensors[t.key].nbytes for ts in mapping.experts.values() for t in ts)
        with tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            desc=f"Loading {checkpoint.path.name}",
            disable=not progress,
        ) as bar:
            for name, key in mapping.tensors.items():
                target = _meta_tensor(model, name)
                tensor = _read(checkpoint, key, mapping.scales.get(key), fp8_block, plan.device_of(name))
                set_tensor(model, name, tensor.to(plan.device_of(name), target.dtype))
                bar.update(checkpoint.tensors[key].nbytes)
            for module_name, tensors in mapping.experts.items():  # layer by layer
                _stream_experts(model, module_name, tensors, checkpoint, plan, fp8_block, store_dtype, config, shared)
                bar.update(sum(checkpoint.tensors[t.key].nbytes for t in tensors))
        if shared is not None:
            shared.publish()
    _finish(model, plan, str(path))
    if shared is not None:  # the packed kernels' copy of the experts, once per node too
        share_packed_weights(model, shared)
    _expect_peft()
    return model


def _open_shared(checkpoint, model, plan, mapping, dtype, option, fp8_block=None) -> SharedExperts | None:
    """The node's shared expert file (kt_core/distributed/shared_store.py), or None: one rank per node, the
    caller's shared_experts=False, or no layer on a KTExperts store. FP8 stores (dtype float8_e4m3fn) keep their
    fp32 block scales there too, beside the e4m3 weights."""
    from kt_core.experts import KTExperts

    if option is False or not local_ranks().shared:
        return None
    if not (option is None or option is True or isinstance(option, (str, Path))):
        raise ValueError(f"shared_experts: got {option!r}, expected None, True, False or a folder path")
    folder = DEFAULT_FOLDER if option is None or option is True else Path(option)
    shapes = {}
    for name in mapping.experts:
        placement = plan.experts.get(name)
        if placement is None or not issubclass(placement.cls, KTExperts):
            continue
        E, two_I, H = model.get_submodule(name).gate_up_proj.shape
        shapes[name] = {"gate_up_proj": ((E, two_I, H), dtype), "down_proj": ((E, H, two_I // 2), dtype)}
        if dtype == torch.float8_e4m3fn:  # the block scales, shaped as KTExperts.fp8_scale_shape
            gate_up_scales, down_scales = expert_scale_shapes(E, H, two_I // 2, fp8_block)
            shapes[name]["gate_up_proj_scale_inv"] = (gate_up_scales, torch.float32)
            shapes[name]["down_proj_scale_inv"] = (down_scales, torch.float32)
    config_file = checkpoint.path / "config.json"
    key = f"{checkpoint.path.resolve()}|{config_file.stat().st_mtime_ns}|{dtype}"
    if dtype == torch.float8_e4m3fn:
        key += f"|block={fp8_block[0]}x{fp8_block[1]}"
    return SharedExperts.open(folder, key, shapes)


def _expect_peft() -> None:
    """The model's KTExperts may be wrapped by the user's `get_peft_model` next: no false PEFT warning."""
    from kt_core.peft import ignore_peft_layer_warning

    ignore_peft_layer_warning()


def _meta_tensor(model: nn.Module, name: str) -> torch.Tensor:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    return module._parameters.get(attr) if attr in module._parameters else module._buffers[attr]


def _read(checkpoint: Checkpoint, key: str, scale_key: str | None, block, device: str) -> torch.Tensor:
    if key.endswith(".weight" + PACKED_SUFFIX):
        return _read_packed(checkpoint, key)
    tensor = checkpoint.get(key)
    if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        if scale_key is None:
            raise CheckpointError(f"{checkpoint.tensors[key].file}: FP8 tensor {key} has no {key}_scale_inv")
        scale = checkpoint.get(scale_key)
        compute = device if torch.device(device).type == "cuda" else "cpu"
        tensor = dequantize_fp8_blockwise(tensor.to(compute), scale, block or (128, 128))
    return tensor


def _packed_args(checkpoint: Checkpoint):
    try:
        return packed_args(checkpoint.config_dict)
    except ValueError as exc:
        raise CheckpointError(f"{checkpoint.path / 'config.json'}: {exc}") from None


def _read_packed(checkpoint: Checkpoint, key: str) -> torch.Tensor:
    """A compressed-tensors pack-quantized weight, dequantized to bf16 (kt_core/loading/packed_int.py)."""
    where = f"{checkpoint.tensors[key].file}: {key}"
    args = _packed_args(checkpoint)
    if args is None:
        raise CheckpointError(f"{where} is packed, but config.json has no pack-quantized quantization_config")
    stem = key.removesuffix(PACKED_SUFFIX)
    missing = [stem + s for s in ("_scale", "_shape") if stem + s not in checkpoint.tensors]
    if missing:
        raise CheckpointError(f"{where}: its companion tensor(s) {', '.join(missing)} are missing")
    try:
        shape = checkpoint.get(stem + "_shape").tolist()
        return dequantize_packed(checkpoint.get(key), checkpoint.get(stem + "_scale"), shape, args)
    except ValueError as exc:
        raise CheckpointError(f"{where}: {exc}") from None


def _stream_experts(
    model, module_name, tensors: list[ExpertTensor], checkpoint, plan, fp8_block, dtype, config, shared=None
):
    """Reads one layer's expert tensors into its store (a backend module, or HF's module kept on a GPU).

    With a node's shared file (`shared`), the store's weights are views of it: local rank 0 reads the tensors
    into them, the other ranks find them written and read nothing.
    """
    hf_experts = model.get_submodule(module_name)
    E, two_I, H = hf_experts.gate_up_proj.shape
    I = two_I // 2
    placement = plan.experts.get(module_name)
    if placement is not None:
        options = {"hidden_act": getattr(config, "hidden_act", "silu"), **placement.options}
        if dtype == torch.float8_e4m3fn:
            options["weight_block_size"] = fp8_block
        store = placement.cls(E, H, I, dtype=dtype, **options)
        if shared is not None and module_name in shared:
            for name, view in shared.tensors(module_name).items():
                setattr(store, name, nn.Parameter(view, requires_grad=False))
            if not shared.writer:  # local rank 0 read this layer into the shared file
                parent_name, _, attr = module_name.rpartition(".")
                setattr(model.get_submodule(parent_name), attr, store)
                return
    else:  # experts kept as Hugging Face's module: materialize its fused parameters on their device
        device = plan.device_of(module_name)
        for attr in ("gate_up_proj", "down_proj"):
            old = getattr(hf_experts, attr)
            set_tensor(model, f"{module_name}.{attr}", torch.empty(old.shape, dtype=old.dtype, device=device))
        store = hf_experts
    seen: set[tuple[int | None, str]] = set()
    for t in tensors:
        where = f"{checkpoint.tensors[t.key].file.name}: {t.key}"
        if getattr(store, "is_fp8", False):  # kept as shipped
            scale = checkpoint.get(t.scale_key) if t.scale_key else None
            write_fp8_expert(store, t.proj, t.expert, checkpoint.get(t.key), scale, where)
        else:
            _write_expert(store, t, _read(checkpoint, t.key, t.scale_key, fp8_block, "cpu"), I, where)
        seen.add((t.expert, t.proj))
    _check_complete(module_name, seen, E, checkpoint.path)
    if placement is not None:
        parent_name, _, attr = module_name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, store)


def _write_expert(store: nn.Module, t: ExpertTensor, value: torch.Tensor, I: int, where: str) -> None:
    with torch.no_grad():
        if t.expert is None:
            target = store.gate_up_proj if t.proj == "gate_up" else store.down_proj
            if tuple(value.shape) != tuple(target.shape) and value.dim() == 3:
                value = value.transpose(1, 2)  # fused and transposed ([E, H, 2I]), as some exports store it
            if tuple(value.shape) != tuple(target.shape):
                raise CheckpointError(f"{where}: shape {tuple(value.shape)}, expected {tuple(target.shape)}")
            target.copy_(value)
            return
        expected = (I, store.gate_up_proj.shape[-1]) if t.proj != "down" else tuple(store.down_proj.shape[1:])
        if tuple(value.shape) != expected:
            raise CheckpointError(f"{where}: shape {tuple(value.shape)}, expected {expected}")
        if hasattr(store, "load_expert_"):
            store.load_expert_(t.expert, **{t.proj: value})
        elif t.proj == "down":
            store.down_proj[t.expert].copy_(value)
        else:
            rows = slice(0, I) if t.proj == "gate" else slice(I, 2 * I)
            store.gate_up_proj[t.expert, rows].copy_(value)


def _check_complete(module_name: str, seen: set, num_experts: int, path: Path) -> None:
    if {(None, "gate_up"), (None, "down")} <= seen:
        return
    missing = [
        f"{module_name}.{e}.{proj}"
        for e in range(num_experts)
        for proj in ("gate", "up", "down")
        if (e, proj) not in seen and (None, "gate_up" if proj != "down" else "down") not in seen
    ]
    if missing:
        raise CheckpointError(
            f"{path}: {len(missing)} expert weights missing, e.g. {', '.join(missing[:3])} "
            "(an incomplete download, or a checkpoint of another model?)"
        )


def apply_devices(model: nn.Module, plan: PlacementPlan, *, skip: tuple[type, ...] = ()) -> list:
    """Moves each non-expert tensor to its planned device and hooks activations across devices.

    Returns:
        The hook handles (empty on a single device).
    """
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if plan.expert_module_of(name) is not None or t.device.type == "meta":
            continue
        device = torch.device(plan.device_of(name))
        if t.device != device:
            moved = t.data.to(device) if isinstance(t, nn.Parameter) else t.to(device)
            set_tensor(model, name, moved)
    if len(plan.used_devices()) <= 1 and not plan.layer_devices:  # a split is hooked even on one device
        return []
    boundaries, return_outputs = device_boundaries(
        model, layers_path=plan.layers_path, placed=plan.devices, experts=list(plan.experts)
    )
    return install_device_hooks(model, boundaries, return_outputs=return_outputs, skip=skip)


def _finish(model: nn.Module, plan: PlacementPlan, path: str) -> None:
    missing = set(still_on_meta(model))
    if missing:
        model.tie_weights(missing_keys=missing, recompute_mapping=True)
    missing = still_on_meta(model)
    if missing:
        raise CheckpointError(
            f"{path}: {len(missing)} tensors of the model are not in the checkpoint, e.g. {', '.join(missing[:5])}"
        )
    backend_types = tuple({p.cls for p in plan.experts.values()})
    model.kt_device_hooks = apply_devices(model, plan, skip=backend_types)
    model.kt_placement = plan
    model.eval()
