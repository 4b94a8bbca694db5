"""Command-line helpers shared by the benchmark commands (``benchmark`` and ``benchmark.speed``)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["build_from_spec", "int_at_least", "json_object", "parse_json_object", "quiet_logs", "rate", "read_yaml"]


def read_yaml(path: Path, error: Callable[[str], Exception]) -> Any:  # noqa: ANN401
    """The YAML content of ``path``; a file that cannot be read or is not YAML raises ``error(what)``."""
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        msg = f"cannot read the file ({exc})."
        raise error(msg) from exc
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        msg = f"not a YAML file ({' '.join(str(exc).split())[:300]})."
        raise error(msg) from exc


def parse_json_object(text: str, option: str = "") -> dict[str, Any]:
    """``text`` as a JSON object of FewShotContrastive arguments; otherwise a ``ValueError`` naming ``option``."""
    prefix = f"{option}: " if option else ""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        msg = f"{prefix}'{text}' is not valid JSON ({exc})"
        raise ValueError(msg) from exc
    if not isinstance(value, dict):
        msg = f"{prefix}'{text}' is not a JSON object of FewShotContrastive arguments"
        raise ValueError(msg)  # noqa: TRY004 - argparse reports a ValueError as the option's error
    return value


def json_object(text: str) -> dict[str, Any]:
    """Argparse ``type`` for a JSON object (argparse puts the option's name in front of the error)."""
    try:
        return parse_json_object(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def int_at_least(minimum: int):  # noqa: ANN201
    """Argparse ``type``: an integer >= ``minimum`` (argparse names the option in its error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            msg = f"expected an integer >= {minimum}, got '{text}'"
            raise argparse.ArgumentTypeError(msg)
        return value

    return parse


def rate(text: str) -> float:
    """An argparse type: a false-reject rate in (0, 0.5)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 < value < 0.5:
        msg = f"expected a rate in (0, 0.5), e.g. 0.05 for 5 % of good parts rejected, got '{text}'"
        raise argparse.ArgumentTypeError(msg)
    return value


def build_from_spec(base: type, spec: dict[str, Any], what: str, error: Callable[[str], Exception]) -> Any:  # noqa: ANN401
    """An instance of a ``base`` subclass built from a ``class_path`` / ``init_args`` spec.

    Parsed by jsonargparse as anomalib's CLI
    parses them (short class names included); any failure raises ``error("its <what> (<class>) could not be built:
    ...")``.
    """
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(base, "spec", required=True)
    try:
        return parser.instantiate_classes(parser.parse_object({"spec": spec})).spec
    except Exception as exc:  # jsonargparse reports a wrong class or argument as one of several error types
        msg = f"its {what} ({spec.get('class_path')}) could not be built: {' '.join(str(exc).split())[:600]}"
        raise error(msg) from exc


def quiet_logs() -> None:
    """Lightning's and anomalib's logs at ERROR only, and no OpenVINO telemetry: a run prints its own progress."""
    import logging
    import os

    os.environ.setdefault("OPENVINO_TELEMETRY_DISABLED", "1")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_fabric", "anomalib"):
        logging.getLogger(name).setLevel(logging.ERROR)
