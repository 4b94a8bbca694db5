"""Make the ``anomalib`` CLI know fsad-anomalib's models and datamodules by short name.

anomalib resolves ``--model NAME`` / ``--data NAME`` among the subclasses that are already imported and
has no plugin registry. Installing fsad-anomalib adds ``fsad_anomalib-plugin.pth`` to site-packages,
which calls :func:`install` at interpreter start. ``install`` only puts a small finder at the front of
``sys.meta_path``; the finder does nothing until some code imports ``anomalib.models``, and right after
that module has executed it imports ``fsad_anomalib.models`` and ``fsad_anomalib.data`` (which subclass
anomalib's ``AnomalibModule`` and ``AnomalibDataModule``), then removes itself. Processes that never
import anomalib pay for one tiny module import; without anomalib installed the finder never fires.
Set ``FSAD_ANOMALIB_NO_PLUGIN=1`` to switch the hook off.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import warnings
from importlib.abc import MetaPathFinder

_TRIGGER = "anomalib.models"
_PLUGIN_MODULES = ("fsad_anomalib.models", "fsad_anomalib.data", "fsad_anomalib.callbacks")


def _load_plugin() -> None:
    for name in _PLUGIN_MODULES:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - a broken plugin must never break anomalib itself
            warnings.warn(f"fsad-anomalib: could not register {name} with anomalib: {exc}", stacklevel=2)


class _AnomalibModelsHook(MetaPathFinder):
    """Post-import hook on ``anomalib.models``."""

    def find_spec(self, fullname, path, target=None):  # noqa: ANN001, ANN201
        if fullname != _TRIGGER:
            return None
        self._remove()
        try:
            spec = importlib.util.find_spec(fullname)
        except Exception:  # noqa: BLE001 - never break the import of anomalib itself
            return None
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader = spec.loader
        original = loader.exec_module

        def exec_module(module) -> None:  # noqa: ANN001
            original(module)
            _load_plugin()

        loader.exec_module = exec_module
        return spec

    def _remove(self) -> None:
        if self in sys.meta_path:
            sys.meta_path.remove(self)


def install() -> None:
    """Install the hook (called from the ``.pth`` file); idempotent and cheap."""
    if os.environ.get("FSAD_ANOMALIB_NO_PLUGIN"):
        return
    if _TRIGGER in sys.modules:
        _load_plugin()
        return
    if not any(isinstance(finder, _AnomalibModelsHook) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AnomalibModelsHook())
