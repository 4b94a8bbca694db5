"""Make the ``anomalib`` CLI know fsad-anomalib's models and datamodules by short name.

anomalib resolves ``--model NAME`` / ``--data NAME`` among the subclasses that are already imported and
has no plugin registry. Installing fsad-anomalib adds ``fsad_anomalib-plugin.pth`` to site-packages.
Its one line (see ``fsad_anomalib._build_backend.PTH_LINE``) defines, without importing anything, a
tiny finder at the front of ``sys.meta_path``; the finder does nothing until some code imports
``anomalib.models``. Then it imports this module, whose :func:`hook_spec` makes the import of
``anomalib.models`` be followed by the import of ``fsad_anomalib.models``, ``fsad_anomalib.data`` and
``fsad_anomalib.callbacks`` (which subclass anomalib's ``AnomalibModule``, ``AnomalibDataModule`` and
Lightning's ``Callback``), and removes itself. Processes that never import anomalib import nothing;
without anomalib installed the finder never fires. Set ``FSAD_ANOMALIB_NO_PLUGIN=1`` to switch the hook off.
"""

from __future__ import annotations

import sys

# Only sys and os (already loaded at start-up) are imported here: everything else is imported lazily,
# so that processes that never import anomalib pay (almost) nothing for this hook.

_TRIGGER = "anomalib.models"
_PLUGIN_MODULES = ("fsad_anomalib.models", "fsad_anomalib.data", "fsad_anomalib.callbacks")


def _load_plugin() -> None:
    import importlib
    import warnings

    for name in _PLUGIN_MODULES:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001, PERF203 - a broken plugin must never break anomalib itself
            warnings.warn(f"fsad-anomalib: could not register {name} with anomalib: {exc}", stacklevel=2)
    _expose_models()
    try:
        from fsad_anomalib._cli_errors import install

        install()
    except Exception as exc:  # noqa: BLE001 - never break anomalib itself
        warnings.warn(f"fsad-anomalib: could not install its CLI error messages: {exc}", stacklevel=2)


def _expose_models() -> None:
    """Make the models reachable the ways anomalib's own code builds one.

    ``get_model({"class_path": "FewShotContrastive"})`` (anomalib's benchmark and tiled-ensemble pipelines) looks the
    class up as an attribute of ``anomalib.models``, and a dotted ``class_path`` is imported only from the modules on
    anomalib's ``ALLOWED_MODULES`` list: the classes become attributes of ``anomalib.models`` and
    ``fsad_anomalib.models`` joins that list (``get_model("FewShotContrastive")`` finds any imported subclass already).
    """
    models = sys.modules.get("fsad_anomalib.models")
    anomalib_models = sys.modules.get(_TRIGGER)
    if models is None or anomalib_models is None:
        return
    from anomalib.models.components import AnomalibModule

    for name in getattr(models, "__all__", ()):
        value = getattr(models, name)
        if isinstance(value, type) and issubclass(value, AnomalibModule) and not hasattr(anomalib_models, name):
            setattr(anomalib_models, name, value)
    allowed = getattr(anomalib_models, "ALLOWED_MODULES", None)
    if isinstance(allowed, set):
        allowed.add("fsad_anomalib.models")


def hook_spec(fullname: str):  # noqa: ANN202 - typing it would import importlib.machinery at start-up
    """The spec of ``fullname`` whose loader imports fsad-anomalib's plugin modules right after executing it."""
    try:
        import importlib.util

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
