"""The plugin manager: built-ins through the `kt` hooks, idempotent loading, broken plugins skipped."""

from __future__ import annotations

import logging
import types
from importlib.metadata import EntryPoint

import pytest

from kt_core import plugins
from kt_core.architectures import Architecture, get_architecture, registry
from kt_core.hookspecs import hookimpl
from kt_core.placement import get_expert_backend, list_expert_backends


@pytest.fixture
def fresh_manager(monkeypatch):
    """A manager that rescans entry points; the real one is restored afterwards."""
    saved_manager, saved_loaded = plugins._manager, dict(plugins._loaded)
    plugins._manager = None
    plugins._loaded.clear()
    try:
        yield
    finally:
        plugins._manager, plugins._loaded = saved_manager, saved_loaded


def test_builtins_are_loaded_once():
    first = plugins.get_plugin_manager()
    assert plugins.load_plugins() is first
    assert first.has_plugin("kt_architectures") and first.has_plugin("kt_backends")
    assert {"kt_architectures", "kt_backends"} <= set(plugins.loaded_plugins())


def test_builtin_backend_is_kt_experts():
    from kt_core.experts import KTExperts

    assert list_expert_backends()["kt"] is KTExperts
    assert get_expert_backend("kt_core.experts.KTExperts") == ("kt", KTExperts)
    assert get_expert_backend("KTExperts") == ("kt", KTExperts)
    assert get_expert_backend("nope") is None


def _fake_entry_point(name: str, value: str) -> EntryPoint:
    return EntryPoint(name=name, value=value, group=plugins.ENTRY_POINT_GROUP)


def test_broken_plugin_is_logged_and_skipped(fresh_manager, monkeypatch, caplog):
    broken = _fake_entry_point("broken_plugin", "kt_no_such_module_xyz")
    monkeypatch.setattr(plugins, "entry_points", lambda group: [broken])
    with caplog.at_level(logging.ERROR, logger="kt_core.plugins"):
        manager = plugins.get_plugin_manager()
    assert "broken_plugin" in caplog.text and "failed to load" in caplog.text
    assert not manager.has_plugin("broken_plugin")
    assert manager.has_plugin("kt_architectures")  # the built-ins still come up


def test_allow_list_skips_other_plugins(fresh_manager, monkeypatch):
    module = types.ModuleType("kt_test_allowed_plugin")
    monkeypatch.setitem(__import__("sys").modules, "kt_test_allowed_plugin", module)
    eps = [
        _fake_entry_point("wanted", "kt_test_allowed_plugin"),
        _fake_entry_point("unwanted", "kt_test_allowed_plugin"),
    ]
    monkeypatch.setattr(plugins, "entry_points", lambda group: eps)
    monkeypatch.setenv(plugins.ALLOW_LIST_ENV, "wanted")
    manager = plugins.get_plugin_manager()
    assert manager.has_plugin("wanted") and not manager.has_plugin("unwanted")


def test_in_process_plugin_registers_an_architecture():
    class MyFamilyPlugin:
        @hookimpl
        def register_architectures(self, register):
            register(Architecture(name="my_family", model_types=("my_family_type",)))

    manager = plugins.get_plugin_manager()
    plugin = MyFamilyPlugin()
    manager.register(plugin, name="my_family_plugin")
    registry._reset_for_tests()
    try:
        assert get_architecture("my_family_type").name == "my_family"
    finally:
        manager.unregister(name="my_family_plugin")
        registry.unregister_architecture("my_family")
    assert get_architecture("qwen3_moe").name == "qwen3_moe"  # re-collection kept the built-ins
