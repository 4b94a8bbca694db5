"""The default model configures itself from the K normals: choice, evidence, determinism, overrides, K = 1."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from lightning.pytorch import seed_everything

from fsad_anomalib.data import FewShot
from fsad_anomalib.data.views import Symmetries, Views
from fsad_anomalib.fine_tuning.shifts import SHIFT_FAMILIES
from fsad_anomalib.models import FewShotContrastive, FewShotContrastiveModel
from fsad_anomalib.models.few_shot_contrastive.self_configuration import (
    FINE_TUNING_MARGIN,
    best,
    candidates_for,
    self_check,
)

from .conftest import _normal, auroc, cpu_engine, folder_datamodule, unseen_shift

IMAGE_SIZE = 96


def _tensor(image: np.ndarray) -> torch.Tensor:
    return torch.tensor(image).permute(2, 0, 1).float() / 255


@pytest.fixture(scope="module")
def default_run(generated_root, tmp_path_factory):
    """The default FewShotContrastive, every choice "auto", trained once on K = 5 generated normals."""
    seed_everything(0)
    root = tmp_path_factory.mktemp("default")
    model = FewShotContrastive(image_size=IMAGE_SIZE)
    datamodule = FewShot(folder_datamodule(generated_root), k_shot=5, seed=0)
    engine = cpu_engine(root)
    engine.fit(model=model, datamodule=datamodule)
    return {"model": model, "root": root, "engine": engine}


def _local_and_shift_auroc(model: FewShotContrastiveModel) -> tuple[float, float]:
    """Image AUROC of fresh normals against local defects and against whole-image shifts the self-check never makes."""
    rng = np.random.default_rng(5)

    def local_defect() -> torch.Tensor:
        image = _normal(rng, IMAGE_SIZE)
        x, y = (int(v) for v in rng.integers(20, 76, 2))
        cv2.circle(image, (x, y), 6, (235, 235, 235), -1)
        return _tensor(image)

    normal = torch.stack([_tensor(_normal(rng, IMAGE_SIZE)) for _ in range(24)])
    local = torch.stack([local_defect() for _ in range(24)])
    fresh = torch.stack([_tensor(_normal(rng, IMAGE_SIZE)) for _ in range(24)])
    # whole-image shifts of kinds the self-check never makes, one after another
    shifted = torch.cat([unseen_shift(fresh[i : i + 1], i) for i in range(24)])
    with torch.no_grad():
        s_normal, s_local, s_shifted = (model.eval()(x).pred_score for x in (normal, local, shifted))
    assert torch.isfinite(s_normal).all()
    return auroc(s_normal, s_local), auroc(s_normal, s_shifted)


def test_default_catches_a_local_defect_and_a_whole_image_shift(default_run):
    model = default_run["model"].model
    local, shifted = _local_and_shift_auroc(model)
    assert local >= 0.9
    assert shifted >= 0.9
    # both parts are in the score: the default fuses local and global evidence
    assert model.fusion in {"max", "mean"}


def test_threshold_refits_from_k5_score_on_the_deployed_scales(default_run):
    """The K = 5 threshold's refits (on 4 images) keep the deployed parts' scales, references alone refitted; the
    bound reads the held-out scores above the fused score's floor (every part at distance 0), which nothing goes below.
    """
    model = default_run["model"]
    images = model.post_processor.references
    calibration = model.post_processor.calibration
    assert images.shape[0] == 5 and calibration["k_shot"] == 5
    floors = (-model.model.score_shift / model.model.score_scale).tolist()
    image_floor, map_floor = model.score_floor()
    local_floor = floors[1] if not model.model.two_scales else (floors[1] + floors[2]) / 2
    assert map_floor == pytest.approx(local_floor) and image_floor == pytest.approx(max(floors[0], local_floor))
    assert calibration["image"]["transform"] == "log" and calibration["image"]["floor"] == pytest.approx(image_floor)
    assert min(calibration["held_out_scores"]) > image_floor
    with torch.no_grad():
        assert bool((model.model.eval()(torch.rand(4, 3, IMAGE_SIZE, IMAGE_SIZE)).pred_score > image_floor).all())
    refit = model.refit(images[1:])
    assert torch.equal(refit.score_shift, model.model.score_shift)
    assert torch.equal(refit.score_scale, model.model.score_scale)
    assert not torch.equal(refit.patch_mean, model.model.patch_mean)  # fitted on the 4 images alone
    # on 3 images (the refits of K = 4) a refit standardises itself
    assert not torch.equal(model.refit(images[2:]).score_shift, model.model.score_shift)


def test_auto_writes_its_choice_and_evidence_and_keeps_them_in_the_checkpoint(default_run, tmp_path):
    model, _root = default_run["model"], default_run["root"]
    record = json.loads((Path(default_run["engine"].trainer.default_root_dir) / "self_configuration.json").read_text())
    assert record["k_shot"] == 5 and record["seed"] == 0
    table = record["selection"]["table"]
    # K >= 5: every local scoring, each fused with the global score
    assert [(row["local"], row["fusion"]) for row in table] == [("knn_patch", "max"), ("patch", "max"), ("knn", "max")]
    assert all(0 <= row["score"] <= 1 and set(row["families"]) == set(SHIFT_FAMILIES) for row in table)
    chosen = record["chosen"]
    assert chosen == {**model.model.describe(), "fine_tuned": chosen["fine_tuned"]}
    decision = record["fine_tuning"]
    assert decision["fine_tuned"] == (decision["fine_tuned_score"] > decision["frozen_score"] + FINE_TUNING_MARGIN)
    assert "cutpaste" not in decision["families"] and decision["tuned_on"] + decision["judged_on"] == 5
    # the checkpoint keeps the choice: a model rebuilt from it scores as the trained one
    path = tmp_path / "model.ckpt"
    default_run["engine"].trainer.save_checkpoint(path)
    loaded = FewShotContrastive.load_from_checkpoint(path)
    assert loaded.self_configuration["chosen"] == chosen
    assert loaded.model.describe() == model.model.describe()
    images = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        assert torch.equal(loaded.model.eval()(images).pred_score, model.model.eval()(images).pred_score)


def test_self_check_is_deterministic_for_a_seed():
    torch.manual_seed(0)
    images = torch.rand(3, 3, 64, 64)
    model = FewShotContrastiveModel(pre_trained=False).eval()
    first = self_check(model, images, Views(), candidates_for("auto"), seed=3)
    torch.rand(100)  # other draws from the global stream in between change nothing
    again = self_check(model, images, Views(), candidates_for("auto"), seed=3)
    assert [(r["candidate"], r["score"], r["families"]) for r in first] == [
        (r["candidate"], r["score"], r["families"]) for r in again
    ]
    assert best(first)["candidate"] == best(again)["candidate"]
    # the prior is kept unless another candidate is clearly better
    rows = [{"candidate": "a", "score": 0.80}, {"candidate": "b", "score": 0.81}, {"candidate": "c", "score": 0.85}]
    assert best(rows)["candidate"] == "c"
    assert best(rows[:2])["candidate"] == "a"


def test_explicit_arguments_override_auto(generated_root, tmp_path):
    seed_everything(0)
    model = FewShotContrastive(image_size=IMAGE_SIZE, score_mode="knn", layers=[2, 3], fine_tuning=False)
    assert len(model.model.candidates) == 1
    engine = cpu_engine(tmp_path)
    engine.fit(model=model, datamodule=FewShot(folder_datamodule(generated_root), k_shot=3, seed=1))
    record = json.loads((Path(engine.trainer.default_root_dir) / "self_configuration.json").read_text())
    assert record["chosen"] == {
        "layers": [2, 3],
        "fine_layers": None,
        "local": "knn",
        "fusion": "local",
        "fine_tuned": False,
    }
    assert "table" not in record["selection"] and "fine_tuning" not in record
    with pytest.raises(ValueError, match="layers must be a non-empty sequence"):
        FewShotContrastiveModel(pre_trained=False, layers="auto")
    with pytest.raises(ValueError, match="fine_tuning must be 'auto'"):
        FewShotContrastive(fine_tuning="sometimes")


def test_k_equals_one_configures_over_views_and_skips_fine_tuning(generated_root, tmp_path):
    seed_everything(0)
    model = FewShotContrastive(image_size=IMAGE_SIZE)
    datamodule = FewShot(folder_datamodule(generated_root), k_shot=1, seed=2)
    engine = cpu_engine(tmp_path)
    engine.fit(model=model, datamodule=datamodule)
    metrics = engine.test(model=model, datamodule=datamodule)[0]
    record = json.loads((Path(engine.trainer.default_root_dir) / "self_configuration.json").read_text())
    # K = 1: the local scorings alone (one embedding leaves the global part nothing to hold out)
    assert [row["fusion"] for row in record["selection"]["table"]] == ["local"] * 3
    assert model.model.fusion == "local"
    assert record["fine_tuning"]["fine_tuned"] is False and "K = 1" in record["fine_tuning"]["reason"]
    assert metrics["image_AUROC"] >= 0.8
    assert torch.isfinite(model.model.score_scale).all()
    # from one image, the default catches a local defect and a whole-image shift
    local, shifted = _local_and_shift_auroc(model.model)
    assert local >= 0.9
    assert shifted >= 0.9
    # one image with no flip or turn allowed: nothing to hold out, the prior stays and training still works
    model = FewShotContrastiveModel(pre_trained=False)
    assert self_check(model, torch.rand(1, 3, 64, 64), Views(1, Symmetries.of([])), candidates_for("auto")) is None
