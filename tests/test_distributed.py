"""Several ranks on one node: each rank's place (torchrun's variables), its share of the CPUs, and DDP leaving the
experts alone, their LoRA averaged by ExpertLoraAverager (two ranks sharing the expert file:
integration_tests/test_distributed_store.py; two ranks training: integration_tests/test_distributed_trainer.py)."""

from __future__ import annotations

import contextlib

import pytest

from kt_core.distributed import LocalRanks, ignore_frozen_experts, local_ranks, prepare_data_parallel
from kt_core.distributed.cpus import _ranges, cpu_share


def test_cpu_share_slices_the_node():
    cpus = list(range(8))
    assert cpu_share(cpus, LocalRanks(0, 2)) == [0, 1, 2, 3]
    assert cpu_share(cpus, LocalRanks(1, 2)) == [4, 5, 6, 7]
    assert [len(cpu_share(cpus, LocalRanks(r, 3))) for r in range(3)] == [2, 3, 3]
    assert cpu_share([0, 1], LocalRanks(2, 3)) == [0]  # fewer CPUs than ranks: one each, shared
    assert _ranges([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"


def test_local_ranks_from_torchrun_variables(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert local_ranks() == LocalRanks(1, 2) and local_ranks().shared and not local_ranks().is_leader
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(ValueError, match=r"LOCAL_RANK: got 2, expected an integer in \[0, LOCAL_WORLD_SIZE=2\)"):
        local_ranks()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="LOCAL_WORLD_SIZE: got 'two'"):
        local_ranks()
    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert local_ranks() == LocalRanks(0, 1) and not local_ranks().shared


def _tiny_with_expert_lora():
    from kt_core import convert_model
    from tests.tiny_models import build_tiny_model

    model = convert_model(build_tiny_model("qwen3_moe", num_layers=2))
    for module in model.modules():
        if hasattr(module, "add_lora") and hasattr(module, "gate_up_proj"):
            module.add_lora(2, 4.0)
    return model


@contextlib.contextmanager
def _counting_all_reduce():
    """Yields the list of the element counts of every torch.distributed.all_reduce made while it is open."""
    import torch.distributed as dist

    calls, real_all_reduce = [], dist.all_reduce

    def counting_all_reduce(tensor, *args, **kwargs):
        calls.append(tensor.numel())
        return real_all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = counting_all_reduce
    try:
        yield calls
    finally:
        dist.all_reduce = real_all_reduce


def test_ddp_ignores_the_experts_and_their_lora(one_rank_group):
    from torch.nn.parallel import DistributedDataParallel

    model = _tiny_with_expert_lora()
    ignored = ignore_frozen_experts(model)
    factors = [f"model.layers.{i}.mlp.experts.lora.{f}" for i in range(2) for f in ("down_A", "down_B")]
    factors += [f"model.layers.{i}.mlp.experts.lora.{f}" for i in range(2) for f in ("gate_up_A", "gate_up_B")]
    frozen = [f"model.layers.{i}.mlp.experts.{w}" for i in range(2) for w in ("down_proj", "gate_up_proj")]
    assert ignored == sorted(frozen + factors)
    ddp = DistributedDataParallel(model)
    assert ddp.parameters_to_ignore == set(ignored)
    booked = {id(p) for p in ddp._module_parameters}
    named = dict(model.named_parameters())
    assert all(id(named[n]) not in booked for n in factors)  # the averager's, on the host whatever DDP's device
    assert any(id(p) in booked for p in model.parameters())


def test_expert_lora_averaged_once_per_optimizer_step(one_rank_group):
    """Two optimizer steps of two micro-batches each: one broadcast, then one all_reduce per step, on the last
    micro-batch's backward (outside no_sync()), before anything reads the gradients; the gradients keep the local
    accumulation (one rank: the average of one)."""
    import torch
    from torch.nn.parallel import DistributedDataParallel

    model = _tiny_with_expert_lora().train()
    averager = prepare_data_parallel(model)
    assert averager is model.kt_lora_averager and prepare_data_parallel(model) is averager
    assert len(averager.factors) == 8
    ids = torch.randint(3, 64, (4, 2, 8), generator=torch.Generator().manual_seed(0))
    ddp = DistributedDataParallel(model)
    with _counting_all_reduce() as calls:
        for step in range(2):
            with ddp.no_sync():
                ddp(input_ids=ids[2 * step], labels=ids[2 * step]).loss.backward()
            assert averager.reductions == step  # accumulating: nothing reduced
            local = [p.grad.clone() for p in averager.factors]
            ddp(input_ids=ids[2 * step + 1], labels=ids[2 * step + 1]).loss.backward()
            assert averager.reductions == step + 1
            model.zero_grad(set_to_none=True)
    assert averager.broadcasts == 1
    total = sum(p.numel() for p in averager.factors)
    assert calls.count(total) == 2  # one flat buffer per step, every factor in it
    assert all(g is not None for g in local)


def test_a_factor_without_gradient_is_refused_at_the_next_step(one_rank_group):
    import torch
    from torch.nn.parallel import DistributedDataParallel

    from kt_core import KTExperts

    model = _tiny_with_expert_lora().train()
    averager = prepare_data_parallel(model)
    ids = torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    ddp = DistributedDataParallel(model, find_unused_parameters=True)
    next(m for m in model.modules() if isinstance(m, KTExperts)).lora_enabled = False
    ddp(input_ids=ids, labels=ids).loss.backward()
    assert averager.reductions == 0
    with pytest.raises(RuntimeError, match=r"no gradient to 4 of 8 expert LoRA factors \(model\.layers\.0"):
        ddp(input_ids=ids, labels=ids)
