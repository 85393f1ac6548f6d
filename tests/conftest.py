"""Shared fixtures: tiny checkpoints written to tmp_path, and the GPU skip."""

from __future__ import annotations

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
