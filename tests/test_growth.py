"""Growing a trained model with confirmed good parts (``confirm(..., grow=True)``): cross-conformal threshold."""

from __future__ import annotations

import pytest
import torch
from anomalib.data import InferenceBatch
from anomalib.models import Padim, Patchcore
from lightning.pytorch import seed_everything
from torch import nn

from fsad_anomalib.confirm import confirm
from fsad_anomalib.data import FewShot
from fsad_anomalib.models import FewShotContrastive
from fsad_anomalib.post_processing import NormalThresholdPostProcessor, conformal_bound
from fsad_anomalib.post_processing.growth import cross_fitted_scores, far_out

from .conftest import cpu_engine, folder_datamodule, make_dataset

SIZE = 64


class _Distance(nn.Module):
    """Scores an image by the distance of its mean value from the mean of the images it was fitted on."""

    def __init__(self, images: torch.Tensor) -> None:
        super().__init__()
        values = images.flatten(1).mean(1)
        self.register_buffer("mean", values.mean())

    def forward(self, images: torch.Tensor) -> InferenceBatch:
        return InferenceBatch(pred_score=(images.flatten(1).mean(1) - self.mean).abs())


def test_cross_conformal_threshold_keeps_the_target_rate_on_fresh_normals():
    """Over 400 lines of 39 normals (heavy-tailed scores), fresh normals of each line exceed its cross-conformal
    threshold at most at the target rate on average, and not far below it; no image is scored by a model fitted on it.
    """
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    rate, n, exceed = 0.1, 39, []
    for _ in range(400):
        line = torch.distributions.StudentT(3.0).sample((n + 200, 1, 1, 1))
        images, fresh = line[:n], line[n:]
        order = torch.randperm(n, generator=generator)
        images = images[order]
        scores, maxima = cross_fitted_scores(images, _Distance, folds=5)
        assert torch.isnan(maxima).all()  # no anomaly map: no pixel scores
        threshold = conformal_bound(scores, rate)["threshold"]
        exceed.append(float((_Distance(images)(fresh).pred_score > threshold).float().mean()))
    measured = sum(exceed) / len(exceed)
    assert rate - 1 / (n + 1) - 0.02 <= measured <= rate + 0.01, measured


def test_cross_fitted_scores_never_score_an_image_with_a_model_fitted_on_it():
    seen = []

    def refit(images: torch.Tensor) -> nn.Module:
        seen.append({float(v) for v in images.flatten()})
        return _Distance(images)

    images = torch.arange(10.0).view(10, 1, 1, 1)
    scores, _ = cross_fitted_scores(images, refit, folds=3)
    assert len(seen) == 3 and all(len(fit) in {6, 7} for fit in seen)
    for value, score in zip(images.flatten().tolist(), scores.tolist(), strict=True):
        fitted_without = [fit for fit in seen if value not in fit]
        assert len(fitted_without) == 1 and score == pytest.approx(
            abs(value - sum(fitted_without[0]) / len(fitted_without[0]))
        )
    with pytest.raises(ValueError, match=r"folds must be in \[2, 10\]"):
        cross_fitted_scores(images, refit, folds=1)


def test_far_out_flags_only_a_rejected_part_far_above_the_others():
    scores = torch.tensor([1.0, 1.1, 0.9, 1.2, 1.05, 0.95, 9.0, float("nan")])
    assert far_out(scores, threshold=1.15).tolist() == [False] * 6 + [True, False]
    assert not far_out(scores, threshold=10.0).any()  # the current model accepts it: not flagged
    assert not far_out(scores[:3], threshold=0.0).any()  # too few parts for quartiles


def _parts(tmp_path, n_good: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Good parts, one defective part, and the test set's images with their labels (all resized to SIZE)."""
    root = make_dataset(tmp_path / "parts", n_train=n_good, n_test=12, size=SIZE, seed=5)
    datamodule = FewShot(folder_datamodule(root, val_split_mode="none"), k_shot=n_good, seed=0)
    datamodule.setup()
    good = torch.cat([batch.image for batch in datamodule.train_dataloader()])
    test = list(datamodule.test_dataloader())
    images, labels = torch.cat([b.image for b in test]), torch.cat([b.gt_label for b in test])
    return torch.cat([good, images[labels == 1][:1]]), images, labels


@pytest.mark.parametrize("method", ["FewShotContrastive", "Patchcore", "Padim"])
def test_growing_adds_good_parts_flags_a_defective_one_and_labels_as_before(method, generated_root, tmp_path):
    """K = 4 training images, then 20 good parts and one defective part: the defective one is listed and left out,
    the model's references (memory bank or Gaussian) are refitted on 24 images, the threshold comes from 24
    cross-fitted scores, the grown model still labels the test set's defects NG, and it can grow again.
    """
    seed_everything(0)
    post = NormalThresholdPostProcessor(false_reject_rate=0.05)
    if method == "FewShotContrastive":
        model = FewShotContrastive(image_size=SIZE, fine_tuning=False, post_processor=post)
    else:
        cls = Patchcore if method == "Patchcore" else Padim
        layers = ["layer2", "layer3"] if method == "Patchcore" else ["layer1", "layer2"]
        extra = {"coreset_sampling_ratio": 0.1} if method == "Patchcore" else {"n_features": 64}
        pre = cls.configure_pre_processor(image_size=(SIZE, SIZE))
        model = cls(backbone="resnet18", pre_trained=False, layers=layers, pre_processor=pre, visualizer=False,
                    post_processor=post, **extra)  # fmt: skip
    datamodule = FewShot(folder_datamodule(generated_root, val_split_mode="none"), k_shot=4, seed=0)
    cpu_engine(tmp_path / "run").fit(model=model, datamodule=datamodule)
    assert post.references.shape == (4, 3, SIZE, SIZE)
    before = {name: value.clone() for name, value in model.model.state_dict().items()}
    parts, test, labels = _parts(tmp_path, 20)
    record = confirm(model, parts, grow=True)  # through the model's pre-processor, as the line's images
    grown = record["grown"]
    assert (grown["references"], grown["added"], grown["folds"]) == (4, 20, 5)
    assert [flag["part"] for flag in grown["flagged"]] == ["#20"]
    assert record["estimator"] == "cross-conformal order statistic" and len(record["image"]["scores"]) == 24
    assert post.references.shape[0] == 24 and float(post.image_threshold) == record["image"]["threshold"]
    changed = [name for name, value in model.model.state_dict().items() if name in before and
               (value.shape != before[name].shape or not torch.equal(value, before[name]))]  # fmt: skip
    assert changed, "the references were not refitted"
    model.eval()
    with torch.no_grad():
        labels_now = model(test).pred_label
    assert bool(labels_now[labels == 1].all())
    again = confirm(model, parts[:8], grow=True)
    assert again["grown"]["references"] == 24 and again["grown"]["added"] == 8
    exported = torch.load(model.to_torch(tmp_path / "export"), map_location="cpu", weights_only=False)["model"]
    assert exported.post_processor.references is None  # the line's model carries no training images


def test_a_patchcore_checkpoint_grows_through_the_command(generated_root, tmp_path, capsys):
    """The command with ``--model Patchcore --grow``: the checkpoint training wrote keeps its 4 images, the grown one
    keeps all 16 and loads into a stock Patchcore with the grown memory bank and the new threshold.
    """
    from fsad_anomalib.confirm import main

    seed_everything(0)
    model = Patchcore(backbone="resnet18", pre_trained=False, layers=["layer2", "layer3"], visualizer=False,
                      pre_processor=Patchcore.configure_pre_processor(image_size=(SIZE, SIZE)),
                      post_processor=NormalThresholdPostProcessor())  # fmt: skip
    datamodule = FewShot(folder_datamodule(generated_root, val_split_mode="none"), k_shot=4, seed=0)
    cpu_engine(tmp_path / "run").fit(model=model, datamodule=datamodule)
    (ckpt,) = (tmp_path / "run").rglob("*.ckpt")
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["fsad_references"].shape == (4, 3, SIZE, SIZE)
    good = make_dataset(tmp_path / "line", n_train=12, n_test=1, size=SIZE, seed=9) / "train" / "good"
    grown_path = tmp_path / "grown.ckpt"
    argv = ["--model", "Patchcore", "--ckpt", str(ckpt), "--images", str(good), "--output", str(grown_path), "--grow"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "grown: 4 training images + 12 good parts" in printed and "NOT ADDED" not in printed
    assert torch.load(grown_path, map_location="cpu", weights_only=False)["fsad_references"].shape[0] == 16
    post = NormalThresholdPostProcessor()
    grown = Patchcore.load_from_checkpoint(grown_path, map_location="cpu", post_processor=post)
    assert grown.model.memory_bank.shape[0] > model.model.memory_bank.shape[0]  # 16 images' patches, not 4
    assert grown.post_processor.calibration["grown"]["added"] == 12
    assert float(post.image_threshold) == pytest.approx(post.calibration["image"]["threshold"], rel=1e-6)


def test_growing_refuses_a_threshold_from_non_finite_scores():
    """A model whose refits score NaN gets no NaN threshold: the error says how many scores were finite."""
    from fsad_anomalib.post_processing.growth import grow

    class _NaN(nn.Module):
        def forward(self, images: torch.Tensor) -> InferenceBatch:
            return InferenceBatch(pred_score=torch.full((images.shape[0],), float("nan")))

    class _Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.post_processor, self.model = NormalThresholdPostProcessor(), _NaN()

        def refit(self, images: torch.Tensor, rescale: bool = True) -> nn.Module:
            del images, rescale
            return _NaN()

    parts = torch.rand(6, 1, 1, 1)
    with pytest.raises(ValueError, match="0 of the 10 images gave a finite score"):
        grow(_Model(), torch.rand(4, 1, 1, 1), parts, torch.rand(6), [str(i) for i in range(6)], 0.05)


def test_the_readme_threshold_example_runs_as_written(generated_root, tmp_path):
    """README "The OK/NG decision": its Python block, run line for line. The only change: ``Patchcore(...)`` builds
    the small offline PatchCore of these tests and trains it (the README's "after training") on K = 4 images.
    """
    import re
    from pathlib import Path

    text = (Path(__file__).parents[1] / "README.md").read_text()
    section = text[text.index("## The OK/NG decision") :]
    code = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)[0]
    assert "from anomalib.models import Patchcore\n" in code
    code = code.replace("from anomalib.models import Patchcore\n", "")

    def trained_patchcore(post_processor: NormalThresholdPostProcessor) -> Patchcore:
        seed_everything(0)
        model = Patchcore(backbone="resnet18", pre_trained=False, layers=["layer2", "layer3"], visualizer=False,
                          pre_processor=Patchcore.configure_pre_processor(image_size=(SIZE, SIZE)),
                          post_processor=post_processor)  # fmt: skip
        datamodule = FewShot(folder_datamodule(generated_root, val_split_mode="none"), k_shot=4, seed=0)
        cpu_engine(tmp_path / "run").fit(model=model, datamodule=datamodule)
        return model

    line = make_dataset(tmp_path / "line", n_train=30, n_test=1, size=SIZE, seed=3)
    good = FewShot(folder_datamodule(line, val_split_mode="none"), k_shot=30, seed=0)
    good.setup()
    images = torch.cat([batch.image for batch in good.train_dataloader()])
    namespace = {"Patchcore": trained_patchcore, "good_parts": images[:20], "more_good_parts": images[20:]}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the README's own example
    post = namespace["model"].post_processor
    assert post.false_reject_rate == 0.02 and post.calibration["grown"]["added"] == 10
    assert post.calibration["grown"]["references"] == 4 and post.references.shape[0] == 14
