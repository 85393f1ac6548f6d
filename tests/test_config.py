"""RuntimeConfig: every KT_* variable read in one place, checked, changed by configure(), handed to the C++."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kt_core
from kt_core import KTExperts, config, kernels, plugins
from kt_core.config import RuntimeConfig
from kt_core.runtime import pool
from kt_core.settings import SettingError

README = Path(__file__).parents[1] / "README.md"
built = pytest.mark.skipif(kernels._C is None, reason="the compiled module is not built")


@pytest.fixture(autouse=True)
def unconfigured(monkeypatch):
    """No knob set by configure() during the test; the process's own are restored (and handed to the C++) after."""
    monkeypatch.setattr(config, "_changes", {})
    yield
    monkeypatch.undo()
    config.current()


READS = [
    ("KT_CPU_INFER", "1", "cpu_infer", 1),
    ("KT_KERNEL", "portable", "kernel", "portable"),
    ("KT_PACK_CACHE", "/tmp/kt-packed", "pack_cache", Path("/tmp/kt-packed")),
    ("KT_STREAM_TRITON", "0", "stream_triton", False),
    ("KT_STREAM_TRITON", "1", "stream_triton", True),
    ("KT_PLUGINS", "a, b,,", "plugins", frozenset({"a", "b"})),
    ("KT_PLUGINS", "", "plugins", frozenset()),  # empty allow-list: no third-party plugin
    ("KT_PHASE_TIMES", "1", "phase_times", True),
    ("KT_PHASE_TIMES", "off", "phase_times", False),
    ("KT_BACKWARD_WEIGHT_CACHE", "1", "backward_weight_cache", True),
    ("KT_BACKWARD_WEIGHT_CACHE", "0", "backward_weight_cache", False),
    ("KT_AMX_EMULATE", "1", "amx_emulate", True),
]


@pytest.mark.parametrize(("variable", "value", "knob", "expected"), READS)
def test_from_env_reads_each_variable(variable, value, knob, expected):
    read = RuntimeConfig.from_env({variable: value})
    assert getattr(read, knob) == expected
    assert read == RuntimeConfig(**{knob: expected})  # and nothing else


def test_defaults_are_the_behaviour_without_variables():
    assert RuntimeConfig.from_env({}) == RuntimeConfig(
        cpu_infer=None,  # the CPUs this process may use
        kernel=None,  # each layer's own `kernel=`
        pack_cache=None,  # off
        stream_triton=True,
        plugins=None,  # all of them
        phase_times=False,
        backward_weight_cache=None,  # by free memory
        amx_emulate=False,
    )


@pytest.mark.parametrize("variable", [v for v, *_ in READS if v != "KT_PLUGINS"])
def test_an_empty_variable_counts_as_unset(variable):
    assert RuntimeConfig.from_env({variable: ""}) == RuntimeConfig()


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("KT_CPU_INFER", "0", "a positive integer"),
        ("KT_CPU_INFER", "four", "a positive integer"),
        ("KT_KERNEL", "  ", "'auto' or a kernel name"),
        ("KT_STREAM_TRITON", "maybe", "true or false"),
        ("KT_PHASE_TIMES", "2", "true or false"),
        ("KT_BACKWARD_WEIGHT_CACHE", "auto", "true or false"),
        ("KT_AMX_EMULATE", "emulate", "true or false"),
    ],
)
def test_bad_values_are_refused_naming_the_variable(variable, value, expected):
    with pytest.raises(SettingError, match=rf"^{variable}: got {value!r}, expected {re.escape(expected)}"):
        RuntimeConfig.from_env({variable: value})


def test_current_reads_the_environment_at_use_and_configure_wins(monkeypatch):
    monkeypatch.setenv("KT_PHASE_TIMES", "1")
    monkeypatch.setenv("KT_KERNEL", "avx2")
    assert config.current().phase_times and config.current().kernel == "avx2"
    assert kt_core.configure(kernel="portable").kernel == "portable"
    monkeypatch.setenv("KT_KERNEL", "torch")
    assert config.current().kernel == "portable"


def test_configure_checks_like_from_env():
    with pytest.raises(SettingError, match=r"^phase_times: got 'sometimes', expected true or false"):
        kt_core.configure(phase_times="sometimes")
    with pytest.raises(SettingError, match=r"^cpu_infer: got 0, expected a positive integer"):
        kt_core.configure(cpu_infer=0)
    with pytest.raises(TypeError, match=r"unknown knob\(s\) threads; known: cpu_infer, kernel"):
        kt_core.configure(threads=4)
    assert config.current() == RuntimeConfig.from_env()  # nothing was set
    assert kt_core.configure(pack_cache="/tmp/kt-packed", stream_triton="0").pack_cache == Path("/tmp/kt-packed")
    assert not config.current().stream_triton


@built
def test_configure_chooses_the_kernel(monkeypatch):
    monkeypatch.delenv("KT_KERNEL", raising=False)
    kt_core.configure(kernel="portable")
    gate_up, down = torch.randn(4, 16, 8), torch.randn(4, 8, 8)
    assert KTExperts.from_tensors(gate_up, down, kernel="auto").kernel == "portable"
    kt_core.configure(kernel="nope")
    with pytest.raises(ValueError, match="KT_KERNEL=nope: this kernel cannot run here"):
        KTExperts.from_tensors(gate_up, down)
    kt_core.configure(kernel=None)
    assert KTExperts.from_tensors(gate_up, down).kernel == kernels.available_kernels()[0]


@built
@pytest.mark.parametrize(
    ("knob", "value", "read_back"),
    [
        ("amx_emulate", True, "amx_emulation"),
        ("phase_times", True, "phase_times_enabled"),
        ("backward_weight_cache", False, "backward_weight_cache"),
        ("backward_weight_cache", True, "backward_weight_cache"),
    ],
)
def test_native_knobs_reach_the_compiled_module(knob, value, read_back):
    read, default = getattr(kernels._C, read_back), getattr(RuntimeConfig(), knob)
    kt_core.configure(**{knob: value})
    assert read() == value
    kt_core.configure(**{knob: default})
    assert read() == default


@built
def test_a_variable_set_later_reaches_the_compiled_module(monkeypatch):
    monkeypatch.setenv("KT_AMX_EMULATE", "1")
    kernels.available_kernels()
    assert kernels._C.amx_emulation()
    monkeypatch.delenv("KT_AMX_EMULATE")
    kernels.available_kernels()
    assert not kernels._C.amx_emulation()


@built
def test_record_phase_times_keeps_its_say():
    kernels.record_phase_times(True)
    try:
        config.current()
        assert kernels._C.phase_times_enabled()
    finally:
        kernels.record_phase_times(False)


@built
def test_a_fresh_process_starts_at_the_defaults_on_both_sides():
    """The C++ defaults are RuntimeConfig's, and record_phase_times() before any config read is kept."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KT_")}
    script = (
        "from kt_core import _C, config, kernels; "
        "print(_C.phase_times_enabled(), _C.backward_weight_cache(), _C.amx_emulation()); "
        "kernels.record_phase_times(True); config.current(); print(_C.phase_times_enabled())"
    )
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True).stdout
    defaults = RuntimeConfig()
    assert out.split() == [
        str(defaults.phase_times),
        str(defaults.backward_weight_cache),
        str(defaults.amx_emulate),
        "True",
    ]


def test_cpu_infer_is_refused_once_the_pool_runs(monkeypatch):
    monkeypatch.setattr(pool, "current_threads", lambda: None)
    assert kt_core.configure(cpu_infer=1).cpu_infer == 1  # before the pool: taken
    monkeypatch.setattr(pool, "current_threads", lambda: 3)
    with pytest.raises(SettingError, match=r"^cpu_infer: got 1, but the shared thread pool already runs 3 threads"):
        kt_core.configure(cpu_infer=1)
    assert kt_core.configure(cpu_infer="3").cpu_infer == 3  # the pool's own size: no change


def test_plugins_are_refused_once_loaded(monkeypatch):
    with monkeypatch.context() as before_loading:
        before_loading.setattr(plugins, "plugins_loaded", lambda: False)
        assert kt_core.configure(plugins=["a", "b"]).plugins == frozenset({"a", "b"})
    plugins.get_plugin_manager()
    assert plugins.plugins_loaded()
    with pytest.raises(SettingError, match=r"^plugins: got frozenset\(\{'x'\}\), but the kt plugins are loaded"):
        kt_core.configure(plugins="x")
    kt_core.configure(plugins=["b", "a"])  # no change: fine


def test_readme_table_lists_exactly_the_knobs():
    rows = re.findall(r"^\| `(KT_\w+)` \| `(\w+)` \|", README.read_text(), flags=re.MULTILINE)
    knobs = {knob.metadata["variable"]: knob.name for knob in dataclasses.fields(RuntimeConfig)}
    assert dict(rows) == knobs
    assert len(rows) == len(knobs)
