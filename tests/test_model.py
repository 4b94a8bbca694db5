"""FewShotContrastive end to end with anomalib's Engine, on a generated dataset with visible defects."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import seed_everything

from fsad_anomalib.data import FewShot
from fsad_anomalib.data.views import Symmetries, Views
from fsad_anomalib.fine_tuning import ContrastiveFineTuning
from fsad_anomalib.models import FewShotContrastive, FewShotContrastiveModel, NotFittedError
from fsad_anomalib.models.components import mahalanobis
from fsad_anomalib.models.components.held_out import local_map, topk_mean

from .conftest import auroc, cpu_engine, folder_datamodule

IMAGE_SIZE = 96


def make_model(**kwargs) -> FewShotContrastive:
    args = {"image_size": IMAGE_SIZE, "fine_tuning": ContrastiveFineTuning(steps=4), "n_views": 4}
    args.update(kwargs)
    return FewShotContrastive(**args)


@torch.no_grad()
def scores(model: FewShotContrastive, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    out = model.model(images)
    return out.pred_score, out.anomaly_map


@pytest.fixture(scope="module")
def trained(generated_root, tmp_path_factory):
    """K = 4, fine-tuned, trained and tested once for the module."""
    seed_everything(0)
    root = tmp_path_factory.mktemp("trained")
    datamodule = FewShot(folder_datamodule(generated_root), k_shot=4, seed=0)
    model = make_model()
    initial = {k: v.clone() for k, v in model.model.feature_extractor.state_dict().items()}
    eng = cpu_engine(root)
    eng.fit(model=model, datamodule=datamodule)
    metrics = eng.test(model=model, datamodule=datamodule)[0]
    return {"model": model, "engine": eng, "datamodule": datamodule, "metrics": metrics, "initial": initial}


def test_train_and_test_detects_visible_defects(trained):
    assert trained["metrics"]["image_AUROC"] >= 0.9
    assert trained["metrics"]["pixel_AUROC"] >= 0.9
    assert len(trained["datamodule"].train_data) == 4


def test_fine_tuning_changes_backbone_weights(trained):
    after = trained["model"].model.feature_extractor.state_dict()
    changed = [k for k, v in trained["initial"].items() if v.is_floating_point() and not torch.equal(v, after[k])]
    assert changed, "fine-tuning left every backbone weight unchanged"
    # BatchNorm running statistics stay frozen during fine-tuning
    assert not any("running_" in k for k in changed)


def test_frozen_mode_keeps_backbone_weights(generated_root, tmp_path):
    seed_everything(0)
    model = make_model(fine_tuning=False)
    before = {k: v.clone() for k, v in model.model.feature_extractor.state_dict().items()}
    cpu_engine(tmp_path).fit(model=model, datamodule=FewShot(folder_datamodule(generated_root), k_shot=3, seed=1))
    after = model.model.feature_extractor.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    assert bool(model.model.is_fitted)


def test_k_equals_one_trains_and_scores(generated_root, tmp_path):
    seed_everything(0)
    datamodule = FewShot(folder_datamodule(generated_root), k_shot=1, seed=2)
    model = make_model()
    eng = cpu_engine(tmp_path)
    eng.fit(model=model, datamodule=datamodule)
    metrics = eng.test(model=model, datamodule=datamodule)[0]
    assert metrics["image_AUROC"] >= 0.8
    images = torch.rand(3, 3, IMAGE_SIZE, IMAGE_SIZE)
    score, amap = scores(model, images)
    assert torch.isfinite(score).all() and torch.isfinite(amap).all()
    assert score.std() > 0


def test_checkpoint_round_trip_gives_identical_scores(trained, tmp_path):
    model = trained["model"]
    path = tmp_path / "model.ckpt"
    trained["engine"].trainer.save_checkpoint(path)
    reloaded = FewShotContrastive.load_from_checkpoint(path)
    assert dict(reloaded.fine_tuning.hparams) == dict(model.fine_tuning.hparams)  # the settings travel as plain values
    images = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    s1, m1 = scores(model, images)
    s2, m2 = scores(reloaded, images)
    assert torch.equal(s1, s2) and torch.equal(m1, m2)
    assert reloaded.model.describe() == model.model.describe()  # the self-configured choice travels too
    # the full graph (pre-processing, model, post-processing) agrees too
    reloaded.eval()
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(images).pred_score, reloaded(images).pred_score)


def test_anomalib_lifecycle_validate_predict_export(trained, tmp_path, monkeypatch):
    """The lifecycle anomalib's own integration tests run for built-in models."""
    eng, model, datamodule = trained["engine"], trained["model"], trained["datamodule"]
    ckpt = eng.trainer.checkpoint_callback.best_model_path or eng.trainer.checkpoint_callback.last_model_path
    assert ckpt and Path(ckpt).exists()
    val = eng.validate(model=model, datamodule=datamodule, ckpt_path=ckpt)
    assert isinstance(val, list)  # anomalib computes no validation metrics by default; it must run through
    test = eng.test(model=model, datamodule=datamodule, ckpt_path=ckpt)
    assert test[0]["image_AUROC"] == pytest.approx(trained["metrics"]["image_AUROC"], abs=1e-6)
    predictions = eng.predict(model=model, datamodule=datamodule, ckpt_path=ckpt)
    assert predictions and predictions[0].pred_score is not None and predictions[0].anomaly_map is not None
    exported = eng.export(model=model, export_type="torch", export_root=tmp_path)
    assert exported is not None and Path(exported).exists()
    from anomalib.deploy import TorchInferencer

    monkeypatch.setenv("TRUST_REMOTE_CODE", "1")  # the file was written by this test
    inferencer = TorchInferencer(path=exported, device="cpu")
    image = datamodule.test_data[0].image
    result = inferencer.predict(image)
    model.eval()
    with torch.no_grad():
        eager = model(image[None].to(model.device))
    assert result.pred_score.item() == eager.pred_score.item()  # the torch export round-trips exactly
    assert torch.equal(torch.as_tensor(result.anomaly_map).reshape(-1), eager.anomaly_map.reshape(-1).cpu())


def test_supported_backbones_and_errors():
    model = FewShotContrastive(backbone="resnet18", pre_trained=False, image_size=64)
    assert model.model.global_dim == 512
    with pytest.raises(ValueError, match="not a timm model"):
        FewShotContrastive(backbone="no_such_net_42", pre_trained=False)
    with pytest.raises(ValueError, match="score_mode"):
        FewShotContrastive(score_mode="median")
    with pytest.raises(ValueError, match="image_size"):
        FewShotContrastive(image_size=8)
    unfitted = FewShotContrastive(image_size=64)
    with pytest.raises(NotFittedError, match="never fitted"):
        unfitted(torch.rand(1, 3, 64, 64))
    # the normalisation PatchCore and PaDiM get in the benchmark is the one the model reads from its weights
    from fsad_anomalib.backbones import backbone_normalization

    for net, built in (("offline:tf_efficientnet_lite0", unfitted), ("resnet18", model)):
        mean, std = backbone_normalization(net)
        assert torch.allclose(built.model.pixel_mean.flatten(), torch.tensor(mean))
        assert torch.allclose(built.model.pixel_std.flatten(), torch.tensor(std))
    assert backbone_normalization("offline:tf_efficientnet_lite0")[0] == (0.5, 0.5, 0.5)  # not ImageNet's


def _train_once(root: Path, generated_root: Path) -> torch.Tensor:
    seed_everything(123)
    datamodule = FewShot(folder_datamodule(generated_root), k_shot=3, seed=5)
    model = make_model(fine_tuning=ContrastiveFineTuning(steps=2), n_views=2, image_size=64)
    cpu_engine(root).fit(model=model, datamodule=datamodule)
    seed_everything(0)
    images = torch.rand(4, 3, 64, 64)
    return scores(model, images)[0]


def test_same_seed_gives_identical_scores(generated_root, tmp_path):
    first = _train_once(tmp_path / "a", generated_root)
    second = _train_once(tmp_path / "b", generated_root)
    assert torch.equal(first, second)


def test_predict_on_a_folder_writes_one_overlay_per_image(trained, generated_root, tmp_path):
    eng = cpu_engine(tmp_path)
    folder = generated_root / "test" / "bad"
    ckpt = trained["engine"].trainer.checkpoint_callback.best_model_path
    model = FewShotContrastive.load_from_checkpoint(ckpt)  # as `anomalib predict --ckpt_path` does
    predictions = eng.predict(model=model, data_path=folder)
    n_images = len(list(folder.glob("*.png")))
    assert sum(len(p.pred_score) for p in predictions) == n_images
    overlays = list(tmp_path.rglob("*.png"))
    assert len(overlays) == n_images


def _scores_a_bright_square_above_normals(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Four random normals and the same with a bright square: every defect scores above every normal."""
    normals = 0.4 + 0.2 * torch.rand(4, 3, 64, 64)
    defects = normals.clone()
    defects[:, :, 20:36, 20:36] = 1.0
    with torch.no_grad():
        normal_scores, defect_scores = model(normals).pred_score, model(defects).pred_score
    assert torch.isfinite(normal_scores).all() and (defect_scores > normal_scores.max()).all()
    return normals, defects, defect_scores


def test_knn_score_mode_coreset_checkpoint_and_onnx(tmp_path):
    """score_mode="knn": a coreset memory bank that travels with the state dict and exports with any batch size."""
    import onnxruntime as ort

    from fsad_anomalib.models.few_shot_contrastive.torch_model import FewShotContrastiveModel

    torch.manual_seed(0)
    model = FewShotContrastiveModel(score_mode="knn", coreset_ratio=0.25).eval()
    stats = model.fit(0.4 + 0.2 * torch.rand(3, 3, 64, 64))
    assert stats["memory_bank"] == int(0.25 * stats["n_patch"]) and model.memory_bank.shape[1] == model.patch_dim
    normals, defects, defect_scores = _scores_a_bright_square_above_normals(model)
    # a fresh model takes the bank's size from the state dict (anomalib's DynamicBufferMixin)
    fresh = FewShotContrastiveModel(score_mode="knn", coreset_ratio=0.25).eval()
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(defects).pred_score, defect_scores)

    class Scores(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            out = self.inner(x)
            return out.pred_score, out.anomaly_map

    path = tmp_path / "knn.onnx"
    torch.onnx.export(
        Scores(model),
        (normals[:1],),
        str(path),
        input_names=["image"],
        dynamo=False,
        dynamic_axes={"image": {0: "batch"}},
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    onnx_scores = session.run(None, {"image": defects.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(onnx_scores), defect_scores, rtol=1e-4, atol=1e-4)


def test_subspace_score_mode_fits_a_residual_projector_that_scores_and_exports(tmp_path):
    """score_mode="subspace": the patch map is each patch's residual outside the normals' principal subspace."""
    import onnxruntime as ort

    from fsad_anomalib.models.few_shot_contrastive.torch_model import FewShotContrastiveModel

    torch.manual_seed(0)
    model = FewShotContrastiveModel(pre_trained=False, score_mode="subspace").eval()
    stats = model.fit(0.4 + 0.2 * torch.rand(3, 3, 64, 64))
    assert model.describe()["local"] == "subspace" and 0 < stats["subspace_rank"] < model.patch_dim
    assert stats["memory_bank"] == 0
    # the stored matrix is a projector (symmetric, idempotent), not a precision
    torch.testing.assert_close(model.patch_precision @ model.patch_precision, model.patch_precision, atol=1e-4, rtol=0)
    normals, defects, defect_scores = _scores_a_bright_square_above_normals(model)
    path = tmp_path / "subspace.onnx"
    torch.onnx.export(model, (normals[:1],), str(path), input_names=["image"], dynamo=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    onnx_score = session.run(None, {"image": defects[:1].numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(onnx_score), defect_scores[:1], rtol=1e-4, atol=1e-4)


def test_two_scales_map_at_the_fine_resolution_reload_and_export(tmp_path):
    """fine_layers: the fine scale's Gaussian travels with the state dict and the map comes at its resolution.

    A local flaw scores above every normal with the global part fused, and ONNX gives the same scores.
    """
    import onnxruntime as ort

    from fsad_anomalib.models.few_shot_contrastive.torch_model import FewShotContrastiveModel

    torch.manual_seed(0)
    model = FewShotContrastiveModel(score_mode="combined", fine_layers=(1, 2)).eval()
    stats = model.fit(0.4 + 0.2 * torch.rand(3, 3, 64, 64))
    assert model.describe()["fine_layers"] == [1, 2] and stats["fine_scale"] > 0
    assert model.fine_precision.shape == (model.fine_dim, model.fine_dim) and model.fine_dim == 24 + 40
    normals, defects, defect_scores = _scores_a_bright_square_above_normals(model)
    with torch.no_grad():
        patch, fine, _ = model._all_features(defects[:1])  # noqa: SLF001 - the maps' resolutions
    assert fine.shape[-1] == 2 * patch.shape[-1]
    with pytest.raises(ValueError, match=r"fine_layers / global_layer \[9\]: backbone .* has no such feature layer"):
        FewShotContrastiveModel(fine_layers=(9,))
    fresh = FewShotContrastiveModel(score_mode="combined", fine_layers=(1, 2)).eval()
    fresh.load_state_dict(model.state_dict())
    path = tmp_path / "two_scales.onnx"
    torch.onnx.export(fresh, (normals[:1],), str(path), input_names=["image"], dynamo=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    onnx_score = session.run(None, {"image": defects[:1].numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(onnx_score), defect_scores[:1], rtol=1e-4, atol=1e-4)


def test_knn_patch_score_is_the_geometric_mean_of_both_patch_distances():
    """score_mode="knn_patch": per patch, sqrt(knn distance * Mahalanobis distance) of one fitted model."""
    from fsad_anomalib.models.few_shot_contrastive.torch_model import FewShotContrastiveModel

    torch.manual_seed(0)
    model = FewShotContrastiveModel(score_mode="knn_patch", coreset_ratio=0.25).eval()
    model.fit(0.4 + 0.2 * torch.rand(3, 3, 64, 64))
    normals = 0.4 + 0.2 * torch.rand(4, 3, 64, 64)
    defects = normals.clone()
    defects[:, :, 20:36, 20:36] = 1.0
    with torch.no_grad():
        patch, _ = model.features(defects)
        maps = {
            mode: local_map(patch, mode, model.patch_mean, model.patch_precision, model.memory_bank)
            for mode in ("knn", "patch", "knn_patch")
        }
        combined, normal_scores = model(defects), model(normals).pred_score
    torch.testing.assert_close(maps["knn_patch"], (maps["knn"] * maps["patch"]).sqrt())
    assert (maps["knn"] > 0).any() and not torch.allclose(maps["knn_patch"], maps["knn"])
    assert (combined.pred_score > normal_scores.max()).all()
    # a local part alone is standardised on held-out normals as well (a refit then scores on its own level)
    assert model.score_shift[1] > 0 and model.score_scale[1] > 0
    expected = (topk_mean(maps["knn_patch"], model.topk_ratio) - model.score_shift[1]) / model.score_scale[1]
    torch.testing.assert_close(combined.pred_score, expected)


def test_greedy_coreset_keeps_the_farthest_points():
    from fsad_anomalib.models.components import greedy_coreset

    line = torch.arange(11, dtype=torch.float32)[:, None] * torch.tensor([[1.0, 0.0]])
    kept = sorted(greedy_coreset(line, 3)[:, 0].tolist())
    assert kept == [0.0, 5.0, 10.0]  # both ends (farthest from the mean first), then the middle
    assert greedy_coreset(line, 20).shape == line.shape


def test_building_the_model_leaves_the_pretrained_weights_as_they_are():
    """No forward pass at construction: one in train mode moved every BatchNorm's running statistics."""
    from fsad_anomalib.models.components import build_feature_extractor

    model = FewShotContrastive(fine_tuning=False)
    reference, _, _ = build_feature_extractor("offline:tf_efficientnet_lite0", [2, 3, 4], pre_trained=True)
    built, pretrained = model.model.feature_extractor.state_dict(), reference.state_dict()
    assert built.keys() == pretrained.keys()
    assert all(torch.equal(built[k], pretrained[k]) for k in built)


def part_scores_of(model: FewShotContrastiveModel, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The raw global and local (patch Gaussian) image scores of a fitted model, through public pieces."""
    patch, emb = model.features(images)
    local = local_map(patch, "patch", model.patch_mean, model.patch_precision, None)
    return mahalanobis(emb, model.global_mean, model.global_precision), topk_mean(local, model.topk_ratio)


def test_fused_parts_are_standardised_on_held_out_normals():
    """Each image scored against Gaussians fitted on the other K - 1; one view held out at a time when K = 1.

    Three parts: the global score, the local score at ``layers`` and the one at ``fine_layers``; the two local
    scales are averaged once standardised, and fused with the global part.
    """
    from fsad_anomalib.models import FewShotContrastiveModel
    from fsad_anomalib.models.components import mahalanobis
    from fsad_anomalib.models.components.held_out import MIN_RELATIVE_STD

    torch.manual_seed(0)
    images = torch.rand(3, 3, 64, 64)
    model = FewShotContrastiveModel(score_mode="combined", fine_layers=(1, 2)).eval()
    model.fit(images)
    global_held, patch_held, fine_held = [], [], []
    for i in range(3):
        rest = torch.cat([images[:i], images[i + 1 :]])
        other = FewShotContrastiveModel(score_mode="patch", layers=model.layers).eval()
        other.fit(rest)
        fine = FewShotContrastiveModel(score_mode="patch", layers=model.fine_layers).eval()
        fine.fit(rest)
        with torch.no_grad():
            _patch, emb = other.features(images[i : i + 1])
            global_held.append(mahalanobis(emb, other.global_mean, other.global_precision))
            patch_held.append(part_scores_of(other, images[i : i + 1])[1])  # the raw patch score
            fine_held.append(part_scores_of(fine, images[i : i + 1])[1])  # the fine scale's raw patch score
    held = [torch.cat(global_held), torch.cat(patch_held), torch.cat(fine_held)]
    expected_shift = torch.stack([h.mean() for h in held])
    expected_scale = torch.stack([torch.maximum(h.std(), MIN_RELATIVE_STD * h.mean()) for h in held])
    assert torch.allclose(model.score_shift, expected_shift, rtol=1e-4)
    assert torch.allclose(model.score_scale, expected_scale, rtol=1e-4)
    # the fused score is the mean of the standardised global part and the mean of the two standardised local scales
    with torch.no_grad():
        g, p = part_scores_of(model, images[:2])
        fine_patch, _ = fine.features(images[:2])  # the same backbone and layers: the model's fine features
        f = topk_mean(local_map(fine_patch, "patch", model.fine_mean, model.fine_precision, None), model.topk_ratio)
        z = [(s - expected_shift[i]) / expected_scale[i] for i, s in enumerate((g, p, f))]
        expected = 0.5 * (z[0] + 0.5 * (z[1] + z[2]))
        torch.testing.assert_close(model(images[:2]).pred_score, expected, rtol=1e-4, atol=1e-4)
    # held-out normals score higher than the images the Gaussians were fitted on
    with torch.no_grad():
        in_sample_g, in_sample_p = part_scores_of(model, images)
    assert in_sample_g.mean() < expected_shift[0] and in_sample_p.mean() < expected_shift[1]
    # K = 1: the flips and turns the fit did not use are the held-out evidence
    one = FewShotContrastiveModel(score_mode="combined").eval()
    one.fit(images[:1])
    with torch.no_grad():
        g_one, _ = part_scores_of(one, images[:1])
    assert torch.isfinite(one.score_scale).all() and torch.all(one.score_scale > 1e-6)
    assert one.score_shift[0] > g_one[0]
    # one image, no flip or turn: nothing to hold out, a finite scale all the same
    one.fit(images[:1], Views(1, Symmetries.of([])))
    assert torch.isfinite(one.score_scale).all() and torch.all(one.score_scale > 1e-6)


def test_combined_score_catches_a_local_defect_and_a_whole_image_shift():
    import cv2
    import numpy as np

    from fsad_anomalib.models import FewShotContrastiveModel

    from .conftest import _normal

    rng = np.random.default_rng(0)

    def tensor(image: np.ndarray) -> torch.Tensor:
        return torch.tensor(image).permute(2, 0, 1).float() / 255

    def local_defect() -> torch.Tensor:
        image = _normal(rng, 96)
        x, y = (int(v) for v in rng.integers(20, 76, 2))
        cv2.circle(image, (x, y), 7, (245, 245, 245), -1)
        return tensor(image)

    train = torch.stack([tensor(_normal(rng, 96)) for _ in range(4)])
    normal = torch.stack([tensor(_normal(rng, 96)) for _ in range(16)])
    local = torch.stack([local_defect() for _ in range(16)])
    shifted = torch.stack([tensor(_normal(rng, 96)) for _ in range(16)]) ** 0.7  # the whole surface brighter
    model = FewShotContrastiveModel(score_mode="combined").eval()
    model.fit(train)
    with torch.no_grad():
        s_normal, s_local, s_shifted = (model(x).pred_score for x in (normal, local, shifted))

    assert auroc(s_normal, s_local) >= 0.9
    assert auroc(s_normal, s_shifted) >= 0.9


def test_anomalib_builds_the_model_every_way_its_pipelines_do() -> None:
    """A name, a class_path dict (short or dotted, as anomalib's benchmark and tiled-ensemble pipelines pass it)."""
    from anomalib.models import get_model

    assert isinstance(get_model("FewShotContrastive", pre_trained=False), FewShotContrastive)
    for class_path in (
        "FewShotContrastive",
        "anomalib.models.FewShotContrastive",
        "fsad_anomalib.models.FewShotContrastive",
    ):
        model = get_model({"class_path": class_path, "init_args": {"pre_trained": False, "image_size": 64}})
        assert isinstance(model, FewShotContrastive) and model.image_size == 64


@pytest.mark.parametrize("name", ["FewShotContrastive", "Padim"])
def test_a_plain_datamodule_without_validation_trains_to_a_fitted_checkpoint(name, generated_root, tmp_path) -> None:
    """val_split_mode none on anomalib's own Folder (no FewShot wrapper): no validation pass, and the checkpoint
    training writes holds the fitted model and its threshold (FewShotContrastive, or a stock model with the
    normal-only post-processor).
    """
    from anomalib.models import Padim

    from fsad_anomalib.backbones import offline_backbone
    from fsad_anomalib.post_processing import NormalThresholdPostProcessor

    if name == "Padim":
        model = Padim(
            backbone=offline_backbone(),
            layers=["blocks.1", "blocks.2"],
            n_features=40,
            pre_processor=Padim.configure_pre_processor(image_size=(64, 64)),
            post_processor=NormalThresholdPostProcessor(),
        )
    else:
        model = FewShotContrastive(image_size=64, fine_tuning=False)
    datamodule = folder_datamodule(generated_root, val_split_mode="none", train_batch_size=4)
    engine = cpu_engine(tmp_path)
    engine.fit(model=model, datamodule=datamodule)
    (ckpt,) = tmp_path.rglob("model.ckpt")
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert torch.isfinite(state["post_processor._image_threshold"])
    fitted = state["model.is_fitted"] if name == "FewShotContrastive" else state["_is_fitted"]
    assert bool(fitted.all())
