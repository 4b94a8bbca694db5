"""The reason last: anomalib CLI errors about fsad-anomalib's classes end with one line that says what is wrong.

anomalib's CLI types ``--model`` and ``--data`` as unions (``None`` or a subclass), and jsonargparse reports a bad
value inside a union as a list of every subtype's error followed by a dump of the whole namespace: the reason
(``k_shot`` must be positive, ``score_mode`` must be one of ...) sits a dozen lines up. And a value the class itself
refuses in ``__init__`` (a layer the backbone lacks) ends the program with a traceback. The plugin hook calls
:func:`install`, which wraps two methods of jsonargparse's ``ArgumentParser``, for messages that concern
``fsad_anomalib`` only: ``error`` appends ``error: --data.k_shot: <reason>`` as the last line, and
``instantiate_classes`` turns such a failure into the same parser error (usage, message, reason; exit code 2)
instead of a traceback. Every other message is left exactly as jsonargparse prints it.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["install", "reason"]

_KEY = re.compile(r'^(\s*)(?:error: )?Parser key "([^"]+)":')
_NOISE = ("Expected a <class 'NoneType'>", "Problem with given class_path")
_OURS = "fsad_anomalib"


def reason(message: str) -> str | None:
    """The innermost error of a jsonargparse union message, prefixed with its argument path, or ``None``."""
    keys: list[tuple[int, str]] = []
    found = None
    for line in message.splitlines():
        key = _KEY.match(line)
        if key:
            indent = len(key.group(1))
            keys = [(i, k) for i, k in keys if i < indent] + [(indent, key.group(2))]
            continue
        stripped = line.strip()
        if stripped.startswith("- ") and not stripped[2:].startswith(_NOISE):
            indent = len(line) - len(line.lstrip())
            path = ".".join(k for i, k in keys if i < indent)
            found = f"--{path}: {stripped[2:]}" if path else stripped[2:]
    return found


def install() -> None:
    """Wrap jsonargparse's ``ArgumentParser.error`` and ``instantiate_classes`` once (see the module's docstring)."""
    try:
        from jsonargparse import ArgumentParser
    except ImportError:  # pragma: no cover - anomalib depends on jsonargparse
        return
    if getattr(ArgumentParser, "_fsad_reason_last", False):
        return
    original_error = ArgumentParser.error
    original_instantiate = ArgumentParser.instantiate_classes

    def error(self: ArgumentParser, message: str, ex: Exception | None = None) -> Any:  # noqa: ANN401
        why = reason(message) if _OURS in message else None
        if why and not message.rstrip().endswith(why):
            message = f"{message}\nerror: {why}"
        return original_error(self, message, ex)

    def instantiate_classes(self: ArgumentParser, cfg: Any, **kwargs: Any) -> Any:  # noqa: ANN401
        try:
            return original_instantiate(self, cfg, **kwargs)
        except (ValueError, TypeError) as exc:
            if _OURS not in str(exc):
                raise
            self.error(str(exc), exc)
            raise  # pragma: no cover - error() exits

    ArgumentParser.error = error
    ArgumentParser.instantiate_classes = instantiate_classes
    ArgumentParser._fsad_reason_last = True  # noqa: SLF001
