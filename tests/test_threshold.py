"""The OK/NG threshold from the K normals alone (NormalThresholdPostProcessor)."""

from __future__ import annotations

import copy
import json
import logging
import math

import pytest
import torch
from anomalib.data import InferenceBatch
from anomalib.models import Padim, Patchcore
from lightning.pytorch import seed_everything

from fsad_anomalib.benchmark.thresholds import decision_rates, oracle_f1_threshold
from fsad_anomalib.confirm import confirm
from fsad_anomalib.data import FewShot
from fsad_anomalib.models import FewShotContrastive
from fsad_anomalib.post_processing import NormalThresholdPostProcessor, conformal_bound, prediction_bound
from fsad_anomalib.post_processing.bounds import bound_at

from .conftest import cpu_engine, folder_datamodule, make_dataset

SIZE = 64


def _patchcore(rate: float = 0.05) -> Patchcore:
    return Patchcore(
        backbone="resnet18",
        pre_trained=False,
        layers=["layer2", "layer3"],
        coreset_sampling_ratio=0.1,
        pre_processor=Patchcore.configure_pre_processor(image_size=(SIZE, SIZE)),
        visualizer=False,
        post_processor=NormalThresholdPostProcessor(false_reject_rate=rate),
    )


@pytest.mark.parametrize(("n", "rate"), [(4, 0.05), (8, 0.05), (8, 0.01)])
def test_prediction_bound_rejects_the_target_share_of_new_normal_scores(n, rate):
    """Over many support sets of n log-normal scores, a new score lies above the bound with probability ``rate``."""
    generator = torch.Generator().manual_seed(n)
    mu, sigma = 1.0, 0.4
    exceed = []
    for _ in range(3000):
        scores = (mu + sigma * torch.randn(n, generator=generator, dtype=torch.float64)).exp()
        bound = prediction_bound(scores, rate)
        assert bound["transform"] == "log"
        z = (math.log(bound["threshold"]) - mu) / sigma
        exceed.append(0.5 * math.erfc(z / math.sqrt(2)))
    assert sum(exceed) / len(exceed) == pytest.approx(rate, rel=0.15)


def test_prediction_bound_refuses_a_single_sample():
    with pytest.raises(ValueError, match="at least 2"):
        prediction_bound(torch.tensor([1.0]), 0.05)
    # negative scores (a standardised score) are bounded on their own scale
    assert prediction_bound(torch.tensor([-1.0, 0.5, 0.2]), 0.05)["transform"] == "identity"


def test_a_score_with_a_floor_is_bounded_as_the_distance_above_it_at_every_rate():
    """A standardised distance, (d - shift) / scale, is bounded as d is: in logarithms of its distance above the
    floor (its value at d = 0), at the run's rate and at any other read from the record.
    """
    distances = torch.tensor([31.6, 29.3, 27.8, 26.6], dtype=torch.float64)
    shift, scale = 28.8, 2.88
    scores, floor = (distances - shift) / scale, -shift / scale
    for rate in (0.05, 0.01):
        on_distances = prediction_bound(distances, rate)["threshold"]
        record = prediction_bound(scores, rate, floor=floor)
        assert record["transform"] == "log" and record["floor"] == pytest.approx(floor)
        assert record["threshold"] == pytest.approx((on_distances - shift) / scale)
        other = 0.06 - rate  # 0.01 <-> 0.05
        expected = (prediction_bound(distances, other)["threshold"] - shift) / scale
        assert bound_at(record, other) == pytest.approx(expected)
    # a floor some score does not clear is not one: the scores are bounded on their own scale
    assert prediction_bound(scores, 0.05, floor=float(scores.min()))["transform"] == "identity"


@pytest.mark.parametrize("rate", [0.0, 0.5, -0.1, True, "5%"])
def test_bad_false_reject_rate_is_refused(rate):
    with pytest.raises(ValueError, match="false_reject_rate"):
        NormalThresholdPostProcessor(false_reject_rate=rate)


def test_a_model_it_cannot_refit_is_refused_before_training():
    class Trainable(torch.nn.Module):  # no fit(), no refit(): a model trained by gradient descent
        pass

    with pytest.raises(TypeError, match=r"Trainable.*validation set"):
        NormalThresholdPostProcessor().on_fit_start(None, Trainable())


def test_false_reject_rate_on_real_fresh_normals_is_near_its_target(tmp_path):
    """PatchCore (offline EfficientNet-Lite0 weights) on the ELPV mono development set (100 normals that no support
    set holds, never the test set): 6 support sets of K = 4 at a 5 % target, through the README's command for the
    development grid (``--evaluation dev``), at 96 px to keep CI short (mean rate 5.8 % here, 7.8 % at 128 px, 2.8 %
    at 256 px).
    """
    from fsad_anomalib.benchmark.__main__ import main

    out = tmp_path / "threshold_dev"
    argv = ["--sets", "ELPV/mono", "--k", "4", "--seeds", *map(str, range(6)), "--methods", "PatchCore"]
    argv += ["--image-size", "96"]
    assert main([*argv, "--evaluation", "dev", "--no-timing", "--output", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert {row["evaluation"] for row in rows} == {"dev"} and (out / "results.md").exists()
    rates = [row["threshold"]["false_reject_rate"] for row in rows]
    assert len(rates) == 6 and len({row["threshold"]["threshold"] for row in rows}) == 6
    # single support sets scatter widely (a few images need not show how much normals vary); their mean does not
    assert 0.025 <= sum(rates) / len(rates) <= 0.10, rates
    detected = [row["threshold"]["detection_rate"] for row in rows]
    assert sum(detected) / len(detected) > 4 * sum(rates) / len(rates), detected


def test_near_identical_normals_err_on_the_safe_side(tmp_path):
    """PatchCore (random weights) on generated stripes that differ only in pixel noise: 5 support sets of K = 8, 60
    fresh normals each. A held-out image is scored against K - 1 images and a new part against K; where normals
    hardly vary this gap outweighs their spread, and fewer good parts than the target are rejected.
    """
    root = make_dataset(tmp_path / "data", n_train=24, n_test=60, size=SIZE)
    rates, thresholds = [], []
    for seed in range(5):
        seed_everything(seed)
        datamodule = FewShot(folder_datamodule(root, val_split_mode="none"), k_shot=8, seed=seed)
        model = _patchcore()
        engine = cpu_engine(tmp_path / f"run{seed}")
        engine.fit(model=model, datamodule=datamodule)
        predictions = engine.predict(model=model, dataloaders=datamodule.test_dataloader())
        labels = torch.cat([batch.pred_label.flatten() for batch in predictions])
        truth = torch.cat([batch.gt_label.flatten() for batch in predictions])
        rates.append(float(labels[truth == 0].float().mean()))
        thresholds.append(float(model.post_processor.image_threshold))
        assert float(labels[truth == 1].float().mean()) > 0.9  # the bright blobs are still caught
    assert len(set(thresholds)) == len(thresholds)  # each support set sets its own threshold
    assert sum(rates) / len(rates) <= 0.05, rates


@pytest.fixture(scope="module")
def default_without_validation(generated_root, tmp_path_factory):
    seed_everything(0)
    root = tmp_path_factory.mktemp("threshold")
    datamodule = FewShot(folder_datamodule(generated_root, val_split_mode="none"), k_shot=4, seed=0)
    model = FewShotContrastive(image_size=SIZE, fine_tuning=False)
    engine = cpu_engine(root)
    engine.fit(model=model, datamodule=datamodule)
    return {"model": model, "engine": engine, "datamodule": datamodule, "root": root}


def test_without_a_validation_split_it_trains_tests_and_predicts_with_labels(default_without_validation):
    run = default_without_validation
    model, engine, datamodule = run["model"], run["engine"], run["datamodule"]
    assert not datamodule.val_dataloader()  # no validation data at all
    calibration = model.post_processor.calibration
    assert calibration["k_shot"] == 4 and len(calibration["held_out_scores"]) == 4
    # below K = 5 the local part alone, standardised, so that each refit's held-out score is on its own level
    assert model.model.fusion == "local" and model.model.score_scale[1] > 0 and model.model.score_shift[1] != 0
    assert (float(model.model.score_shift[0]), float(model.model.score_scale[0])) == (0.0, 1.0)  # no global part
    assert math.isfinite(calibration["image"]["threshold"]) and math.isfinite(calibration["pixel"]["threshold"])
    metrics = engine.test(model=model, datamodule=datamodule, verbose=False)[0]
    assert metrics["image_AUROC"] > 0.9 and "image_F1Score" in metrics
    predictions = engine.predict(model=model, dataloaders=datamodule.test_dataloader())
    labels = torch.cat([batch.pred_label.flatten() for batch in predictions])
    scores = torch.cat([batch.pred_score.flatten() for batch in predictions])
    masks = torch.cat([batch.pred_mask for batch in predictions])
    truth = torch.cat([batch.gt_label.flatten() for batch in predictions])
    assert labels.dtype == torch.bool and torch.equal(labels, scores > 0.5)
    assert float(labels[truth == 1].float().mean()) > 0.8 and float(labels[truth == 0].float().mean()) < 0.5
    assert bool(((scores >= 0) & (scores <= 1)).all()) and masks.dtype == torch.bool


def test_four_normals_step_their_refits_to_the_deployed_scale_and_bound_above_the_floor(default_without_validation):
    """K = 4: each refit on 3 images scores on the deployed model's scale, its level moved down to a fit on 4 (not
    up); the bound reads the held-out scores' distance above the score's floor, which no normal image goes below.
    """
    run = default_without_validation
    model, post = run["model"], run["model"].post_processor
    floor, map_floor = model.score_floor()
    assert floor == map_floor < 0  # the local part alone: the image score is the map's top patches
    _assert_bounded_above_floor(model, torch.stack([run["datamodule"].test_data[i].image for i in range(6)]))
    deployed = model.model
    refit = model.refit(post.references[:3].to(model.device))
    step = float(deployed.score_shift[1] / refit.score_shift[1])
    assert 0 < step <= 1
    assert float(refit.score_scale[1]) == pytest.approx(float(deployed.score_scale[1]) / step)


def _assert_bounded_above_floor(model: FewShotContrastive, new_images: torch.Tensor) -> None:
    """The threshold's bound reads the held-out scores in logs above the model's score floor, and neither they, the
    threshold nor the scores of ``new_images`` lie below that floor.
    """
    floor, _ = model.score_floor()
    post = model.post_processor
    record = post.calibration["image"]
    assert record["transform"] == "log" and record["floor"] == pytest.approx(floor)
    assert min(post.calibration["held_out_scores"]) > floor and record["threshold"] > floor
    model.eval()
    with torch.no_grad():
        assert bool((model(new_images).pred_score > floor).all())


def test_checkpoint_carries_the_threshold(default_without_validation):
    run = default_without_validation
    path = run["root"] / "model.ckpt"
    run["engine"].trainer.save_checkpoint(path)
    loaded = FewShotContrastive.load_from_checkpoint(path)
    post, saved = loaded.post_processor, run["model"].post_processor
    assert isinstance(post, NormalThresholdPostProcessor)
    assert torch.equal(post.image_threshold, saved.image_threshold) and torch.equal(post.image_max, saved.image_max)
    assert post.calibration == saved.calibration and post.false_reject_rate == 0.05
    images = torch.stack([run["datamodule"].test_data[i].image for i in range(6)])
    run["model"].eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(images).pred_label, run["model"](images).pred_label)


def test_validation_batches_do_not_move_the_threshold(generated_root, tmp_path, default_without_validation):
    """The same support set validated on labelled test images gives the same normal-only threshold."""
    seed_everything(0)
    datamodule = FewShot(folder_datamodule(generated_root, val_split_mode="same_as_test"), k_shot=4, seed=0)
    model = FewShotContrastive(image_size=SIZE, fine_tuning=False)
    cpu_engine(tmp_path).fit(model=model, datamodule=datamodule)
    expected = default_without_validation["model"].post_processor
    assert torch.equal(model.post_processor.image_threshold, expected.image_threshold)


def test_anomalib_f1_threshold_stays_available(generated_root, tmp_path):
    from anomalib.post_processing import PostProcessor

    seed_everything(0)
    datamodule = FewShot(folder_datamodule(generated_root), k_shot=4, seed=0)
    model = FewShotContrastive(image_size=SIZE, fine_tuning=False, post_processor=PostProcessor())
    cpu_engine(tmp_path).fit(model=model, datamodule=datamodule)
    assert type(model.post_processor) is PostProcessor and torch.isfinite(model.post_processor.image_threshold)


def test_padim_gets_a_threshold_and_its_checkpoint_loads_into_the_stock_post_processor(generated_root, tmp_path):
    """Any memory-bank model: PaDiM refitted leave-one-out; its checkpoint's threshold reaches a stock PaDiM."""
    seed_everything(0)
    datamodule = FewShot(folder_datamodule(generated_root, val_split_mode="none"), k_shot=4, seed=0)
    model = Padim(
        backbone="resnet18",
        pre_trained=False,
        layers=["layer1", "layer2"],
        visualizer=False,
        pre_processor=Padim.configure_pre_processor(image_size=(SIZE, SIZE)),
        post_processor=NormalThresholdPostProcessor(),
    )
    engine = cpu_engine(tmp_path)
    engine.fit(model=model, datamodule=datamodule)
    threshold = model.post_processor.image_threshold
    assert torch.isfinite(threshold) and len(model.post_processor.calibration["held_out_scores"]) == 4
    engine.trainer.save_checkpoint(tmp_path / "padim.ckpt")
    stock = Padim.load_from_checkpoint(
        tmp_path / "padim.ckpt", backbone="resnet18", pre_trained=False, layers=["layer1", "layer2"]
    )
    assert torch.equal(stock.post_processor.image_threshold, threshold)


def test_benchmark_rates_at_a_threshold_and_at_the_oracle():
    scores, labels = [0.1, 0.2, 0.3, 0.9, 0.4, 0.8, 0.7], [0, 0, 0, 0, 1, 1, 1]
    assert decision_rates(scores, labels, 0.35) == {"false_reject_rate": 0.25, "detection_rate": 1.0}
    assert math.isnan(decision_rates(scores, labels, float("nan"))["false_reject_rate"])
    oracle = oracle_f1_threshold(scores, labels)
    rates = decision_rates(scores, labels, oracle)
    assert 0.3 <= oracle < 0.9 and rates["detection_rate"] >= 2 / 3


def test_scores_keep_their_order_and_the_rate_can_move_after_training(default_without_validation):
    post = default_without_validation["model"].post_processor
    raw = torch.linspace(-50.0, 5000.0, 2001)
    normalised = post(InferenceBatch(pred_score=raw)).pred_score
    assert bool((normalised.diff() > 0).all()) and bool(((normalised > 0) & (normalised < 1)).all())
    at_threshold = post(InferenceBatch(pred_score=post.image_threshold.clone().view(1))).pred_score
    assert float(at_threshold) == 0.5
    at_five = float(post.image_threshold)
    assert post.threshold_at(0.05) == pytest.approx(at_five)
    strict = post.threshold_at(0.01)
    assert strict > at_five
    saved = copy.deepcopy(post.calibration)
    try:
        post.set_false_reject_rate(0.01)
        assert float(post.image_threshold) == pytest.approx(strict) and post.false_reject_rate == 0.01
        assert post.calibration["image"]["threshold"] == pytest.approx(strict)
    finally:
        post.calibration = saved
        post.set_false_reject_rate(0.05)
    assert float(post.image_threshold) == pytest.approx(at_five)
    with pytest.raises(ValueError, match="false_reject_rate"):
        post.threshold_at(0.7)


def test_a_model_whose_refit_fails_on_k_minus_1_images_trains_on_unlabelled(generated_root, tmp_path, caplog):
    """DFM's PCA cannot be fitted on one image: K = 2 leaves no threshold and says why, and the run goes on."""
    from anomalib.models import Dfm

    seed_everything(0)
    datamodule = FewShot(folder_datamodule(generated_root, val_split_mode="none"), k_shot=2, seed=0)
    model = Dfm(
        backbone="resnet18",
        layer="layer3",
        pre_trained=False,
        visualizer=False,
        pre_processor=Dfm.configure_pre_processor(image_size=(SIZE, SIZE)),
        post_processor=NormalThresholdPostProcessor(),
    )
    engine = cpu_engine(tmp_path)
    with caplog.at_level(logging.WARNING):
        engine.fit(model=model, datamodule=datamodule)
    assert "could not be refitted on 1 of the 2 images (IndexError" in caplog.text
    assert model.post_processor.calibration["error"].startswith("the model could not be refitted")
    assert torch.isnan(model.post_processor.image_threshold)
    predictions = engine.predict(model=model, dataloaders=datamodule.test_dataloader())
    assert all(torch.isfinite(batch.pred_score).all() for batch in predictions)  # raw scores, unlabelled


@pytest.mark.parametrize(("n", "rate"), [(19, 0.05), (50, 0.05), (99, 0.01)])
def test_conformal_bound_rejects_at_most_the_target_share_whatever_the_distribution(n, rate):
    """Heavy-tailed (Pareto) scores, where a normal bound would be far off: over 4,000 draws of N good parts, the share
    of new good parts above the order statistic is at most the target and within 1 / (N + 1) of it.
    """
    generator = torch.Generator().manual_seed(0)
    draws = 4000
    calibration = torch.rand(draws, n, generator=generator, dtype=torch.float64) ** -1.5
    fresh = torch.rand(draws, 200, generator=generator, dtype=torch.float64) ** -1.5
    thresholds = torch.tensor([conformal_bound(row, rate)["threshold"] for row in calibration])
    measured = float((fresh > thresholds[:, None]).double().mean())
    assert rate - 1 / (n + 1) - 0.003 <= measured <= rate + 0.003, measured
    assert conformal_bound(calibration[0], rate)["estimator"] == "split-conformal order statistic"


def test_a_stricter_rate_never_gives_a_lower_threshold():
    """From the order statistic to the prediction bound (a rate below 1 / (N + 1), which N parts cannot reach
    distribution-free), the threshold never falls as the rate falls: it is at least the largest of the N scores.
    """
    generator = torch.Generator().manual_seed(0)
    rates = (0.2, 0.1, 0.05, 0.02, 0.01, 0.005)
    for n in (19, 30, 54, 99):
        for _ in range(100):
            scores = (
                torch.rand(n, generator=generator, dtype=torch.float64) ** -1.5
            )  # heavy-tailed, as in the test above
            thresholds = [conformal_bound(scores, rate)["threshold"] for rate in rates]
            assert thresholds == sorted(thresholds), (n, thresholds)
        assert conformal_bound(scores, 0.5 / (n + 1))["threshold"] >= float(scores.max())


def test_confirm_on_good_parts_resets_the_thresholds_and_the_checkpoint_carries_them(
    default_without_validation, tmp_path, caplog
):
    """After training on K = 4, 24 further good parts set a conformal threshold (for 5 %: the highest of their 24
    scores), labels follow it, another rate moves on the same scores, a checkpoint reloads it, bad input is refused.
    """
    run = default_without_validation
    model, post = run["model"], run["model"].post_processor
    saved = (
        copy.deepcopy(post.calibration),
        post.image_threshold.clone(),
        post.image_min.clone(),
        post.image_max.clone(),
        post.pixel_threshold.clone(),
        post.pixel_min.clone(),
        post.pixel_max.clone(),
    )
    good = FewShot(
        folder_datamodule(
            make_dataset(tmp_path / "more", n_train=24, n_test=2, size=SIZE, seed=7), val_split_mode="none"
        ),
        k_shot=24,
        seed=0,
    )
    good.setup()
    try:
        record = confirm(model, good.train_dataloader())
        assert record["confirmed_on"] == 24 and record["estimator"] == "split-conformal order statistic"
        assert record["from_training"]["image"]["threshold"] == pytest.approx(float(saved[1]))  # kept for the record
        scores = torch.tensor(record["image"]["scores"])
        # rank ceil((24 + 1) * 0.95) = 24: the highest of the 24 scores
        assert float(post.image_threshold) == pytest.approx(float(scores.max())) and len(scores) == 24
        model.eval()
        images = torch.cat([batch.image for batch in good.train_dataloader()])
        with torch.no_grad():  # none of the 24 lies above the highest of their scores (up to float32 rounding)
            normalised = model(images).pred_score
        assert len(normalised) == 24 and float(normalised.max()) <= 0.5 + 1e-5
        strict = post.threshold_at(0.01)  # 24 parts are too few for 1 %: the prediction bound of their scores
        assert strict == pytest.approx(conformal_bound(scores.double(), 0.01)["threshold"])
        assert strict > prediction_bound(scores.double(), 0.05)["threshold"]  # the same estimator, stricter rate
        path = tmp_path / "confirmed.ckpt"
        run["engine"].trainer.save_checkpoint(path)
        loaded = FewShotContrastive.load_from_checkpoint(path)
        assert torch.equal(loaded.post_processor.image_threshold, post.image_threshold)
        assert loaded.post_processor.calibration["confirmed_on"] == 24
        with caplog.at_level(logging.WARNING):
            confirm(model, images[:5])
        assert "5 good parts are fewer than the 19" in caplog.text
        with pytest.raises(ValueError, match=r"batch 0 is \(5, 64, 64\)"):
            confirm(model, images[:5, 0])
        with pytest.raises(ValueError, match="at least 2 good parts"):
            confirm(model, images[:1])
        with pytest.raises(TypeError, match="with a NormalThresholdPostProcessor"):
            confirm(Patchcore(backbone="resnet18", pre_trained=False), images)
    finally:
        post.calibration = saved[0]
        post.adopt({**saved[0], "false_reject_rate": 0.05})


def test_confirm_command_writes_a_checkpoint_with_the_confirmed_threshold(default_without_validation, tmp_path, capsys):
    """Python -m fsad_anomalib.confirm: a folder of good parts in, a checkpoint with their threshold out (the trained
    one untouched); a wrong folder, file or model class is named.
    """
    from fsad_anomalib.confirm import main

    run = default_without_validation
    ckpt = tmp_path / "trained.ckpt"
    run["engine"].trainer.save_checkpoint(ckpt)
    good = make_dataset(tmp_path / "line", n_train=20, n_test=1, size=SIZE, seed=11) / "train/good"
    out = tmp_path / "confirmed.ckpt"
    assert (
        main(["--model", "FewShotContrastive", "--ckpt", str(ckpt), "--images", str(good), "--output", str(out)]) == 0
    )
    assert "from 20 good parts (split-conformal order statistic)" in capsys.readouterr().out
    confirmed = FewShotContrastive.load_from_checkpoint(out)
    trained = FewShotContrastive.load_from_checkpoint(ckpt)
    assert confirmed.post_processor.calibration["confirmed_on"] == 20
    assert "confirmed_on" not in trained.post_processor.calibration
    assert not torch.equal(confirmed.post_processor.image_threshold, trained.post_processor.image_threshold)
    # the threshold is the highest of the 20 good parts' scores (rank ceil(21 * 0.95) = 20): none of them is NG
    from anomalib.data.utils import read_image

    confirmed.eval()
    with torch.no_grad():  # one at a time, as the command scored them (a batch of 20 may differ in the last bits)
        labels = [
            bool(confirmed(read_image(path, as_tensor=True)[None]).pred_label) for path in sorted(good.glob("*.png"))
        ]
    assert len(labels) == 20 and not any(labels)
    for argv, expected in (
        (["--images", str(tmp_path / "nowhere")], "not a folder"),
        (["--ckpt", str(tmp_path / "missing.ckpt")], "missing.ckpt: no such file"),
        (["--model", "NoSuchModel"], "--model NoSuchModel: not a model class"),
        (["--output", str(ckpt)], "would overwrite --ckpt"),
    ):
        base = {"--model": "FewShotContrastive", "--ckpt": str(ckpt), "--images": str(good), "--output": str(out)}
        base.update(dict(zip(argv[::2], argv[1::2], strict=True)))
        with pytest.raises(SystemExit):
            main([item for pair in base.items() for item in pair])
        assert expected in capsys.readouterr().err


def test_confirm_command_takes_a_stock_patchcore_checkpoint(generated_root, tmp_path, capsys):
    """A PatchCore trained with the normal-only post-processor loads back with anomalib's; the command puts ours back,
    confirms, and the written checkpoint carries the new threshold.
    """
    from fsad_anomalib.confirm import main

    seed_everything(0)
    datamodule = FewShot(folder_datamodule(generated_root, val_split_mode="none"), k_shot=4, seed=0)
    model = _patchcore()
    engine = cpu_engine(tmp_path)
    engine.fit(model=model, datamodule=datamodule)
    ckpt, out = tmp_path / "patchcore.ckpt", tmp_path / "confirmed.ckpt"
    engine.trainer.save_checkpoint(ckpt)
    good = make_dataset(tmp_path / "line", n_train=19, n_test=1, size=SIZE, seed=12) / "train/good"
    assert (
        main([
            "--model",
            "Patchcore",
            "--ckpt",
            str(ckpt),
            "--images",
            str(good),
            "--output",
            str(out),
            "--false-reject-rate",
            "0.05",
        ])
        == 0
    )
    assert "from 19 good parts (split-conformal order statistic)" in capsys.readouterr().out
    confirmed = Patchcore.load_from_checkpoint(out, post_processor=NormalThresholdPostProcessor())
    assert confirmed.post_processor.calibration["confirmed_on"] == 19
    assert float(confirmed.post_processor.image_threshold) != pytest.approx(float(model.post_processor.image_threshold))


@pytest.mark.parametrize("k", [1, 2])
def test_one_or_two_normals_give_a_threshold_that_detects_a_clear_defect(k, generated_root, tmp_path, caplog):
    """The default model at K = 1 and 2 on vertical stripes, a part that a 90-degree turn changes: each held-out
    view is scored by a fit that has seen that orientation, so the threshold labels most of the generated defects
    NG and most good test parts OK (scored against the fit's own orientation alone it sat above every test image).
    """
    seed_everything(0)
    datamodule = FewShot(folder_datamodule(generated_root, val_split_mode="none"), k_shot=k, seed=0)
    model = FewShotContrastive(image_size=SIZE)
    engine = cpu_engine(tmp_path)
    with caplog.at_level(logging.WARNING, logger="fsad_anomalib.post_processing.normal_threshold"):
        engine.fit(model=model, datamodule=datamodule)
    warned = "rests on one image (each half scored against the other" if k == 1 else "rests on 2 images"
    assert any(warned in record.getMessage() for record in caplog.records)
    calibration = model.post_processor.calibration
    assert calibration["views"] == 8 and len(calibration["held_out_scores"]) == 16  # 8 views x 2 halves or images
    assert torch.isfinite(model.post_processor.image_threshold)
    predictions = engine.predict(model=model, dataloaders=datamodule.test_dataloader())
    labels = torch.cat([batch.pred_label.flatten() for batch in predictions])
    truth = torch.cat([batch.gt_label.flatten() for batch in predictions])
    detected, rejected = float(labels[truth == 1].float().mean()), float(labels[truth == 0].float().mean())
    assert detected >= 0.75 and rejected <= 0.25, (detected, rejected)


def test_a_fused_score_at_two_normals_is_bounded_above_its_floor(generated_root, tmp_path):
    """An explicit fused score (``combined``: patch and global) at K = 2: the refits on 1 image keep the deployed
    scales, so the threshold reads the held-out scores' distance above the fused score's floor, which no image,
    held out or new, goes below.
    """
    seed_everything(0)
    datamodule = FewShot(folder_datamodule(generated_root, val_split_mode="none"), k_shot=2, seed=0)
    model = FewShotContrastive(image_size=SIZE, score_mode="combined", fine_tuning=False)
    engine = cpu_engine(tmp_path)
    engine.fit(model=model, datamodule=datamodule)
    assert model.model.fusion == "mean"
    _assert_bounded_above_floor(model, torch.stack([datamodule.test_data[i].image for i in range(6)]))
