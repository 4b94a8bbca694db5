"""ContrastiveFineTuning adapts PatchCore's and PaDiM's feature extractors, and only those."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from anomalib.engine import Engine
from lightning.pytorch import seed_everything

from fsad_anomalib.benchmark.methods import build_method
from fsad_anomalib.callbacks import ContrastiveFineTuning
from fsad_anomalib.data import FewShot
from fsad_anomalib.data.views import Symmetries, resolve_symmetries
from fsad_anomalib.fine_tuning import find_feature_extractor

from .conftest import STATIC_ONNX, cpu_engine, folder_datamodule


@pytest.mark.parametrize("method", ["PatchCore", "PaDiM"])
def test_callback_changes_only_the_feature_extractor(method):
    seed_everything(0)
    model = build_method(method, "offline:tf_efficientnet_lite0", image_size=64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.model.feature_extractor.parameters()]
    ContrastiveFineTuning(steps=2).fine_tune(model, torch.rand(3, 3, 64, 64))
    after = model.state_dict()

    def same(a: torch.Tensor, b: torch.Tensor) -> bool:  # NaN-initialised buffers compare equal to themselves
        return a.shape == b.shape and bool(
            ((a == b) | (a.isnan() & b.isnan()) if a.is_floating_point() else a == b).all()
        )

    changed = {k for k, v in before.items() if not same(v, after[k])}
    assert changed, "no weight changed"
    assert all(k.startswith("model.feature_extractor.") for k in changed), changed - {
        k for k in changed if k.startswith("model.feature_extractor.")
    }
    assert not any("running_" in k for k in changed)
    # requires_grad flags are restored as they were
    assert [p.requires_grad for p in model.model.feature_extractor.parameters()] == flags


@pytest.mark.parametrize("method", ["AnomalyDINO", "FewShotContrastive"])
def test_a_vit_is_fine_tuned_in_its_second_half_of_blocks(method):
    """Anomalib's AnomalyDINO (its encoder at model.feature_encoder) and FewShotContrastive on a DINOv2 ViT: blocks
    5-11 and the final norm of a 12-block ViT change; the patch and position embeddings, tokens and blocks 0-4 do not.
    """
    seed_everything(0)
    model = build_method(method, "vit_small_patch14_dinov2", image_size=56, pre_trained=False)
    network = find_feature_extractor(model)
    before = {k: v.clone() for k, v in network.state_dict().items()}
    flags = [p.requires_grad for p in network.parameters()]
    ContrastiveFineTuning(steps=2).fine_tune(model, torch.rand(2, 3, 56, 56))
    changed = {
        k.split(".")[0] + ("." + k.split(".")[1] if k.startswith("blocks.") else "")
        for k, v in network.state_dict().items()
        if not torch.equal(v, before[k])
    }
    assert changed == {f"blocks.{i}" for i in range(5, 12)} | {"norm"}, sorted(changed)
    assert [p.requires_grad for p in network.parameters()] == flags


def test_larger_support_sets_are_fine_tuned_in_random_batches_of_batch_size():
    """K above batch_size: each step sees batch_size distinct images, drawn anew, so all K take part."""
    seed_everything(0)
    model = build_method("PatchCore", "offline:tf_efficientnet_lite0", image_size=64)
    images = torch.rand(6, 3, 64, 64)
    callback = ContrastiveFineTuning(steps=4, batch_size=4, synthesis="none", lambda_pp=0.0)
    seen: list[torch.Tensor] = []
    forward = callback.tuner.forward

    def spy(batch, embed):
        seen.append(batch)
        return forward(batch, embed)

    callback.tuner.forward = spy
    callback.fine_tune(model, images)
    assert len(seen) == 4 and all(b.shape[0] == 4 for b in seen)
    # every batch is made of distinct support images, and over the steps more than one subset is drawn
    rows = [{int((images - img).abs().flatten(1).sum(1).argmin()) for img in b} for b in seen]
    assert all(len(r) == 4 for r in rows)
    assert len(set().union(*rows)) > 4
    with pytest.raises(ValueError, match="batch_size"):
        ContrastiveFineTuning(batch_size=0)


def test_fine_tuned_patchcore_checkpoint_and_onnx_match_eager(generated_root, tmp_path):
    import onnxruntime as ort
    from anomalib.models import Patchcore

    seed_everything(0)
    model = build_method("PatchCore", "offline:tf_efficientnet_lite0", image_size=64)
    initial = {k: v.clone() for k, v in model.model.feature_extractor.state_dict().items()}
    datamodule = FewShot(folder_datamodule(generated_root), k_shot=3)
    callback = ContrastiveFineTuning(steps=2)
    engine = cpu_engine(tmp_path, callbacks=[callback])
    engine.fit(model=model, datamodule=datamodule)
    assert len(callback.history) == 2
    tuned = model.model.feature_extractor.state_dict()
    assert any(not torch.equal(v, tuned[k]) for k, v in initial.items() if v.is_floating_point())
    model.eval()
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        eager = model(images)
    reloaded = Patchcore.load_from_checkpoint(engine.trainer.checkpoint_callback.best_model_path).eval()
    with torch.no_grad():
        again = reloaded(images)
    assert torch.allclose(eager.pred_score, again.pred_score, rtol=1e-5)
    # one image at a time at 64 px (STATIC_ONNX)
    path = engine.export(
        model=model, export_type="onnx", export_root=tmp_path / "onnx", input_size=(64, 64), onnx_kwargs=STATIC_ONNX
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    for index in range(len(images)):
        feed = {session.get_inputs()[0].name: images[index : index + 1].numpy()}
        out = dict(zip(names, session.run(None, feed), strict=True))
        np.testing.assert_allclose(out["pred_score"], eager.pred_score[index : index + 1].numpy(), rtol=1e-4, atol=1e-6)


def test_few_shot_contrastive_fine_tunes_in_its_fit(generated_root, tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    from fsad_anomalib.models import FewShotContrastive

    seed_everything(0)
    # one path: the model's fit() runs the fine-tuning, never a trainer callback
    model = FewShotContrastive(
        image_size=64, fine_tuning=ContrastiveFineTuning(steps=3), visualizer=False, layers=[2, 3], score_mode="patch"
    )
    assert not any(isinstance(c, ContrastiveFineTuning) for c in model.configure_callbacks())
    initial = {k: v.clone() for k, v in model.model.feature_extractor.state_dict().items()}
    engine = Engine(
        default_root_dir=tmp_path, logger=CSVLogger(tmp_path, name="log"), enable_progress_bar=False, accelerator="cpu"
    )
    engine.fit(model=model, datamodule=FewShot(folder_datamodule(generated_root), k_shot=3))
    # fine-tuning ran its three steps on the model's own extractor, and the Gaussians were fitted afterwards
    assert len(model.fine_tuning.history) == 3
    tuned = model.model.feature_extractor.state_dict()
    assert any(not torch.equal(v, tuned[k]) for k, v in initial.items() if v.is_floating_point())
    assert bool(model.model.is_fitted)
    # every step's losses reach the trainer's logger
    import csv

    rows = list(csv.DictReader((tmp_path / "log" / "version_0" / "metrics.csv").open()))
    losses = [float(r["fine_tune/loss"]) for r in rows if r.get("fine_tune/loss")]
    assert losses == pytest.approx(model.fine_tuning.history)
    assert all(r.get("fine_tune/loss_con") for r in rows if r.get("fine_tune/loss"))


def test_fine_tuning_is_one_argument_of_the_model():
    """True, False, a ContrastiveFineTuning or its arguments (as a checkpoint stores them); nothing else."""
    from fsad_anomalib.models import FewShotContrastive

    default = FewShotContrastive(image_size=64)  # "auto": the default callback, tried before it is kept
    assert isinstance(default.fine_tuning, ContrastiveFineTuning) and default.fine_tuning.steps == 30
    assert default.hparams["fine_tuning"] == "auto" and default.fine_tuning.seed == 0
    explicit = FewShotContrastive(image_size=64, fine_tuning=True)
    assert explicit.hparams["fine_tuning"]["synthesis"] == "cutpaste"  # plain values, loadable with weights_only
    assert FewShotContrastive(image_size=64, fine_tuning=False).fine_tuning is None
    assert FewShotContrastive(image_size=64, fine_tuning=False).hparams["fine_tuning"] is False
    given = ContrastiveFineTuning(steps=3, batch_size=5, lambda_pp=0.25, synthesis="speck")
    model = FewShotContrastive(image_size=64, fine_tuning=given, layers=[2, 3], score_mode="patch")
    assert model.fine_tuning is given and given not in model.configure_callbacks()  # fit() runs it
    assert model.hparams["fine_tuning"]["steps"] == 3
    rebuilt = FewShotContrastive(image_size=64, fine_tuning=model.hparams["fine_tuning"])
    assert dict(rebuilt.fine_tuning.hparams) == dict(given.hparams)
    assert rebuilt.fine_tuning.tuner.loss.lambda_pp == 0.25 and rebuilt.fine_tuning.tuner.synthesizer.mode == "speck"
    with pytest.raises(ValueError, match="fine_tuning must be 'auto'"):
        FewShotContrastive(image_size=64, fine_tuning="yes")
    with pytest.raises(TypeError, match="fine_tuning must be 'auto'"):
        FewShotContrastive(image_size=64, fine_tuning=3)


def test_symmetries_left_unset_are_the_models():
    from fsad_anomalib.models import FewShotContrastive

    model = FewShotContrastive(image_size=64, symmetries=["hflip", "vflip"])
    assert model.symmetries == Symmetries(hflip=True, vflip=True, rot90=False)
    assert model.hparams["symmetries"] == ["hflip", "vflip"]
    none = Symmetries(hflip=False, vflip=False, rot90=False)
    assert resolve_symmetries(None, model, none) == model.symmetries  # unset: the model's
    assert resolve_symmetries(["hflip"], model, none) == Symmetries(hflip=True, vflip=False, rot90=False)  # set: as set
    patchcore = build_method("PatchCore", "offline:tf_efficientnet_lite0", image_size=64)  # declares none
    assert resolve_symmetries(None, patchcore, Symmetries()) == Symmetries()
    assert ContrastiveFineTuning(symmetries=["vflip"]).symmetries == Symmetries(hflip=False, vflip=True, rot90=False)
    with pytest.raises(ValueError, match="symmetries must be a list of names"):
        FewShotContrastive(image_size=64, symmetries=["mirror"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"steps": 0}, "steps must be an integer >= 1"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1"),
        ({"lr_backbone": 0.0}, "lr_backbone must be > 0"),
        ({"weight_decay": -1.0}, "weight_decay must be >= 0"),
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"lambda_np": -1.0}, "lambda_pp and lambda_np must be >= 0"),
        ({"synthesis": "crack"}, "synthesis must be one of"),
        ({"crop_scale": 1.5}, "crop_scale must be in"),
    ],
)
def test_bad_fine_tuning_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ContrastiveFineTuning(**kwargs)


def _fine_tuned_weights(seed: int | None, global_seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)  # the same model and images every time
    model = build_method("PatchCore", "offline:tf_efficientnet_lite0", image_size=64)
    images = torch.rand(3, 3, 64, 64)
    torch.manual_seed(global_seed)  # whatever ran before the fine-tuning
    ContrastiveFineTuning(steps=2, seed=seed).fine_tune(model, images)
    return {k: v.clone() for k, v in model.model.feature_extractor.state_dict().items()}


def test_seed_makes_fine_tuning_repeat_whatever_ran_before():
    a, b = _fine_tuned_weights(seed=7, global_seed=1), _fine_tuned_weights(seed=7, global_seed=2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # without a seed the global stream decides (so the comparison above can fail)
    c, d = _fine_tuned_weights(seed=None, global_seed=1), _fine_tuned_weights(seed=None, global_seed=2)
    assert not all(torch.equal(c[k], d[k]) for k in c)
    # the global stream is left as it was
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    model = build_method("PatchCore", "offline:tf_efficientnet_lite0", image_size=64)
    torch.manual_seed(5)
    ContrastiveFineTuning(steps=1, seed=7).fine_tune(model, torch.full((2, 3, 64, 64), 0.5))
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("seed", [-1, 1.5, True, "0"])
def test_bad_seed_is_named(seed):
    from fsad_anomalib.models import FewShotContrastive

    with pytest.raises(ValueError, match=r"ContrastiveFineTuning: seed must be None or an integer"):
        ContrastiveFineTuning(seed=seed)
    with pytest.raises(ValueError, match="seed must be None"):
        FewShotContrastive(image_size=64, fine_tuning={"seed": seed})


def test_seeded_cli_runs_repeat(generated_root, tmp_path):
    """Anomalib 2.7's CLI ignores seed_everything; with the fine-tuning seed, two CLI runs give the same weights."""
    from anomalib.cli import AnomalibCLI

    weights = []
    for run in range(2):
        torch.manual_seed(100 + run)  # a different global stream each time, as in two fresh processes
        cli = AnomalibCLI([
            "fit",
            "--model",
            "FewShotContrastive",
            "--model.image_size",
            "64",
            "--model.fine_tuning.steps",
            "2",
            "--model.fine_tuning.seed",
            "0",
            "--model.visualizer",
            "false",
            "--data",
            "FewShot",
            "--data.k_shot",
            "3",
            "--data.datamodule",
            "Folder",
            "--data.datamodule.name",
            "generated",
            "--data.datamodule.root",
            str(generated_root),
            "--data.datamodule.normal_dir",
            "train/good",
            "--data.datamodule.abnormal_dir",
            "test/bad",
            "--data.datamodule.normal_test_dir",
            "test/good",
            "--data.datamodule.val_split_mode",
            "same_as_test",
            "--data.datamodule.num_workers",
            "0",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.logger",
            "false",
            "--default_root_dir",
            str(tmp_path / str(run)),
        ])
        weights.append({k: v.clone() for k, v in cli.model.model.state_dict().items()})
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
