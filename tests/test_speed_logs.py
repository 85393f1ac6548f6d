"""What the training plugins log per step (kt_core.speed_logs): kt_cpu_expert_share means the CPU experts
operator's share of step wall time in every mode; with streaming it comes from the runtime's CPU seconds and
the split is logged as per-step means over the steps since the last log."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
from torch import nn

from kt_core import ExpertTimer, kernels, speed_logs
from kt_core.streaming import StreamingRuntime


def _step(cpu_s, pcie_s, gpu_s, share, gb=1.0):
    return {"cpu_s": cpu_s, "pcie_s": pcie_s, "gpu_s": gpu_s, "cpu_slot_share": share, "pcie_gb": gb}


def _runtime(history):
    rt = SimpleNamespace(history=list(history), _taken=0)
    rt.take_totals = lambda: StreamingRuntime.take_totals(rt)
    return rt


def test_take_totals_sums_the_steps_closed_since_the_last_call():
    rt = _runtime([_step(0.1, 0.2, 0.3, 0.5), _step(0.3, 0.4, 0.5, 0.25)])
    totals = rt.take_totals()
    assert totals["steps"] == 2
    assert totals["cpu_s"] == pytest.approx(0.4) and totals["pcie_s"] == pytest.approx(0.6)
    assert totals["gpu_s"] == pytest.approx(0.8) and totals["pcie_gb"] == pytest.approx(2.0)
    assert totals["cpu_slot_share"] == pytest.approx(0.375)
    assert rt.take_totals() is None  # nothing new
    rt.history.append(_step(1.0, 0.0, 0.0, 1.0))
    assert rt.take_totals()["steps"] == 1


def _operator_ran(monkeypatch, seconds: float) -> None:
    """As if the CPU operator had computed for `seconds` (kt_core.kernels.operator_seconds)."""
    monkeypatch.setattr(kernels, "_operator_s", kernels.operator_seconds() + seconds)


def _timed_steps(timer, n=2, seconds=0.02):
    timer.start_steps()
    for _ in range(n):
        time.sleep(seconds)
        timer.end_step()


def test_with_streaming_the_share_is_the_cpu_operators_seconds(monkeypatch):
    timer = ExpertTimer(nn.Linear(2, 2))
    _timed_steps(timer)
    _operator_ran(monkeypatch, 99.0)  # the timer's own figure, which streaming must not report
    rt = _runtime([_step(0.01, 0.02, 0.005, 0.5), _step(0.01, 0.04, 0.005, 0.25)])
    speed = speed_logs(timer, rt)
    assert 0 < speed["kt_cpu_expert_share"] <= 0.5  # 20 ms of CPU over >= 40 ms of steps
    assert speed["kt_stream_cpu_ms"] == 10.0 and speed["kt_stream_pcie_ms"] == 30.0
    assert speed["kt_stream_gpu_ms"] == 5.0 and speed["kt_stream_cpu_slot_share"] == 0.375


def test_without_streaming_the_share_is_the_timers_operator_seconds(monkeypatch):
    timer = ExpertTimer(nn.Linear(2, 2))
    _timed_steps(timer, n=1, seconds=0.05)
    _operator_ran(monkeypatch, 0.025)
    speed = speed_logs(timer)
    assert 0.2 < speed["kt_cpu_expert_share"] <= 0.5
    assert not any(key.startswith("kt_stream_") for key in speed)


def test_streaming_without_a_closed_step_reports_no_cpu_time(monkeypatch):
    timer = ExpertTimer(nn.Linear(2, 2))
    _timed_steps(timer, n=1)
    _operator_ran(monkeypatch, 5.0)
    speed = speed_logs(timer, _runtime([]))
    assert speed["kt_cpu_expert_share"] == 0.0
    assert "kt_stream_cpu_ms" not in speed
