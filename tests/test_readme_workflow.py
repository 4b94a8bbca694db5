"""The README's "Your own data, from training to the line", run as written, in a user's order, on generated data.

The commands are read from README.md, so a README change that breaks a command breaks this test. The only changes
made to them: the README's placeholder folders point at generated data, and the training command gets a smaller
image size (``--model.image_size 64``), and a copy of ``predictions.csv`` is kept after each ``anomalib predict``
(the next one rewrites it). The configs are used as they ship (``val_split_mode: none``, every image of
``train/good``). The sequence runs in one fresh interpreter, each command through the entry point its shell command
starts (``anomalib`` the console script's ``main``, ``python -m`` the module as ``__main__``) with the same arguments:
one interpreter start-up instead of ten, about a minute less (a fresh ``anomalib`` process is also run by the
refusal tests below and by the plugin test in test_cli_configs.py).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from .conftest import make_dataset

REPO = Path(__file__).parents[1]
SECTION = "## Your own data, from training to the line"
SPEED = "--model.image_size 64"  # appended to `anomalib train` only
# runs the commands (argument lists) of argv[1], a JSON file, in order, as a shell with `set -e -x` would
RUNNER = """
import json, runpy, shutil, sys
from anomalib.cli.cli import main as anomalib
for argv in json.load(open(sys.argv[1])):
    print("+", *argv, file=sys.stderr, flush=True)
    if argv[0] == "cp":
        shutil.copy(argv[1], argv[2])
        continue
    sys.argv = argv if argv[0] == "anomalib" else ["-m", *argv[3:]]
    try:
        anomalib() if argv[0] == "anomalib" else runpy.run_module(argv[2], run_name="__main__", alter_sys=True)
    except SystemExit as stop:
        if stop.code not in (0, None):
            raise
"""


def _section(text: str) -> str:
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    return text[start : end if end > 0 else None]


def _blocks(section: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", section, flags=re.DOTALL)


def _good_parts(folder: Path, n: int = 20, size: int = 96, seed: int = 7, defective: int = 0) -> Path:
    """Good parts the model never saw: the generator's normals with another seed (and ``defective`` bad ones)."""
    generated = make_dataset(folder.parent / f"more_{seed}", n_train=n, n_test=max(1, defective), size=size, seed=seed)
    shutil.copytree(generated / "train" / "good", folder)
    for index in range(defective):  # a defective part slipped in among the good ones
        shutil.copy(generated / "test" / "bad" / f"{index:03d}.png", folder / f"slipped_in_{index}.png")
    return folder


@pytest.fixture(scope="module")
def line(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Run the README's command block in a fresh folder, as a user would after cloning."""
    work = tmp_path_factory.mktemp("line")
    product = make_dataset(work / "data" / "product", n_train=6, n_test=6, size=96)
    good_parts = _good_parts(work / "data" / "good_parts")
    more_good_parts = _good_parts(work / "data" / "more_good_parts", n=30, seed=11, defective=1)
    (work / "configs").symlink_to(REPO / "configs")
    section = _section((REPO / "README.md").read_text())
    script = _blocks(section, "bash")[0]  # the sequence; the benchmark commands below it have their own tests
    places = {
        "/path/to/product": product,
        "/path/to/new_parts": product / "test",
        "/path/to/good_parts": good_parts,
        "/path/to/more_good_parts": more_good_parts,
    }
    for placeholder, path in places.items():
        script = script.replace(placeholder, str(path))
    commands, variables = [], {}
    for line in script.splitlines():
        if assignment := re.fullmatch(r"([A-Z_]+)=(\S+)", line):
            variables[assignment[1]] = assignment[2]
            continue
        argv = shlex.split(re.sub(r"\$([A-Z_]+)", lambda name: variables[name[1]], line))
        assert argv[0] == "anomalib" or argv[:2] == ["python", "-m"], f"a README command this test cannot run: {line}"
        commands.append([*argv, *SPEED.split()] if argv[:2] == ["anomalib", "train"] else argv)
        if argv[:2] == ["anomalib", "predict"]:  # each predict rewrites the table: keep a copy to check
            source = "results/FewShotContrastive/latest/predictions.csv"
            commands.append(["cp", source, f"predictions_{sum(c[0] == 'cp' for c in commands) + 1}.csv"])
    (work / "commands.json").write_text(json.dumps(commands))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OPENVINO_TELEMETRY_DISABLED": "1", "TRUST_REMOTE_CODE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", RUNNER, "commands.json"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    return {
        "work": work,
        "product": product,
        "good_parts": good_parts,
        "section": section,
        "places": places,
        "run": done,
        "log": done.stdout[-6000:] + done.stderr[-6000:],
    }


def _predictions(work: Path) -> list[dict[str, str]]:
    """The tables of the README's predict commands, in order (the test copies each after its command)."""
    return [list(csv.DictReader(path.open())) for path in sorted(work.glob("predictions_*.csv"))]


def test_every_command_of_the_section_succeeds(line: dict) -> None:
    assert line["run"].returncode == 0, line["log"]


def test_training_writes_a_fitted_checkpoint_on_every_train_good_image(line: dict) -> None:
    from fsad_anomalib.models import FewShotContrastive

    ckpt = line["work"] / "results/FewShotContrastive/my_product/latest/weights/lightning/model.ckpt"
    model = FewShotContrastive.load_from_checkpoint(ckpt, map_location="cpu")
    assert bool(model.model.is_fitted)
    assert torch.isfinite(model.post_processor.image_threshold)
    assert model.self_configuration["k_shot"] == len(list((line["product"] / "train/good").glob("*.png")))
    assert "fitted on 6 of the 6 normal training images" in line["run"].stdout + line["run"].stderr


def test_predict_writes_a_label_per_image_and_the_confirmed_checkpoint_labels_the_same_parts(line: dict) -> None:
    first, confirmed, grown = _predictions(line["work"])
    images = sorted(str(p) for p in (line["product"] / "test").rglob("*.png"))
    for table in (first, confirmed, grown):
        assert sorted(row["image_path"] for row in table) == images
        assert {row["label"] for row in table} <= {"OK", "NG"}
        for row in table:
            assert (row["label"] == "NG") == (float(row["score"]) > float(row["threshold"]))
            assert (row["label"] == "NG") == (float(row["raw_score"]) > float(row["raw_threshold"]))
    # the generated defects are obvious: every bad part NG, before and after confirmation. The thresholds promise a
    # 5 % false-reject rate on average (confirmed on 20 good parts: the largest of their scores, which a new good part
    # passes with probability 1/21), so one of the six good parts may be rejected, not more
    for table in (first, confirmed, grown):
        assert all(row["label"] == "NG" for row in table if "/bad/" in row["image_path"])
        assert sum(row["label"] == "NG" for row in table if "/good/" in row["image_path"]) <= 1
    assert confirmed[0]["raw_threshold"] != first[0]["raw_threshold"]  # confirmation moved the threshold
    assert grown[0]["raw_threshold"] != confirmed[0]["raw_threshold"]  # and growing moved it again


def test_growing_adds_the_good_parts_and_lists_the_defective_one_slipped_in(line: dict) -> None:
    """The README's --grow: 6 training images + 30 good parts, one defective part among them listed, not added."""
    from fsad_anomalib.models import FewShotContrastive

    printed = line["run"].stdout + line["run"].stderr
    assert "grown: 6 training images + 30 good parts" in printed, line["log"]
    not_added = [row for row in printed.splitlines() if row.startswith("NOT ADDED: ")]
    assert len(not_added) == 1 and "slipped_in_0.png" in not_added[0] and "it may be defective" in not_added[0]
    model = FewShotContrastive.load_from_checkpoint(line["work"] / "grown.ckpt", map_location="cpu")
    record = model.post_processor.calibration
    assert record["estimator"] == "cross-conformal order statistic" and record["k_shot"] == 6
    grown = record["grown"]
    assert (grown["references"], grown["added"], grown["folds"]) == (6, 30, 5)
    assert [flag["part"].rsplit("/", 1)[-1] for flag in grown["flagged"]] == ["slipped_in_0.png"]
    assert len(record["image"]["scores"]) == 36  # every image scored out of sample, by a model fitted without it
    references = torch.load(line["work"] / "grown.ckpt", map_location="cpu", weights_only=False)["fsad_references"]
    assert references.shape == (36, 3, 64, 64)  # the next --grow starts from all of them


def test_exported_models_label_as_the_checkpoint_through_anomalibs_inferencers(line: dict, monkeypatch) -> None:
    work = line["work"]
    for kind in ("openvino/model.xml", "onnx/model.onnx", "torch/model.pt"):
        assert (work / "results/weights" / kind).is_file(), kind
    code = _blocks(line["section"], "python")[0]
    for placeholder, path in line["places"].items():
        code = code.replace(placeholder, str(path))
    monkeypatch.chdir(work)
    monkeypatch.setenv("TRUST_REMOTE_CODE", "1")
    printed = io.StringIO()
    with redirect_stdout(printed):
        exec(compile(code, "README.md", "exec"), {})  # noqa: S102 - the README's own example
    labels = {row["image_path"]: row["label"] for row in _predictions(work)[-1]}
    lines = [row.split() for row in printed.getvalue().splitlines()]
    assert len(lines) == len(labels)
    for path, openvino_label, torch_label in lines:
        assert openvino_label == torch_label == labels[path], (path, openvino_label, torch_label, labels[path])


def test_exported_models_score_as_eager_with_openvino_defaults_and_no_gradient(line: dict, monkeypatch) -> None:
    """Anomalib's deploy test logic (test_inference_similarity): maps within 1e-3, scores within 1e-4, no settings."""
    from anomalib.deploy import OpenVINOInferencer, TorchInferencer

    work = line["work"]
    monkeypatch.chdir(work)
    monkeypatch.setenv("TRUST_REMOTE_CODE", "1")
    openvino = OpenVINOInferencer(path=work / "results/weights/openvino/model.xml", device="CPU")
    torch_model = TorchInferencer(path=work / "results/weights/torch/model.pt", device="cpu")
    for path in sorted((line["product"] / "test").rglob("*.png"))[:4]:
        a, b = torch_model.predict(path), openvino.predict(path)
        assert not a.pred_score.requires_grad and not a.anomaly_map.requires_grad
        np.testing.assert_allclose(np.asarray(b.pred_score).ravel(), a.pred_score.numpy().ravel(), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(
            np.asarray(b.anomaly_map).ravel(), a.anomaly_map.numpy().ravel(), rtol=1e-3, atol=1e-4
        )


def test_onnx_scores_as_the_eager_checkpoint_at_any_image_size(line: dict, tmp_path: Path, monkeypatch) -> None:
    """The exported ONNX graph (resizing, model, threshold) against the grown checkpoint in eager mode, one image at
    a time as deployed: scores, maps and labels; then images of other sizes through ONNX and both inferencers.
    """
    import onnxruntime as ort
    from anomalib.deploy import OpenVINOInferencer, TorchInferencer

    from fsad_anomalib.models import FewShotContrastive

    work = line["work"]
    model = FewShotContrastive.load_from_checkpoint(work / "grown.ckpt", map_location="cpu").eval()
    paths = sorted((line["product"] / "test").rglob("*.png"))
    images = torch.stack([torch.from_numpy(cv2.imread(str(p))[..., ::-1].copy()).permute(2, 0, 1) for p in paths])
    images = images.float() / 255
    with torch.no_grad():
        eager = model(images)
    labels = eager.pred_label.flatten()
    assert 0 < int(labels.sum()) < labels.numel()  # the threshold separates: the comparisons compare decisions
    session = ort.InferenceSession(str(work / "results/weights/onnx/model.onnx"), providers=["CPUExecutionProvider"])
    names, feed = [o.name for o in session.get_outputs()], session.get_inputs()[0].name
    for index in range(images.shape[0]):
        out = dict(zip(names, session.run(None, {feed: images[index : index + 1].numpy()}), strict=True))
        np.testing.assert_allclose(out["pred_score"], eager.pred_score[index : index + 1].numpy(), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(
            out["anomaly_map"], eager.anomaly_map[index : index + 1].numpy(), rtol=1e-3, atol=1e-4
        )
        if abs(eager.pred_score[index].item() - 0.5) > 1e-4:  # a score on the threshold may flip within tolerance
            assert bool(out["pred_label"].item()) == bool(labels[index].item())
    for size in ((64, 80), (200, 150)):
        outputs = session.run(None, {feed: torch.rand(2, 3, *size).numpy()})
        assert all(np.isfinite(o).all() for o in outputs if o.dtype.kind == "f")
    # a line camera's folder of mixed sizes, through the README's two inferencers
    folder = tmp_path / "line_camera"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for index, size in enumerate([(96, 96), (120, 80), (300, 200)]):
        cv2.imwrite(str(folder / f"{index}.png"), (rng.random((*size, 3)) * 255).astype(np.uint8))
    monkeypatch.chdir(work)
    monkeypatch.setenv("TRUST_REMOTE_CODE", "1")
    torch_model = TorchInferencer(path=work / "results/weights/torch/model.pt", device="cpu")
    openvino = OpenVINOInferencer(path=work / "results/weights/openvino/model.xml", device="CPU")
    for path in sorted(folder.glob("*.png")):
        a, b = torch_model.predict(path), openvino.predict(path)
        assert np.isfinite(float(a.pred_score))
        np.testing.assert_allclose(np.asarray(b.pred_score).ravel()[0], float(a.pred_score), rtol=1e-3)


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    exe = [str(Path(sys.executable).parent / "anomalib")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OPENVINO_TELEMETRY_DISABLED": "1"}
    return subprocess.run(exe + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False)


def _tail(result: subprocess.CompletedProcess, lines: int = 12) -> str:
    """The end of what a command printed, without whitespace (rich wraps tracebacks at the terminal's width)."""
    return "".join("".join((result.stdout + result.stderr).strip().splitlines()[-lines:]).split())


def _in_process(args: list[str], capsys: pytest.CaptureFixture) -> tuple[object, str]:
    """Anomalib's CLI in this process (no interpreter start-up): its exit code or exception, and what it printed."""
    from anomalib.cli import AnomalibCLI

    try:
        AnomalibCLI(args)
        outcome: object = 0
    except SystemExit as stop:
        outcome = stop.code
    except Exception as error:  # noqa: BLE001 - the outcome under test
        outcome = error
    printed = capsys.readouterr()
    return outcome, printed.out + printed.err


def test_anomalib_test_on_the_trained_checkpoint(line: dict, monkeypatch) -> None:
    """``anomalib test`` with the config and the checkpoint training wrote: the threshold set on the normals labels."""
    from anomalib.cli import AnomalibCLI

    monkeypatch.chdir(line["work"])
    ckpt = line["work"] / "results/FewShotContrastive/my_product/latest/weights/lightning/model.ckpt"
    cli = AnomalibCLI([
        "test",
        "--config",
        str(REPO / "configs/few_shot_contrastive_folder.yaml"),
        "--data.datamodule.root",
        str(line["product"]),
        "--model.image_size",
        "64",
        "--trainer.enable_progress_bar",
        "false",
        "--ckpt_path",
        str(ckpt),
    ])
    metrics = cli.engine.trainer.callback_metrics
    assert float(metrics["image_F1Score"]) == 1.0 and float(metrics["image_AUROC"]) == 1.0


def test_an_unfitted_checkpoint_is_refused_by_name_everywhere(line: dict, tmp_path: Path, monkeypatch, capsys) -> None:
    from fsad_anomalib.confirm import main as confirm
    from fsad_anomalib.models import NotFittedError

    work = line["work"]
    source = torch.load(
        work / "results/FewShotContrastive/my_product/latest/weights/lightning/model.ckpt",
        map_location="cpu",
        weights_only=False,
    )
    source["state_dict"]["model.is_fitted"] = torch.tensor(False)
    unfitted = tmp_path / "unfitted.ckpt"
    torch.save(source, unfitted)
    said = f"the checkpoint {unfitted} holds a model that was never fitted"
    # as a user sees it: the reason ends what `anomalib predict` prints
    result = _cli(
        [
            "predict",
            "--model",
            "FewShotContrastive",
            "--ckpt_path",
            str(unfitted),
            "--data",
            str(line["product"] / "test" / "bad"),
        ],
        tmp_path,
    )
    assert result.returncode != 0
    assert "".join(said.split()) in _tail(result)
    monkeypatch.chdir(tmp_path)
    outcome, _ = _in_process(
        ["export", "--model", "FewShotContrastive", "--ckpt_path", str(unfitted), "--export_type", "onnx"], capsys
    )
    assert isinstance(outcome, NotFittedError) and said in str(outcome)
    with pytest.raises(SystemExit) as stop:
        confirm([
            "--model",
            "FewShotContrastive",
            "--ckpt",
            str(unfitted),
            "--images",
            str(line["good_parts"]),
            "--output",
            str(tmp_path / "no.ckpt"),
        ])
    assert stop.value.code == 2
    assert said in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "no.ckpt").exists()


def test_a_bad_cli_value_ends_with_its_reason(line: dict, monkeypatch, capsys) -> None:
    """The parser's refusal is the last line printed, exit code 2 (run in this process; the unfitted-checkpoint
    test above reads what a fresh ``anomalib`` process prints).
    """
    config = str(REPO / "configs/few_shot_contrastive_folder.yaml")
    train = ["train", "--config", config, "--data.datamodule.root", str(line["product"])]
    monkeypatch.chdir(line["work"])
    refusals = (
        (["--data.k_shot", "0"], "--data.k_shot: Not of type PositiveInt"),
        (["--model.score_mode", "nonsense"], "score_mode must be one of"),
        (["--model.layers", "[9, 10]"], "has no such feature layer; it has 0 (blocks.0, stride 2)"),
    )
    for argument, reason in refusals:
        outcome, printed = _in_process([*train, *argument], capsys)
        assert outcome == 2, (outcome, printed[-2000:])
        last = printed.strip().splitlines()[-1]
        assert last.startswith("error: ") and reason in last, last


def test_images_of_any_readable_kind_are_checked_at_set_up(tmp_path: Path, monkeypatch, capsys) -> None:
    """A text file named .png in train/good fails at set-up with its name (every train/good image is the support)."""
    root = make_dataset(tmp_path / "product", n_train=3, n_test=2, size=64)
    (root / "train/good/notes.png").write_text("not an image")
    cv2.imwrite(str(root / "train/good/extra.png"), np.zeros((64, 64, 3), np.uint8))
    monkeypatch.chdir(tmp_path)
    outcome, _ = _in_process(
        [
            "train",
            "--config",
            str(REPO / "configs/few_shot_contrastive_folder.yaml"),
            "--data.datamodule.root",
            str(root),
            "--model.image_size",
            "64",
        ],
        capsys,
    )
    assert isinstance(outcome, ValueError)
    assert f"{root / 'train/good/notes.png'}: not a readable image" in str(outcome)
