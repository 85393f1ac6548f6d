"""LLaMA-Factory's `use_kt: true` under torchrun (FORCE_TORCHRUN=1): the launch decision of stock LLaMA-Factory,
kt_shared_experts, and the settings refused because they cannot hold on every rank (the two-rank run itself:
integration_tests/test_llamafactory_torchrun.py)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from kt_core.settings import SettingError
from kt_plugins.llamafactory.config import split_kt_args

RANK_VARIABLES = ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "LOCAL_RANK", "RANK")


@pytest.fixture
def torchrun(monkeypatch):
    """This process as local rank 1 of 2 of a two-rank job (each rank's device: cpu, or its GPU where there are)."""
    for name, value in zip(RANK_VARIABLES, ("2", "2", "1", "1"), strict=True):
        monkeypatch.setenv(name, value)


@pytest.fixture
def one_process(monkeypatch):
    for name in RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def _settings(**keys):
    return split_kt_args({"use_kt": True, **keys})[1]


def test_shared_experts_key(one_process, tmp_path, caplog):
    assert _settings().kt_shared_experts is None
    assert _settings(kt_shared_experts=False).kt_shared_experts is False
    assert _settings(kt_shared_experts="true").kt_shared_experts is True
    assert _settings(kt_shared_experts=str(tmp_path)).kt_shared_experts == str(tmp_path)
    assert "kt_shared_experts has no effect with one rank on this node" in caplog.text
    with pytest.raises(SettingError, match=r"kt_shared_experts: got '/no/such/folder', expected true, false or an"):
        _settings(kt_shared_experts="/no/such/folder")
    with pytest.raises(SettingError, match=r"kt_shared_experts: got 'maybe'"):
        _settings(kt_shared_experts="maybe")
    _, cli = split_kt_args(["--use_kt", "--kt_shared_experts", str(tmp_path)])
    assert cli.kt_shared_experts == str(tmp_path)


def test_shared_experts_reach_load_model(one_process, monkeypatch, tmp_path):
    import kt_core
    from kt_plugins.llamafactory.model import _KTAutoModel

    seen = {}
    monkeypatch.setattr(kt_core, "load_model", lambda path, **kwargs: seen.update(kwargs) or object())
    _KTAutoModel(_settings(kt_shared_experts=str(tmp_path)), None).from_pretrained("/models/x")
    assert seen["shared_experts"] == str(tmp_path) and seen["device"] is None  # None: this rank's device


def test_each_rank_takes_its_own_device(torchrun):
    from kt_core.loading.loader import resolve_devices

    gpus = torch.cuda.device_count()
    assert _settings().kt_device is None and resolve_devices(None) == [f"cuda:{1 % gpus}" if gpus else "cpu"]
    if not gpus:
        assert _settings(kt_device="cpu").kt_device == "cpu"  # this rank's device on a CPU machine: accepted
    assert _settings(kt_optimize_rule="cpu-only.yaml").kt_optimize_rule == "cpu-only.yaml"


def test_a_layer_split_over_gpus_is_refused_per_rank(torchrun, monkeypatch):
    from kt_core import settings as checks

    monkeypatch.setattr(checks, "require_cuda", lambda *args: None)  # as on a GPU machine
    with pytest.raises(SettingError, match=r"kt_device: got 'cuda:0,cuda:1'; under torchrun \(WORLD_SIZE=2\) each"):
        _settings(kt_device="cuda:0,cuda:1")
    with pytest.raises(SettingError, match=r"kt_device: got 'cuda:0'; .*Remove kt_device"):
        _settings(kt_device="cuda:0")
    with pytest.raises(SettingError, match=r"kt_optimize_rule: .*multi-gpu.yaml puts layers on cuda:0, cuda:1"):
        _settings(kt_optimize_rule="multi-gpu.yaml")
    with pytest.raises(SettingError, match=r"kt_optimize_rule: .*single-gpu.yaml puts layers on cuda:0; under"):
        _settings(kt_optimize_rule="single-gpu.yaml")  # rank 0's GPU on every rank


def test_one_rank_per_node_keeps_its_gpu(monkeypatch):
    """NNODES=2 NPROC_PER_NODE=1: every rank is local rank 0, whose device cuda:0 is the one the rules name."""
    import torch

    for name, value in zip(RANK_VARIABLES, ("2", "1", "0", "1"), strict=True):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    from kt_core import settings as checks

    monkeypatch.setattr(checks, "require_cuda", lambda *args: None)
    assert _settings(kt_optimize_rule="single-gpu.yaml", kt_device="cuda:0").kt_device == "cuda:0"
    with pytest.raises(SettingError, match=r"multi-gpu\.yaml puts layers on cuda:0, cuda:1"):
        _settings(kt_optimize_rule="multi-gpu.yaml")


@pytest.mark.skipif(importlib.util.find_spec("llamafactory") is None, reason="needs LLaMA-Factory")
@pytest.mark.parametrize(
    ("env", "devices", "torchrun"),
    [
        ({"USE_KT": "1"}, 0, False),  # CPU machine, one process
        ({"USE_KT": "1"}, 4, False),  # use_kt on several GPUs: one process (layers split by kt_optimize_rule)
        ({"USE_KT": "1", "FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2"}, 0, True),  # data parallel, also on CPU
        ({"USE_KT": "1", "FORCE_TORCHRUN": "1"}, 4, True),
    ],
)
def test_stock_launcher_decides_torchrun(monkeypatch, env, devices, torchrun):
    """LLaMA-Factory 0.9.5's own rule (launcher.launch): torchrun with FORCE_TORCHRUN=1 whatever USE_KT says."""
    import subprocess
    import sys

    from llamafactory import launcher
    from llamafactory.extras import misc

    for name in ("USE_KT", "FORCE_TORCHRUN", "NPROC_PER_NODE", "USE_MCA", "USE_RAY"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(misc, "get_device_count", lambda: devices)
    launched = []

    def fake_run(command, **kwargs):
        launched.append(command)
        return subprocess.CompletedProcess(command, 0)

    # the tuner first: importing it may build matplotlib's font cache, which runs fc-list through subprocess.run
    monkeypatch.setattr("llamafactory.train.tuner.run_exp", lambda *a, **k: launched.append("one process"))
    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.setattr(sys, "argv", ["llamafactory-cli", "train", "config.yaml"])
    with pytest.raises(SystemExit) if torchrun else _nothing():
        launcher.launch()
    if torchrun:
        assert launched[0][0] == "torchrun" and f"--nproc_per_node {env.get('NPROC_PER_NODE', devices)}" in " ".join(
            launched[0]
        )
    else:
        assert launched == ["one process"]


def _nothing():
    import contextlib

    return contextlib.nullcontext()
