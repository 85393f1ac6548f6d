"""Several ranks on one node: each rank's place (torchrun's variables), its share of the CPUs, and DDP leaving
the frozen experts alone (two ranks sharing the expert file: integration_tests/test_distributed_store.py)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from kt_core.distributed import LocalRanks, ignore_frozen_experts, local_ranks
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


def test_ddp_ignores_the_frozen_experts_only():
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from kt_core import convert_model
    from tests.tiny_models import build_tiny_model

    model = convert_model(build_tiny_model("qwen3_moe", num_layers=2))
    for module in model.modules():
        if hasattr(module, "add_lora") and hasattr(module, "gate_up_proj"):
            module.add_lora(2, 4.0)
    ignored = ignore_frozen_experts(model)
    assert ignored == sorted(
        f"model.layers.{i}.mlp.experts.{w}" for i in range(2) for w in ("down_proj", "gate_up_proj")
    )
    store = dist.FileStore(str(Path(os.environ.get("TMPDIR", "/tmp")) / f"kt-ddp-{uuid.uuid4().hex}"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(model)
        assert ddp.parameters_to_ignore == set(ignored)
        booked = {id(p) for p in ddp._module_parameters}
        factors = [p for n, p in model.named_parameters() if ".lora." in n]
        assert factors and all(id(p) in booked for p in factors)  # expert LoRA: reduced like any other gradient
    finally:
        dist.destroy_process_group()
