"""The examples in the public docstrings run as written."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "fsad_anomalib.backbones.features",
    "fsad_anomalib.data.few_shot",
    "fsad_anomalib.data.offline",
    "fsad_anomalib.data.views",
    "fsad_anomalib.fine_tuning.callback",
    "fsad_anomalib.fine_tuning.shifts",
    "fsad_anomalib.fine_tuning.loss",
    "fsad_anomalib.fine_tuning.synthesis",
    "fsad_anomalib.fine_tuning.tuner",
    "fsad_anomalib.fine_tuning.views",
    "fsad_anomalib.models.components.sampling",
    "fsad_anomalib.models.few_shot_contrastive.lightning_model",
    "fsad_anomalib.models.few_shot_contrastive.torch_model",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name: str) -> None:
    import torch

    torch.manual_seed(0)
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no example"
    assert result.failed == 0
