"""Startup hook of the LLaMA-Factory plugin, imported by `kt_plugins_llamafactory.pth` in every interpreter.

Standard library only and cheap: it installs a finder that waits for LLaMA-Factory's argument parser and
model loader modules to be imported, and patches them right after they execute (see takeover.py).
Nothing else happens until LLaMA-Factory itself is imported. Idempotent; `KT_LLAMAFACTORY=0` turns it off.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

DISABLE_ENV = "KT_LLAMAFACTORY"
# module -> name of the function in kt_plugins.llamafactory.takeover that patches it
PATCHES = {
    "llamafactory.hparams.parser": "patch_parser",
    "llamafactory.model.loader": "patch_loader",
    "llamafactory.train.tuner": "patch_tuner",
}


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader, patch_name: str):
        self._loader = loader
        self._patch_name = patch_name

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        from kt_plugins.llamafactory import takeover

        getattr(takeover, self._patch_name)(module)


class PostImportFinder(importlib.abc.MetaPathFinder):
    """Wraps the loaders of the modules in PATCHES; every other import is left alone."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in PATCHES:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _PatchingLoader(spec.loader, PATCHES[fullname])
                return spec
        return None


def install() -> None:
    if os.environ.get(DISABLE_ENV, "1").lower() in ("0", "false", "off", "no"):
        return
    if any(isinstance(f, PostImportFinder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, PostImportFinder())
    for name, patch_name in PATCHES.items():  # imported before this hook existed
        if name in sys.modules:
            from kt_plugins.llamafactory import takeover

            getattr(takeover, patch_name)(sys.modules[name])


install()
