"""FSDP2 with the routed experts in host memory: the experts and their LoRA factors stay out of FSDP2's sharding
(its ignored_params), the factors' gradients are averaged by ExpertLoraAverager, the FSDP settings we do not run
are refused, naming the setting.

The two-rank run drives the stock Trainer (`fsdp="full_shard"`, `fsdp_config={"fsdp_version": 2}`) over gloo on
the CPU, through accelerate's own FSDP2 preparation (fully_shard with the plugin's ignored_modules, no_sync() by
set_requires_gradient_sync, FSDP2 gradient clipping). accelerate (1.11) turns FSDP on for GPU-type runs only (on
the CPU an Accelerator given an FSDP plugin runs DDP), so the training script gives the CPU run the state accelerate
gives a GPU run (`tests.distributed_helpers.fsdp_on_the_cpu`); the GPU test runs the same script unchanged over NCCL.
Legend of a report: losses / grad_norms = the Trainer's logged loss and gradient norm before clipping, per step;
reductions / broadcasts = the averager's all_reduce calls (one per optimizer step) and broadcasts of the factors
from rank 0 (one); sharded / unsharded = parameter names that are / are not DTensors after accelerate.prepare.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from kt_core.distributed import fsdp_ignored_params, prepare_data_parallel, prepare_fsdp2
from kt_core.distributed.fsdp import check_fsdp_plugin
from kt_core.settings import SettingError
from tests.distributed_helpers import fsdp_on_the_cpu, launch, peft_model_with_expert_lora, run_rank
from tests.test_distributed import _counting_all_reduce, _tiny_with_expert_lora

STEPS = 4
GLOBAL_BATCH = 4
CLIP = 0.02

pytestmark = pytest.mark.filterwarnings("ignore:Unsupported layer type")


def _run(checkpoint: Path, out: Path, *, ranks: int, fsdp: bool, accumulate: int = 1, device: str = "cpu") -> dict:
    hide_gpus = {"CUDA_VISIBLE_DEVICES": ""} if device == "cpu" else {}  # a CPU run's mesh on a GPU machine: cpu
    done = launch(__file__, [checkpoint, out, int(fsdp), accumulate, device], ranks=ranks, env=hide_gpus,
                  torchrun=fsdp or None)  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    report["log"] = done.stdout + done.stderr
    return report


def _factors(out: Path, rank: int) -> dict[str, torch.Tensor]:
    return torch.load(out / f"factors-{rank}.pt")


def _check_two_ranks(one: dict, two: dict, out: Path) -> None:
    assert len(one["losses"]) == len(two["losses"]) == STEPS
    assert one["losses"][-1] != one["losses"][0]  # the curve moves: the comparison means something
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(two["grad_norms"]), torch.tensor(one["grad_norms"]), rtol=1e-5, atol=0)
    assert two["engine"] == "FSDP2" and two["world_size"] == 2
    assert two["reductions"] == STEPS and two["broadcasts"] == 1  # once per optimizer step, not per micro-batch
    # The experts are not sharded: every tensor of theirs is whole on each rank; the attention LoRA is FSDP2's.
    assert two["expert_tensors"] and not set(two["expert_tensors"]) & set(two["sharded"])
    assert any(".self_attn." in n and "lora_A" in n for n in two["sharded"])
    # The factors (trained, so moved from their start) are the same on both ranks, bit for bit.
    first, second = _factors(out, 0), _factors(out, 1)
    assert first.keys() == second.keys() and len(first) == 16  # 2 layers x 4 factors x (value, gradient)
    for name in first:
        torch.testing.assert_close(first[name], second[name], rtol=0, atol=0, msg=name)
    assert "FSDP2 leaves the 2 routed-experts modules unsharded (ignored_params)" in two["log"]


def test_fsdp2_two_ranks_match_one_process(tmp_path):
    from tests.tiny_models import build_tiny_model, save_fused_checkpoint

    save_fused_checkpoint(build_tiny_model("qwen3_moe", num_layers=2), tmp_path / "ckpt")
    one = _run(tmp_path / "ckpt", tmp_path / "one", ranks=1, fsdp=False)
    two = _run(tmp_path / "ckpt", tmp_path / "two", ranks=2, fsdp=True)
    _check_two_ranks(one, two, tmp_path / "two")


def test_fsdp2_two_ranks_with_accumulation_and_clipping(tmp_path):
    """Two micro-batches per step (accelerate's no_sync() = FSDP2's set_requires_gradient_sync(False) on the first)
    and the norm clipped on every step: the norms agree only when the factors are averaged on the last micro-batch,
    before the Trainer clips, and counted once (not per rank) in the clipped norm."""
    from tests.tiny_models import build_tiny_model, save_fused_checkpoint

    save_fused_checkpoint(build_tiny_model("qwen3_moe", num_layers=2), tmp_path / "ckpt")
    one = _run(tmp_path / "ckpt", tmp_path / "one", ranks=1, fsdp=False, accumulate=2)
    two = _run(tmp_path / "ckpt", tmp_path / "two", ranks=2, fsdp=True, accumulate=2)
    assert min(one["grad_norms"]) > 5 * CLIP  # every step clipped: the norm decides the update
    _check_two_ranks(one, two, tmp_path / "two")


@pytest.mark.gpu
def test_fsdp2_two_gpus_match_one_gpu(tmp_path):
    """The same run on two GPUs (NCCL for FSDP2, gloo for the factors), accelerate unchanged."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA GPUs")
    from tests.tiny_models import build_tiny_model, save_fused_checkpoint

    save_fused_checkpoint(build_tiny_model("qwen3_moe", num_layers=2), tmp_path / "ckpt")
    one = _run(tmp_path / "ckpt", tmp_path / "one", ranks=1, fsdp=False, accumulate=2, device="cuda")
    two = _run(tmp_path / "ckpt", tmp_path / "two", ranks=2, fsdp=True, accumulate=2, device="cuda")
    _check_two_ranks(one, two, tmp_path / "two")


@pytest.mark.gpu
def test_fsdp2_on_one_gpu_keeps_the_experts_in_host_memory(tmp_path):
    """torchrun with one rank over NCCL: the Trainer moves the model to the GPU and FSDP2 shards it, the routed
    experts' weights stay in host memory (their LoRA factors too), and the curve is the plain one-GPU run's."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from tests.tiny_models import build_tiny_model, save_fused_checkpoint

    save_fused_checkpoint(build_tiny_model("qwen3_moe", num_layers=2), tmp_path / "ckpt")
    plain = _run(tmp_path / "ckpt", tmp_path / "plain", ranks=1, fsdp=False, device="cuda")
    fsdp = _run(tmp_path / "ckpt", tmp_path / "fsdp", ranks=1, fsdp=True, device="cuda")
    assert fsdp["engine"] == "FSDP2" and fsdp["world_size"] == 1
    for report in (plain, fsdp):
        assert report["expert_devices"] == ["cpu"], report["expert_devices"]
        assert report["attention_devices"] == ["cuda:0"], report["attention_devices"]
    assert plain["losses"][-1] != plain["losses"][0]
    torch.testing.assert_close(torch.tensor(fsdp["losses"]), torch.tensor(plain["losses"]), rtol=2e-3, atol=0)


# ---- one rank: the hook-up and the refusals ----------------------------------------------------------------------


def _shard(model, **kwargs):
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer, **kwargs)
    return fully_shard(model, **kwargs)


def test_fsdp2_leaves_the_experts_whole_and_averages_once_per_step(one_rank_group):
    """fully_shard by hand with fsdp_ignored_params: the experts stay plain host tensors; two steps of two
    micro-batches (set_requires_gradient_sync(False) on the first) give one broadcast and one all_reduce per step."""
    from torch.distributed.tensor import DTensor

    from kt_core import KTExperts

    model = _tiny_with_expert_lora().train()
    averager = prepare_data_parallel(model)
    experts = [m for m in model.modules() if isinstance(m, KTExperts)]
    ignored = fsdp_ignored_params(model)
    assert ignored == {p for m in experts for p in m.parameters()} and len(ignored) == 12
    ids = torch.randint(3, 64, (4, 2, 8), generator=torch.Generator().manual_seed(0))
    _shard(model, ignored_params=ignored)
    assert all(not isinstance(p, DTensor) for p in ignored)
    assert isinstance(model.model.layers[0].self_attn.q_proj.weight, DTensor)
    with _counting_all_reduce() as calls:
        for step in range(2):
            model.set_requires_gradient_sync(False)
            model(input_ids=ids[2 * step], labels=ids[2 * step]).loss.backward()
            model.set_requires_gradient_sync(True)
            assert averager.reductions == step  # accumulating: nothing reduced
            model(input_ids=ids[2 * step + 1], labels=ids[2 * step + 1]).loss.backward()
            assert averager.reductions == step + 1
            model.zero_grad(set_to_none=True)
    assert averager.broadcasts == 1
    assert calls.count(sum(p.numel() for p in averager.factors)) == 2


def test_fsdp2_sharding_the_experts_is_refused_at_the_first_forward(one_rank_group):
    model = _tiny_with_expert_lora().train()
    prepare_data_parallel(model)
    ids = torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    _shard(model)
    with pytest.raises(SettingError, match=r"FSDP2 ignored_params: FSDP2 shards 12 tensors of the routed experts"):
        model(input_ids=ids, labels=ids)


def test_fsdp2_cpu_offload_is_refused_at_the_first_forward(one_rank_group):
    from torch.distributed.fsdp import CPUOffloadPolicy

    model = _tiny_with_expert_lora().train()
    prepare_data_parallel(model)
    ids = torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    _shard(model, ignored_params=fsdp_ignored_params(model), offload_policy=CPUOffloadPolicy(pin_memory=False))
    with pytest.raises(SettingError, match=r"FSDP cpu_offload: got CPUOffloadPolicy"):
        model(input_ids=ids, labels=ids)


@pytest.mark.gpu
def test_fsdp1_is_refused_at_the_first_forward(one_rank_group):
    """FSDP1 wraps modules on an accelerator only ("FSDP needs a non-CPU accelerator device" on the CPU)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    model = _tiny_with_expert_lora().train()
    prepare_data_parallel(model)
    ids = torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    attn = model.model.layers[0].self_attn
    model.model.layers[0].self_attn = FullyShardedDataParallel(attn, device_id=torch.cuda.current_device())
    with pytest.raises(SettingError, match=r"FSDP fsdp_version: got 1 \(FullyShardedDataParallel"):
        model(input_ids=ids, labels=ids)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"fsdp_version": 1}, r"FSDP fsdp_version: got 1, expected 2\..*fsdp_config=\{\"fsdp_version\": 2\}"),
        ({"cpu_offload": True}, r"FSDP cpu_offload: got True, expected False\..*FSDP_OFFLOAD_PARAMS=false"),
        ({"cpu_ram_efficient_loading": True}, r"FSDP cpu_ram_efficient_loading: got True, expected False\."),
    ],
)
def test_accelerate_fsdp_settings_we_do_not_run_are_refused(setting, message):
    plugin = SimpleNamespace(**{"fsdp_version": 2, "cpu_offload": False, "cpu_ram_efficient_loading": False, **setting})
    with pytest.raises(SettingError, match=message):
        check_fsdp_plugin(plugin)
    with pytest.raises(SettingError, match=message):
        prepare_fsdp2(_tiny_with_expert_lora(), plugin)


def test_per_mesh_clipping_takes_the_host_gradients(one_rank_group):
    """Newer accelerate clips under FSDP2 one device mesh at a time (Accelerator._clip_grad_norm_dtensor_aware),
    which cannot take the factors' plain host gradients beside DTensor ones; wrapped, the total norm and the clipped
    gradients are torch.nn.utils.clip_grad_norm_'s over all of them."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor
    from torch.distributed.tensor.experimental import implicit_replication

    from kt_core.distributed.fsdp import clip_with_host_gradients

    def per_mesh(self, parameters, max_norm, norm_type=2):  # stand-in for accelerate 1.16's signature
        if not all(isinstance(p.grad, DTensor) for p in parameters):
            raise RuntimeError("Expected all tensors to be on the same device")
        total = torch.nn.utils.get_total_norm([p.grad.full_tensor() for p in parameters], norm_type)
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total)
        return total

    g = torch.Generator().manual_seed(0)
    shapes = [(6, 5), (7,), (3, 4), (9,)]  # two FSDP2 parameters, then two host factors
    values = [torch.randn(s, generator=g) for s in shapes]
    grads = [torch.randn(s, generator=g) * (i + 1) for i, s in enumerate(shapes)]
    reference = [torch.nn.Parameter(v.clone()) for v in values]
    for p, grad in zip(reference, grads, strict=True):
        p.grad = grad.clone()
    expected = torch.nn.utils.clip_grad_norm_(reference, max_norm=0.5)
    mesh = init_device_mesh("cpu", (1,))
    params = []
    for i, (v, grad) in enumerate(zip(values, grads, strict=True)):
        p = torch.nn.Parameter(distribute_tensor(v, mesh, [Shard(0)]) if i < 2 else v.clone())
        p.grad = distribute_tensor(grad, mesh, [Shard(0)]) if i < 2 else grad.clone()
        params.append(p)
    with implicit_replication():
        with pytest.raises(RuntimeError, match="same device"):
            per_mesh(None, params, 0.5)
        clip = clip_with_host_gradients(per_mesh)
        norm = clip(None, params, float("inf"))
        assert torch.allclose(norm, torch.linalg.vector_norm(torch.cat([x.flatten() for x in grads])))
        total = clip(None, params, 0.5)
    assert torch.allclose(total, expected)
    for p, ref in zip(params, reference, strict=True):
        got = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        torch.testing.assert_close(got, ref.grad)


def test_trainer_mixed_mesh_clipping_scales_each_gradient_on_its_device():
    """transformers >= 5.17 clips mixed DTensor / plain gradients itself (Trainer._mixed_mesh_grad_norm) and scales
    the plain ones in place by a GPU scalar, which host gradients refuse; wrapped, the total is its own and every
    gradient is scaled as torch.nn.utils.clip_grad_norm_ scales it."""
    from kt_core.distributed.fsdp import clip_mixed_mesh_on_each_device

    def mixed_mesh(self, model, max_norm):  # stand-in: the norm it computes, the in-place scaling it cannot do
        total = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
        if max_norm != float("inf"):
            raise RuntimeError("Expected all tensors to be on the same device")
        return total

    g = torch.Generator().manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 3), nn.Linear(3, 2))
    reference = nn.Sequential(nn.Linear(5, 3), nn.Linear(3, 2))
    for p, ref in zip(model.parameters(), reference.parameters(), strict=True):
        p.grad = torch.randn(p.shape, generator=g) * 3
        ref.grad = p.grad.clone()
    expected = torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm=0.5)
    clip = clip_mixed_mesh_on_each_device(mixed_mesh)
    total = clip(None, model, 0.5)
    torch.testing.assert_close(total, expected)
    for p, ref in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, ref.grad)


def test_prepare_fsdp2_adds_the_experts_to_accelerates_ignored_modules():
    from kt_core import KTExperts

    model = _tiny_with_expert_lora()
    own = model.model.embed_tokens
    plugin = SimpleNamespace(fsdp_version=2, cpu_offload=False, cpu_ram_efficient_loading=False, ignored_modules=[own])
    averager = prepare_fsdp2(model, plugin)
    assert averager is model.kt_lora_averager
    experts = [m for m in model.modules() if isinstance(m, KTExperts)]
    assert plugin.ignored_modules == [own, *experts]
    prepare_fsdp2(model, plugin)  # idempotent
    assert plugin.ignored_modules == [own, *experts]
    assert prepare_fsdp2(model) is None  # no accelerator running FSDP in this process: nothing to do


# ---- the training script (one process, or each torchrun worker) ---------------------------------------------------


def _train(checkpoint: str, out: str, fsdp: str, accumulate: str, device: str) -> None:
    import logging

    import torch.distributed as dist
    import transformers
    from torch.distributed.tensor import DTensor

    from kt_core import KTExperts
    from kt_plugins.hf_trainer import KTCallback
    from tests.tiny_models import token_dataset, trainer_args

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    on_cpu = device == "cpu"
    if fsdp == "1" and on_cpu:
        fsdp_on_the_cpu()
    model = peft_model_with_expert_lora(checkpoint)
    micro_batches = int(accumulate)
    fsdp_args = (
        {"fsdp": "full_shard", "fsdp_config": {"fsdp_version": 2, "reshard_after_forward": True}} if fsdp == "1" else {}
    )
    args = trainer_args(
        out,
        max_steps=STEPS,
        per_device_train_batch_size=GLOBAL_BATCH // world // micro_batches,
        gradient_accumulation_steps=micro_batches,
        max_grad_norm=CLIP if micro_batches > 1 else 1.0,
        logging_steps=1,
        use_cpu=on_cpu,
        ddp_backend=("gloo" if on_cpu else "nccl") if world > 1 else None,
        **fsdp_args,
    )
    factors: dict[str, torch.Tensor] = {}

    class LastGradients(transformers.TrainerCallback):
        """The factors' gradients the optimizer steps on (after averaging and clipping), at the last step."""

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            factors.update({f"{n}.grad": p.grad.clone() for n, p in model.named_parameters() if ".experts.lora." in n})

    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=token_dataset(n=32),
        callbacks=[KTCallback(cpu_infer=None), LastGradients()],
    )
    trainer.train()
    experts = [
        f"{n}.{p}" for n, m in model.named_modules() if isinstance(m, KTExperts) for p, _ in m.named_parameters()
    ]
    factors.update({f"{n}.value": p.detach().clone() for n, p in model.named_parameters() if ".experts.lora." in n})
    expert_tensors = [t for m in model.modules() if isinstance(m, KTExperts) for t in [*m.parameters(), *m.buffers()]]
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.save(factors, Path(out, f"factors-{rank}.pt"))
    if trainer.is_world_process_zero():
        report = {
            "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
            "grad_norms": [e["grad_norm"] for e in trainer.state.log_history if "grad_norm" in e],
            "reductions": model.kt_lora_averager.reductions,
            "broadcasts": model.kt_lora_averager.broadcasts,
            "engine": model.kt_lora_averager._engine if dist.is_initialized() else None,
            "world_size": trainer.args.world_size,
            "expert_tensors": experts,
            "sharded": [n for n, p in model.named_parameters() if isinstance(p, DTensor)],
            "expert_devices": sorted({str(t.device) for t in expert_tensors}),
            "attention_devices": sorted({str(p.device) for n, p in model.named_parameters() if ".self_attn." in n}),
        }
        Path(out, "report.json").write_text(json.dumps(report))


if __name__ == "__main__":
    run_rank(_train, *sys.argv[1:6])
