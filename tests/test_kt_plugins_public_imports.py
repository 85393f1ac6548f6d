"""kt_plugins imports from kt_core only what kt_core declares public.

Public: a name in the `__all__` of `kt_core`, or of a kt_core subpackage that declares one (kt_core.peft,
kt_core.loading, ...); a module exported that way (`kt_core.settings`) opens the names of its own `__all__`.
Implementation modules (kt_core.experts.share, kt_core.runtime.expert_time, kt_core.kernels, ...) are not, even
where their own `__all__` lists a name, and underscore names never are. Checked on the source with `ast`:
`from kt_core... import X`, `import kt_core...`, and attribute chains `kt_core.X.Y` after `import kt_core`.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path
from types import ModuleType

import kt_plugins

PLUGINS = Path(kt_plugins.__file__).parent


def _public_member(module: ModuleType, name: str) -> object | None:
    """The public member `name` of a kt_core module, or None when kt_core does not declare it public."""
    if name.startswith("_"):
        return None
    if name in getattr(module, "__all__", ()):
        return getattr(module, name)
    if module.__name__ == "kt_core":  # a subpackage with an `__all__` of its own
        try:
            sub = importlib.import_module(f"kt_core.{name}")
        except ModuleNotFoundError:
            return None
        if hasattr(sub, "__path__") and hasattr(sub, "__all__"):
            return sub
    return None


def _private_step(dotted: list[str]) -> str | None:
    """Why `kt_core.a.b...` is not public ("`b` is not public in kt_core.a"), or None when it is."""
    value: object = importlib.import_module("kt_core")
    for i, name in enumerate(dotted[1:], start=1):
        if not isinstance(value, ModuleType):
            return None  # an attribute of a public class or function: its own business
        member = _public_member(value, name)
        if member is None:
            return f"{'.'.join(dotted)}: `{name}` is not public in {'.'.join(dotted[:i])}"
        value = member
    return None


def _attribute_chain(node: ast.Attribute) -> list[str] | None:
    names = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    return [node.id, *reversed(names)] if isinstance(node, ast.Name) and node.id == "kt_core" else None


def private_imports(source: str) -> list[tuple[int, str]]:
    """(line, what) of every use of a kt_core name that kt_core does not declare public, in one file's source."""
    tree = ast.parse(source)
    inner = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Attribute)}  # `a.b` inside `a.b.c`
    found = []
    for node in ast.walk(tree):
        chains: list[list[str]] = []
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.split(".")[0] == "kt_core":
            chains = [[*node.module.split("."), alias.name] for alias in node.names]
        elif isinstance(node, ast.Import):
            chains = [alias.name.split(".") for alias in node.names if alias.name.split(".")[0] == "kt_core"]
        elif isinstance(node, ast.Attribute) and id(node) not in inner:
            chains = [chain] if (chain := _attribute_chain(node)) else []
        found += [(node.lineno, step) for chain in chains if (step := _private_step(chain)) is not None]
    return sorted(found)


def test_private_kt_core_names_are_caught():
    source = """
import kt_core
import kt_core.runtime.pool
from kt_core import _C, settings, KTExperts
from kt_core.experts.share import run_now
from kt_core.loading.resume import last_good_checkpoint
from kt_core.loading import last_good_checkpoint, _private
from kt_core.kernels import resolve_kernel
from kt_core.peft import AdapterFolder
from kt_core.settings import positive_int, _SIZE
x = kt_core.KTExperts, kt_core.kernels.resolve_kernel, kt_core.peft.AdapterFolder.config
"""
    assert private_imports(source) == [
        (3, "kt_core.runtime.pool: `runtime` is not public in kt_core"),
        (4, "kt_core._C: `_C` is not public in kt_core"),
        (5, "kt_core.experts.share.run_now: `share` is not public in kt_core.experts"),
        (6, "kt_core.loading.resume.last_good_checkpoint: `resume` is not public in kt_core.loading"),
        (7, "kt_core.loading._private: `_private` is not public in kt_core.loading"),
        (8, "kt_core.kernels.resolve_kernel: `kernels` is not public in kt_core"),
        (10, "kt_core.settings._SIZE: `_SIZE` is not public in kt_core.settings"),
        (11, "kt_core.kernels.resolve_kernel: `kernels` is not public in kt_core"),
    ]


def test_plugins_import_only_public_kt_core_names():
    files = sorted(PLUGINS.rglob("*.py"))
    assert files
    found = [
        f"{path.relative_to(PLUGINS.parent)}:{line}: {what}"
        for path in files
        for line, what in private_imports(path.read_text())
    ]
    assert not found, "kt_plugins uses kt_core names that kt_core does not declare public:\n" + "\n".join(found)
