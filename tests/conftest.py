"""Shared fixtures: tiny checkpoints written to tmp_path, a one-rank process group, and the GPU skip."""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/tiny_models.py

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs CUDA"))


@pytest.fixture
def tokens():
    """[2, 7] token ids of the tiny vocabulary."""
    return torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def one_rank_group():
    """A one-rank gloo process group in this process (in-memory store), destroyed once the test's objects are gone.

    The order matters: DDP's C++ Reducer holds the group, and when it is the group's last owner it destroys the group
    with the GIL held and joins gloo's worker threads, one of which may be waiting for the GIL to free a finished
    collective: a deadlock (pytorch/pytorch#56297; seen here about once in 30 runs). After the test function has
    returned and a collection, torch.distributed's registry is the group's last owner, and it frees it without the GIL.
    """
    import torch.distributed as dist

    from kt_core.distributed import ddp

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    gc.collect()  # DDP / FSDP2 objects held in reference cycles, before the group goes
    ddp._gloo_group = None
    dist.destroy_process_group()
