"""The benchmark for any timm backbone, any anomalib model (--method-config), failed runs, kills and Ray."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from fsad_anomalib.benchmark.methods import stock_layers
from fsad_anomalib.benchmark.runner import load_runs, run_benchmark

from .conftest import folder_datamodule

# what differs from run to run of the same work: wall times and the process's memory
TIMINGS = {"train_s", "peak_rss_mb", "ms_b1", "ms_b32"}


def _data_config(path, root) -> str:
    folder = {
        "name": "toy",
        "root": str(root),
        "normal_dir": "train/good",
        "abnormal_dir": "test/bad",
        "normal_test_dir": "test/good",
        "mask_dir": "mask/bad",
        "num_workers": 0,
    }
    path.write_text(json.dumps({"data": {"class_path": "Folder", "init_args": folder}}))  # JSON is YAML
    return str(path)


def _without_timings(row: dict) -> dict:
    return {key: value for key, value in row.items() if key not in TIMINGS}


def test_stock_layers_follow_the_backbone():
    """FewShotContrastive's feature depths, by name: anomalib's own defaults on a ResNet, the usual ones on Lite0."""
    assert stock_layers("resnet18") == {"PatchCore": ["layer2", "layer3"], "PaDiM": ["layer1", "layer2", "layer3"]}
    assert stock_layers("wide_resnet50_2", [1, 2])["PatchCore"] == ["layer1", "layer2"]
    lite0 = stock_layers("offline:tf_efficientnet_lite0")
    assert lite0 == {"PatchCore": ["blocks.2", "blocks.4"], "PaDiM": ["blocks.1", "blocks.2", "blocks.4"]}
    with pytest.raises(ValueError, match=r"layer 7 is not a feature depth of resnet18: it has depths 0-4"):
        stock_layers("resnet18", [2, 7])


def test_a_dinov2_sweep_runs_fewshotcontrastive_beside_anomalydino(generated_root, tmp_path, capsys):
    """--backbone vit_small_patch14_dinov2 --no-pretrained: random weights, no download; FewShotContrastive,
    AnomalyDINO, PatchCore and PaDiM on the same ViT blocks, side by side, end to end.
    """
    from fsad_anomalib.benchmark.__main__ import main

    out = tmp_path / "bench"
    # (AnomalyDINO+fine-tuning: tests/test_callback.py fine-tunes its encoder; a CNN sweep: the Dfm test below)
    methods = ["FewShotContrastive", "AnomalyDINO", "PatchCore", "PaDiM"]
    argv = ["--data", _data_config(tmp_path / "toy.yaml", generated_root), "--k", "2", "--seeds", "0"]
    argv += ["--backbone", "vit_small_patch14_dinov2", "--no-pretrained", "--image-size", "64", "--no-timing"]
    argv += ["--model-args", '{"fine_tuning": false}', "--methods", *methods, "--output", str(out)]
    argv += ["--compare", "FewShotContrastive", "AnomalyDINO"]
    assert main(argv) == 0
    rows = {r["method"]: r for r in load_runs(out)}
    assert sorted(rows) == sorted(methods)
    for method, row in rows.items():
        assert "error" not in row, (method, row.get("error"))
        assert row["non_finite_scores"] == 0 and row["image_AUROC"] > 0.5, method  # bright blobs, random weights
    assert rows["PatchCore"]["layers"] == ["blocks.5", "blocks.8"]
    assert rows["PaDiM"]["layers"] == ["blocks.4", "blocks.5", "blocks.8"]
    assert "FewShotContrastive against AnomalyDINO, paired by support set" in (out / "results.md").read_text()
    capsys.readouterr()
    with pytest.raises(SystemExit):  # AnomalyDINO alone on a CNN: nothing runs, and the command says why
        main([
            "--sets",
            "ELPV/mono",
            "--k",
            "1",
            "--backbone",
            "resnet18",
            "--methods",
            "AnomalyDINO",
            "--output",
            str(tmp_path / "none"),
        ])
    assert "AnomalyDINO skipped: AnomalyDINO runs on DINOv2 ViTs only" in capsys.readouterr().err


def test_a_method_config_runs_beside_the_built_in_methods(generated_root, tmp_path, capsys):
    """--method-config Dfm=FILE: stock anomalib DFM, trained and tested on the same support sets and tables."""
    from fsad_anomalib.benchmark.__main__ import main

    dfm = tmp_path / "dfm.yaml"
    dfm.write_text(
        "seed_everything: 0\nmodel:\n  class_path: Dfm\n  init_args:\n    backbone: resnet18\n"
        "    layer: layer3\n    pre_trained: false\n    post_processor: true\n"
    )
    out = tmp_path / "bench"
    # K = 4: DFM's PCA needs more than one image in each leave-one-out refit
    assert (
        main([
            "--data",
            _data_config(tmp_path / "toy.yaml", generated_root),
            "--k",
            "4",
            "--seeds",
            "0",
            "1",
            "--methods",
            "PatchCore",
            "--method-config",
            f"Dfm={dfm}",
            "--backbone",
            "resnet18",
            "--no-pretrained",
            "--image-size",
            "64",
            "--no-timing",
            "--output",
            str(out),
            "--compare",
            "Dfm",
            "PatchCore",
        ])
        == 0
    )
    printed = capsys.readouterr().out
    assert "only its model section and trainer.max_epochs/max_steps are read (seed_everything ignored" in printed
    assert "post_processor replaced by the benchmark's" in printed
    rows = load_runs(out)
    assert sorted((r["method"], r["seed"]) for r in rows) == [
        ("Dfm", 0),
        ("Dfm", 1),
        ("PatchCore", 0),
        ("PatchCore", 1),
    ]
    by = {(r["method"], r["seed"]): r for r in rows}
    for seed in (0, 1):
        dfm_row, patchcore = by["Dfm", seed], by["PatchCore", seed]
        assert dfm_row["support_set"] == patchcore["support_set"]  # the same support sets
        assert dfm_row["model_args"]["class_path"] == "Dfm" and dfm_row["image_AUROC"] > 0.5
        assert dfm_row["threshold"]["at"]["0.05"]["threshold"] == dfm_row["threshold"]["threshold"]  # refitted on K - 1
    results = (out / "results.md").read_text()
    assert "| Folder toy | Dfm |" in results and "| Folder toy | PatchCore |" in results
    assert "Dfm" in results.split("OK/NG decision")[1]  # its normal-only threshold is tabled too
    assert "Dfm against PatchCore, paired by support set" in results and "| Folder toy | 4 | 2 |" in results


def test_a_model_trained_by_an_optimiser_gets_auroc_and_no_threshold(generated_root, tmp_path, capsys):
    """GANomaly cannot be refitted on K - 1 images: ranked scores and AUROC, a NaN threshold record; the file's
    trainer.max_epochs bounds its training.
    """
    from fsad_anomalib.benchmark.__main__ import main

    gan = tmp_path / "ganomaly.yaml"
    gan.write_text(
        "trainer:\n  max_epochs: 1\n  accelerator: cpu\nmodel:\n  class_path: Ganomaly\n  init_args:\n"
        "    batch_size: 2\n    n_features: 8\n    latent_vec_size: 8\n"
    )
    out = tmp_path / "bench"
    assert (
        main([
            "--data",
            _data_config(tmp_path / "toy.yaml", generated_root),
            "--k",
            "2",
            "--seeds",
            "0",
            "--methods",
            "PatchCore",
            "--method-config",
            f"Gan={gan}",
            "--image-size",
            "64",
            "--no-timing",
            "--output",
            str(out),
        ])
        == 0
    )
    printed = capsys.readouterr().out
    assert "Ganomaly is trained by an optimiser and cannot be refitted" in printed
    assert "(trainer.accelerator ignored" in printed
    row = next(r for r in load_runs(out) if r["method"] == "Gan")
    assert "error" not in row and 0.0 <= row["image_AUROC"] <= 1.0 and row["non_finite_scores"] == 0
    assert row["threshold"]["threshold"] != row["threshold"]["threshold"]  # NaN: no normal-only threshold
    assert "| Folder toy | Gan |" in (out / "results.md").read_text()


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("model: [unclosed", "not a YAML file"),
        ("trainer:\n  max_epochs: 1\n", "expected an anomalib model: a 'model:' section"),
        ("model:\n  class_path: NoSuchModel\n", "its model (NoSuchModel) could not be built"),
        ("model:\n  class_path: Dfm\n  init_args:\n    no_such_argument: 3\n", "its model (Dfm) could not be built"),
        (
            "trainer:\n  max_epochs: 0\nmodel:\n  class_path: Dfm\n",
            "trainer.max_epochs must be a whole number of at least 1",
        ),
    ],
)
def test_bad_method_configs_are_refused_before_any_run(content, expected, generated_root, tmp_path, capsys):
    from fsad_anomalib.benchmark.__main__ import main

    bad = tmp_path / "bad.yaml"
    bad.write_text(content)
    out = tmp_path / "bench"
    with pytest.raises(SystemExit):
        main([
            "--data",
            _data_config(tmp_path / "toy.yaml", generated_root),
            "--k",
            "1",
            "--methods",
            "PatchCore",
            "--method-config",
            f"Mine={bad}",
            "--output",
            str(out),
        ])
    error = capsys.readouterr().err
    assert f"--method-config Mine={bad}: {expected}" in error
    assert not (out / "runs.jsonl").exists()


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--method-config", "Dfm"], "expected NAME=FILE"),
        (["--method-config", "PatchCore=x.yaml"], "the name PatchCore is taken"),
        (
            ["--method-config", "Mine=/no/such/file.yaml"],
            "--method-config Mine=/no/such/file.yaml: cannot read the file",
        ),
        (["--methods", "Dfm"], "--methods: unknown Dfm"),
        (["--ray-address", "auto"], "--ray-address joins a Ray cluster: give --executor ray as well"),
        (
            ["--backbone", "resnet18", "--model-args", '{"layers": [2, 9]}', "--methods", "PatchCore"],
            "layer 9 is not a feature depth of resnet18",
        ),
    ],
)
def test_method_options_are_checked_before_any_run(argv, expected, tmp_path, capsys):
    from fsad_anomalib.benchmark.__main__ import main

    with pytest.raises(SystemExit):
        main(["--sets", "ELPV/mono", "--k", "1", "--output", str(tmp_path / "bench"), *argv])
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "bench" / "runs.jsonl").exists()


def test_a_failed_run_is_recorded_and_the_sweep_goes_on(generated_root, tmp_path):
    def broken():
        msg = "the data folder went away"
        raise OSError(msg)

    sets = {"broken/set": broken, "generated/toy": lambda: folder_datamodule(generated_root, val_split_mode="none")}
    printed = []
    rows = run_benchmark(
        sets,
        k_shots=[2],
        seeds=[0],
        methods=["PatchCore"],
        output=tmp_path,
        image_size=64,
        time_inference=False,
        progress=printed.append,
    )
    assert rows[0]["error"] == "OSError: the data folder went away" and "Traceback" in rows[0]["traceback"]
    assert "error" not in rows[1] and rows[1]["image_AUROC"] > 0.9
    assert printed[0] == "[1/2] broken/set K=2 seed=0 PatchCore"
    assert printed[1].startswith("    FAILED, OSError: the data folder went away  (1/2 done in ")
    # a resumed sweep runs the failed run again, and only that one
    printed.clear()
    run_benchmark(
        {"broken/set": broken, **{k: v for k, v in sets.items() if k != "broken/set"}},
        k_shots=[2],
        seeds=[0],
        methods=["PatchCore"],
        output=tmp_path,
        image_size=64,
        time_inference=False,
        progress=printed.append,
    )
    assert printed[0] == f"1 of 2 runs are already in {tmp_path / 'runs.jsonl'}; 1 to run"


def test_a_killed_sweep_resumes(generated_root, tmp_path, capsys):
    """SIGKILL mid-sweep (Lightning catches SIGTERM), even mid-line: the same command finishes the rest."""
    config = _data_config(tmp_path / "toy.yaml", generated_root)
    out = tmp_path / "bench"
    argv = [
        sys.executable,
        "-m",
        "fsad_anomalib.benchmark",
        "--data",
        config,
        "--k",
        "1",
        "2",
        "--seeds",
        "0",
        "1",
        "--methods",
        "PatchCore",
        "--image-size",
        "64",
        "--no-timing",
        "--output",
        str(out),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    runs = out / "runs.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (runs.exists() and runs.read_text().count("\n") >= 1):
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    kept = load_runs(out)
    assert 1 <= len(kept) < 4
    with runs.open("a") as handle:  # as if killed while writing the next row
        handle.write('{"dataset": "Folder", "categ')
    from fsad_anomalib.benchmark.__main__ import main

    assert main(argv[3:]) == 0  # the same command again (in this process: no second interpreter start-up)
    assert f"{len(kept)} of 4 runs are already in" in capsys.readouterr().out
    rows = load_runs(out)
    assert len(rows) == 4 and rows[: len(kept)] == kept
    assert sorted((r["k_shot"], r["seed"]) for r in rows) == [(1, 0), (1, 1), (2, 0), (2, 1)]


def test_a_ray_sweep_equals_the_serial_one(generated_root, tmp_path):
    """A local Ray cluster of 2 CPUs, one run: the driver's runs.jsonl holds the serial sweep's row, timings aside;
    one more run, of a set that cannot be built, is recorded as failed and the sweep goes on (each Ray task starts
    a worker process of its own: two tasks keep the test short).
    """
    sets = {"generated/toy": lambda: folder_datamodule(generated_root, val_split_mode="none")}
    common = {
        "k_shots": [2],
        "seeds": [0],
        "methods": ["PatchCore"],
        "image_size": 64,
        "time_inference": False,
        "backbone": "resnet18",
        "pre_trained": False,
        "cpus_per_run": 1,
        "progress": lambda _line: None,
    }
    serial = run_benchmark(sets, output=tmp_path / "serial", **common)

    def broken():
        msg = "the data folder went away"
        raise OSError(msg)

    printed = []
    ray_rows = run_benchmark(
        {**sets, "broken/set": broken},
        output=tmp_path / "ray",
        executor="ray",
        **{**common, "progress": printed.append},
    )
    assert printed[0] == "2 runs as Ray tasks on a local Ray cluster"
    assert any("(2/2 done in " in line for line in printed) and any(" left)" in line for line in printed)
    failed = [r for r in ray_rows if "error" in r]
    assert len(failed) == 1 and failed[0]["error"] == "OSError: the data folder went away"
    assert any(": FAILED, OSError: the data folder went away" in line for line in printed)
    key = lambda r: (r["k_shot"], r["seed"])  # noqa: E731
    assert sorted(key(r) for r in ray_rows if "error" not in r) == sorted(map(key, serial))

    def rows_of(folder):  # as JSON text, so that a NaN compares equal to NaN
        return {key(r): json.dumps(_without_timings(r), sort_keys=True) for r in load_runs(folder) if "error" not in r}

    assert rows_of(tmp_path / "ray") == rows_of(tmp_path / "serial")  # to the last digit
