"""The benchmark runs end to end on a tiny generated dataset, writes one row per run and resumes."""

from __future__ import annotations

import json
import math

import pytest

from fsad_anomalib.benchmark import report
from fsad_anomalib.benchmark.report import paired_table, sign_flip_p, write_plots, write_table
from fsad_anomalib.benchmark.runner import run_benchmark

from .conftest import folder_datamodule


def test_benchmark_end_to_end_and_resume(generated_root, tmp_path):
    out = tmp_path / "bench"
    # as the command line builds them: no validation split, the test set is scored once
    sets = {"generated/toy": lambda: folder_datamodule(generated_root, val_split_mode="none")}
    methods = ["FewShotContrastive", "frozen", "PatchCore", "PaDiM"]
    args = {"fine_tuning": {"steps": 2}, "n_views": 2}
    printed = []
    rows = run_benchmark(
        sets,
        k_shots=[1, 2],
        seeds=[0],
        methods=methods,
        output=out,
        image_size=64,
        fsc_args=args,
        progress=printed.append,
    )
    assert len(rows) == 2 * len(methods)
    assert printed[0] == "[1/8] generated/toy K=1 seed=0 FewShotContrastive"  # long runs show where they are
    assert "(1/8 done in " in printed[1] and " left)" in printed[1] and "(8/8 done in " in printed[-1]
    lines = (out / "runs.jsonl").read_text().splitlines()
    assert len(lines) == 2 * len(methods)
    row = json.loads(lines[0])
    for key in (
        "image_AUROC",
        "pixel_AUROC",
        "train_s",
        "ms_b1",
        "ms_b32",
        "peak_rss_mb",
        "support_set",
        "test_normal",
        "test_anomalous",
    ):
        assert key in row
    assert len(row["support_set"]) == row["k_shot"]
    # the generated defects are plain to see: real rankings, not the 0.5 of tied or constant scores
    by_method = {r["method"]: r for r in rows if r["k_shot"] == 2}
    assert by_method["FewShotContrastive"]["image_AUROC"] > 0.9
    assert by_method["PatchCore"]["image_AUROC"] > 0.9
    assert by_method["FewShotContrastive"]["pixel_AUROC"] > 0.9
    # stock PaDiM cannot fit a covariance from one image: its NaN scores are flagged and give no AUROC
    padim_1 = next(r for r in rows if r["method"] == "PaDiM" and r["k_shot"] == 1)
    assert padim_1["non_finite_scores"] > 0 and math.isnan(padim_1["image_AUROC"])
    assert all(r["non_finite_scores"] == 0 for r in rows if r is not padim_1)
    assert json.loads((out / "backbone_floor.json").read_text())["ms_b1"] > 0
    # each run's threshold, set from its K normals, and what it does on the test set beside the oracle's
    for r in (by_method["FewShotContrastive"], by_method["PatchCore"]):
        record = r["threshold"]
        assert record["target_false_reject_rate"] == 0.05 and math.isfinite(record["threshold"])
        # two normals give a wide bound (Student's t with 1 degree of freedom): rates are recorded, not bounded here
        assert 0 <= record["false_reject_rate"] <= 1 and 0 <= record["detection_rate"] <= 1
        assert set(record["at"]) == {"0.01", "0.05"} and record["at"]["0.01"]["threshold"] > record["threshold"]
        assert record["oracle_detection_rate"] >= 0.5
        assert r["calibration"]["k_shot"] == 2 and len(r["calibration"]["held_out_scores"]) >= 2
    assert "false rejects" in printed[1]
    # resuming runs nothing new
    printed.clear()
    again = run_benchmark(
        sets,
        k_shots=[1, 2],
        seeds=[0],
        methods=methods,
        output=out,
        image_size=64,
        fsc_args=args,
        progress=printed.append,
    )
    assert printed == [f"8 of 8 runs are already in {out / 'runs.jsonl'}; 0 to run"]
    assert len(again) == len(rows)
    assert len((out / "runs.jsonl").read_text().splitlines()) == len(lines)
    table = write_table(again, out / "results.md", methods=methods)
    assert "PatchCore" in table and "K=2" in table
    assert "NaN in 1/1" in table  # PaDiM at K = 1
    assert "OK/NG decision" in table and "| generated toy | 2 | 1 % | PatchCore | 1 |" in table
    plots = write_plots(again, out)
    assert all(p.exists() and p.stat().st_size > 0 for p in plots)
    # the command line rewrites the table from the runs alone, for a subset, without running anything
    from fsad_anomalib.benchmark.__main__ import main

    (out / "results.md").unlink()
    assert (
        main([
            "--report-only",
            "--sets",
            "generated/toy",
            "--k",
            "2",
            "--methods",
            "PatchCore",
            "PaDiM",
            "--output",
            str(out),
        ])
        == 0
    )
    report = (out / "results.md").read_text()
    assert "| generated toy | PatchCore |" in report and "K=1" not in report and "FewShotContrastive" not in report
    # run by run on the same support sets: FewShotContrastive against frozen, from the runs themselves
    assert (
        main([
            "--report-only",
            "--sets",
            "generated/toy",
            "--k",
            "1",
            "2",
            "--methods",
            "FewShotContrastive",
            "frozen",
            "--compare",
            "FewShotContrastive",
            "frozen",
            "--compare",  # given twice, as the README's results command does: one table per pair
            "frozen",
            "FewShotContrastive",
            "--output",
            str(out),
        ])
        == 0
    )
    report = (out / "results.md").read_text()
    assert "mean FewShotContrastive - frozen" in report and "mean frozen - FewShotContrastive" in report
    auroc = {(r["method"], r["k_shot"]): r["image_AUROC"] for r in rows}
    for k in (1, 2):
        diff = auroc["FewShotContrastive", k] - auroc["frozen", k]
        assert f"| generated toy | {k} | 1 | {diff:+.3f} |" in report
    assert "| generated toy | all | 2 |" in report
    assert len((out / "runs.jsonl").read_text().splitlines()) == len(lines)
    # another folder's runs join the table where this one has none; its own runs.jsonl is left alone
    other = tmp_path / "other"
    other.mkdir()
    stock = [json.loads(line) for line in lines if json.loads(line)["method"] in {"PatchCore", "PaDiM"}]
    mine = [json.loads(line) for line in lines if json.loads(line)["method"] == "frozen"]
    (other / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mine))
    stock_only = tmp_path / "stock_only"
    stock_only.mkdir()
    (stock_only / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in stock))
    assert (
        main([
            "--report-only",
            "--sets",
            "generated/toy",
            "--k",
            "1",
            "2",
            "--methods",
            "frozen",
            "PatchCore",
            "--output",
            str(other),
            "--include-runs",
            str(stock_only),
        ])
        == 0
    )
    report = (other / "results.md").read_text()
    assert "| generated toy | PatchCore |" in report and "| generated toy | frozen |" in report
    # only the requested runs are taken in (PaDiM's are not): 2 frozen + 2 PatchCore
    assert f"2 of these 4 runs come from --include-runs {stock_only}" in report
    assert len((other / "runs.jsonl").read_text().splitlines()) == len(mine)
    # a summary folder of other folders' runs alone: it gets the table and plots, and no runs.jsonl
    summary = tmp_path / "summary"
    assert (
        main([
            "--report-only",
            "--sets",
            "generated/toy",
            "--k",
            "1",
            "2",
            "--methods",
            "frozen",
            "PatchCore",
            "--output",
            str(summary),
            "--include-runs",
            str(other),
            str(stock_only),
        ])
        == 0
    )
    report = (summary / "results.md").read_text()
    assert "| generated toy | PatchCore |" in report and "| generated toy | frozen |" in report
    assert "4 of these 4 runs come from --include-runs" in report
    assert not (summary / "runs.jsonl").exists() and list(summary.glob("*.png"))
    with pytest.raises(SystemExit):
        main(["--report-only", "--sets", "generated/toy", "--output", str(other), "--include-runs", str(tmp_path)])


def test_paired_table_counts_each_support_set_once_and_skips_nan_runs():
    def run(method: str, k: int, seed: int, auroc: float, category: str = "a") -> dict:
        return {
            "dataset": "set",
            "category": category,
            "k_shot": k,
            "seed": seed,
            "method": method,
            "image_AUROC": auroc,
        }

    rows = [
        run("A", 1, 0, 0.80),
        run("B", 1, 0, 0.70),  # A ahead by 0.10
        run("A", 1, 1, 0.60),
        run("B", 1, 1, 0.60),  # level
        run("A", 1, 2, 0.50),
        run("B", 1, 2, 0.70),  # B ahead by 0.20
        run("A", 2, 0, 0.90),
        run("B", 2, 0, float("nan")),  # no pair: B gave no AUROC
        run("A", 2, 1, 0.90),  # no pair: B never ran
        run("C", 1, 0, 0.99),
        run("A", 4, 0, 0.75, "b"),
        run("B", 4, 0, 0.70, "b"),
    ]
    table = paired_table(rows, "A", "B")
    assert "| set | K | pairs | mean A - B | A ahead | level | B ahead |" in table
    assert "| set a | 1 | 3 | -0.033 | 1 | 1 | 1 |" in table
    assert "| set a | 2 |" not in table and "| set a | all |" not in table  # one K with pairs: no summary row
    assert "| set b | 4 | 1 | +0.050 | 1 | 0 | 0 |" in table
    rows += [run("A", 2, 2, 0.66), run("B", 2, 2, 0.60)]
    assert "| set a | all | 4 | -0.010 | 2 | 1 | 1 |" in paired_table(rows, "A", "B")
    assert "| set a | 1 | 1 | -0.190 | 0 | 0 | 1 |" in paired_table(rows, "A", "C")
    assert "no set, K and seed" in paired_table(rows, "B", "D")
    # the p column: set a, K = 1 has differences +0.10, 0, -0.20; every sign pattern sums to 0.1 or 0.3 in size
    assert "| set a | 1 | 3 | -0.033 | 1 | 1 | 1 | 1.000 |" in paired_table(rows, "A", "B")
    assert "| set b | 4 | 1 | +0.050 | 1 | 0 | 0 | 1.000 |" in paired_table(rows, "A", "B")


def test_sign_flip_p_counts_the_sign_patterns_at_least_as_extreme(monkeypatch: pytest.MonkeyPatch) -> None:
    assert sign_flip_p([0.1, 0.2, 0.3]) == pytest.approx(2 / 8)  # only all-plus and all-minus reach 0.6
    # magnitudes 0.3, 0.1, 0.2 and observed sum 0.4: +++ (0.6), +-+ (0.4) and their mirrors -> 4 of 8
    assert sign_flip_p([0.3, -0.1, 0.2]) == pytest.approx(0.5)
    assert sign_flip_p([0.1, -0.1]) == 1.0 and sign_flip_p([0.0, 0.0, 0.0]) == 1.0
    assert math.isnan(sign_flip_p([]))
    with pytest.raises(ValueError, match="sign_flip_p: differences must be finite"):
        sign_flip_p([0.1, float("nan"), 0.2])  # was a silent p = 0
    # beyond the exact limit: random patterns, reproducible, close to the exact value
    values = [0.012, -0.004, 0.007, 0.001, 0.02, -0.011, 0.005, 0.003, -0.002, 0.009, 0.006, -0.001]
    exact = sign_flip_p(values)
    monkeypatch.setattr(report, "EXACT_SIGN_FLIP_PAIRS", 4)
    sampled = sign_flip_p(values, draws=200_000)
    assert sampled == sign_flip_p(values, draws=200_000)
    assert abs(sampled - exact) < 0.01 and 0.01 < exact < 0.2
    assert sign_flip_p([1.0] * 11 + [-1.0] * 10, draws=1000) == 1.0  # an odd count of +-1 always sums to >= 1
    assert sign_flip_p([0.01] * 25, draws=1000) == pytest.approx(1 / 1001)  # all 25 of one sign: never drawn


def test_benchmark_compare_names_methods_it_tables(capsys: pytest.CaptureFixture[str]) -> None:
    from fsad_anomalib.benchmark.__main__ import main

    with pytest.raises(SystemExit):
        main([
            "--report-only",
            "--methods",
            "frozen",
            "PatchCore",
            "--compare",
            "FewShotContrastive",
            "frozen",
            "--output",
            "/nonexistent-fsad-output",
        ])
    err = capsys.readouterr().err
    assert "--compare FewShotContrastive frozen" in err and "--methods" in err
    with pytest.raises(SystemExit):
        main([
            "--report-only",
            "--methods",
            "frozen",
            "--compare",
            "frozen",
            "frozen",
            "--output",
            "/nonexistent-fsad-output",
        ])
    assert "--compare frozen frozen: name two different methods" in capsys.readouterr().err


def test_benchmark_auroc_is_the_ranking_auroc_of_raw_scores():
    """Large raw distances (PatchCore's are 30 to 60) keep their order through the benchmark's post-processor."""
    import torch
    from anomalib.data import ImageBatch
    from anomalib.metrics import AUROC
    from sklearn.metrics import roc_auc_score

    from fsad_anomalib.benchmark.methods import OrderPreservingPostProcessor

    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(64) % 2 == 0
    raw = 40 + 5 * torch.randn(64, generator=generator) + 0.8 * labels  # every score far above sigmoid's range
    batch = ImageBatch(image=torch.zeros(64, 3, 8, 8), gt_label=labels, pred_score=raw.clone())
    OrderPreservingPostProcessor().post_process_batch(batch)
    assert ((batch.pred_score > 0) & (batch.pred_score < 1)).all()
    assert torch.equal(torch.argsort(batch.pred_score), torch.argsort(raw))
    metric = AUROC(fields=["pred_score", "gt_label"])
    metric.update(batch)
    expected = roc_auc_score(labels.numpy(), raw.numpy())
    assert float(metric.compute()) == pytest.approx(expected, abs=1e-6)
    assert 0.55 < expected < 0.95  # a ranking that ties would give 0.5


@pytest.mark.parametrize("variant", ["{not json", "[1, 2]"])
def test_speed_variants_must_be_json_objects(variant: str, capsys: pytest.CaptureFixture[str]) -> None:
    from fsad_anomalib.benchmark import speed

    with pytest.raises(SystemExit):
        speed.main(["--variants", variant])
    assert "--variants" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--model-args", "{not json"], "--model-args"),
        (["--model-args", "[1, 2]"], "--model-args"),  # valid JSON, but not FewShotContrastive arguments
        (["--sets", "ELPV/mono", "--set-model-args", "ELPV/mono=[1]"], "--set-model-args"),
        (["--sets", "ELPV/mono", "--set-model-args", "ELPV/mono={x"], "--set-model-args"),
    ],
)
def test_benchmark_model_args_must_be_json_objects(
    argv: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from fsad_anomalib.benchmark.__main__ import main

    with pytest.raises(SystemExit):
        main([*argv, "--report-only", "--output", "/nonexistent-fsad-output"])
    err = capsys.readouterr().err
    assert named in err
    assert "JSON" in err


def _data_config(path, root, **init_args) -> str:
    """An `anomalib train --config` file: FewShot around Folder over the generated set, plus a model section."""
    folder = {
        "name": "toy",
        "root": str(root),
        "normal_dir": "train/good",
        "abnormal_dir": "test/bad",
        "normal_test_dir": "test/good",
        "mask_dir": "mask/bad",
        "val_split_mode": "same_as_test",
        "num_workers": 0,
        **init_args,
    }
    config = {
        "model": {"class_path": "FewShotContrastive"},
        "data": {
            "class_path": "FewShot",
            "init_args": {"k_shot": 4, "seed": 0, "datamodule": {"class_path": "Folder", "init_args": folder}},
        },
    }
    path.write_text(json.dumps(config))  # JSON is YAML
    return str(path)


def test_benchmark_runs_on_an_anomalib_datamodule_config(generated_root, tmp_path, capsys: pytest.CaptureFixture[str]):
    """--data takes the data section of an anomalib config: the user's own Folder, with masks, beside PatchCore."""
    from anomalib.data.utils import ValSplitMode

    from fsad_anomalib.benchmark.__main__ import main
    from fsad_anomalib.benchmark.sets import DataConfig

    config = _data_config(tmp_path / "my_product.yaml", generated_root)
    data = DataConfig(config)
    assert data.label == "Folder/toy"
    datamodule = data()  # FewShot unwrapped; the validation split taken off, so the whole test set is scored
    assert type(datamodule).__name__ == "Folder" and datamodule.val_split_mode == ValSplitMode.NONE
    datamodule.setup()
    assert len(datamodule.test_data) == 16 and not getattr(datamodule, "val_data", None)

    out = tmp_path / "bench"
    assert (
        main([
            "--data",
            config,
            "--k",
            "2",
            "--seeds",
            "0",
            "--methods",
            "frozen",
            "PatchCore",
            "--image-size",
            "64",
            "--no-timing",
            "--set-model-args",
            'Folder/toy={"n_views": 2}',
            "--output",
            str(out),
            "--compare",
            "frozen",
            "PatchCore",
        ])
        == 0
    )
    printed = capsys.readouterr().out
    assert "k_shot and seed are left aside" in printed and "val_split_mode same_as_test -> none" in printed
    assert "model ignored" in printed
    rows = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert [(r["dataset"], r["category"], r["method"]) for r in rows] == [
        ("Folder", "toy", "frozen"),
        ("Folder", "toy", "PatchCore"),
    ]
    assert rows[0]["model_args"] == {"n_views": 2} and rows[1]["model_args"] == {}
    assert rows[0]["support_set"] == rows[1]["support_set"] and len(rows[0]["support_set"]) == 2
    assert all(
        (r["test_normal"], r["test_anomalous"]) == (8, 8) for r in rows
    )  # the whole test set, no validation split
    for row in rows:  # the generated blobs are plain to see, and the masks give pixel AUROC
        assert row["image_AUROC"] > 0.9 and row["pixel_AUROC"] > 0.9
    results = (out / "results.md").read_text()
    assert "| Folder toy | 2 | 1 |" in results  # the paired table
    assert "Test images: Folder toy: 8 normal + 8 anomalous." in results
    image, pixel = results.split("Pixel AUROC")  # the masks give a second table
    for table, metric in ((image, "image_AUROC"), (pixel, "pixel_AUROC")):
        assert f"| Folder toy | frozen | {rows[0][metric]:.3f} +- 0.000 |" in table

    # a run with --include-runs trains only what those folders lack: here PatchCore's run is taken from `out`
    again = tmp_path / "again"
    args = ["--data", config, "--k", "2", "--seeds", "0", "--image-size", "64", "--no-timing", "--output", str(again)]
    assert main([*args, "--methods", "PatchCore", "--include-runs", str(out)]) == 0
    assert "and 1 in --include-runs folders; 0 to run" in capsys.readouterr().out
    assert not (again / "runs.jsonl").exists() or not (again / "runs.jsonl").read_text().strip()
    assert f"| Folder toy | PatchCore | {rows[1]['image_AUROC']:.3f} +- 0.000 |" in (again / "results.md").read_text()


def test_benchmark_confirms_thresholds_on_further_pool_normals(generated_root, tmp_path, capsys):
    """--confirm N --grow: each run's threshold is confirmed on N pool normals outside its support set (never test
    images), its rates on the same test scores are recorded and tabled; then the model grows by them and is tested
    again; more than the pool holds fails that run, by name.
    """
    from fsad_anomalib.benchmark.__main__ import main

    config = _data_config(tmp_path / "my_product.yaml", generated_root)
    out = tmp_path / "bench"
    assert (
        main([
            "--data",
            config,
            "--k",
            "2",
            "--seeds",
            "0",
            "1",
            "--methods",
            "PatchCore",
            "--image-size",
            "64",
            "--no-timing",
            "--confirm",
            "8",
            "--grow",
            "--output",
            str(out),
        ])
        == 0
    )
    rows = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        grown = row["grown"]  # K = 2 + 8 pool normals, each scored by a model fitted without it (5 folds)
        assert (grown["n"], grown["added"], grown["flagged"], grown["folds"]) == (8, 8, 0, 5)
        assert grown["estimator"] == "cross-fitted normal prediction bound"  # 10 scores < 19
        assert grown["image_AUROC"] > 0.9 and grown["at"]["0.05"]["detection_rate"] > 0.5
        confirmed = row["confirmed"]
        assert confirmed["n"] == 8 and confirmed["estimator"] == "normal prediction bound"  # 8 < 19 parts
        assert set(confirmed["at"]) == {"0.01", "0.05"}
        assert confirmed["at"]["0.01"]["threshold"] > confirmed["at"]["0.05"]["threshold"]
        assert confirmed["at"]["0.05"]["threshold"] != row["threshold"]["threshold"]  # a threshold of its own
        assert (
            0 <= confirmed["at"]["0.05"]["false_reject_rate"] <= 1 and confirmed["at"]["0.05"]["detection_rate"] > 0.5
        )
    results = (out / "results.md").read_text()
    assert "| Folder toy | 2 | 5 % | PatchCore | 2 |" in results
    assert "| Folder toy | 2 | 5 % | PatchCore, confirmed on 8 | 2 |" in results
    assert results.index("| 5 % | PatchCore |") < results.index("| 5 % | PatchCore, confirmed on 8 |")
    assert results.index("| 5 % | PatchCore, confirmed on 8 |") < results.index("| 5 % | PatchCore, grown by 8 |")
    before = sum(row["image_AUROC"] for row in rows) / 2
    after = sum(row["grown"]["image_AUROC"] for row in rows) / 2
    assert f"| Folder toy | 2 | PatchCore | 8 | 2 | {before:.3f} | {after:.3f} | {after - before:+.3f} |" in results
    # 12 pool normals, 2 in the support set: 11 more cannot be drawn
    too_many = tmp_path / "too_many"
    main([
        "--data",
        config,
        "--k",
        "2",
        "--seeds",
        "0",
        "--methods",
        "PatchCore",
        "--image-size",
        "64",
        "--no-timing",
        "--confirm",
        "11",
        "--output",
        str(too_many),
    ])
    failed = json.loads((too_many / "runs.jsonl").read_text().splitlines()[0])
    assert "--confirm 11: the training pool holds 10 normals outside the support set" in failed["error"]
    capsys.readouterr()


def test_pixel_auroc_table_only_for_sets_with_masks(tmp_path):
    def run(dataset, method, seed, image, pixel, maps=0):
        return {
            "dataset": dataset,
            "category": "c",
            "k_shot": 2,
            "seed": seed,
            "method": method,
            "image_AUROC": image,
            "pixel_AUROC": pixel,
            "non_finite_maps": maps,
            "train_s": 1.0,
        }

    rows = [
        run("masks", "A", 0, 0.8, 0.9),
        run("masks", "A", 1, 0.6, 0.7),
        run("masks", "B", 0, 0.5, float("nan"), 3),
        run("nomasks", "A", 0, 0.7, None),
    ]
    text = write_table(rows, tmp_path / "results.md", methods=["A", "B"])
    image, pixel = text.split("Pixel AUROC")
    assert "| masks c | A | 0.700 +- 0.141 |" in image and "| nomasks c | A | 0.700 +- 0.000 |" in image
    assert "| masks c | A | 0.800 +- 0.141 |" in pixel and "| masks c | B | NaN in 1/1 |" in pixel
    assert "nomasks" not in pixel
    assert "Pixel AUROC" not in write_table(rows[3:], tmp_path / "results.md")


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "cannot read the file"),
        ("data: [\n", "not a YAML file"),
        ("model: {class_path: FewShotContrastive}\n", "expected an anomalib datamodule"),
        ("data: {class_path: torch.nn.Linear, init_args: {in_features: 2, out_features: 3}}\n", "could not be built"),
        (
            "data: {class_path: Folder, init_args: {name: x, root: ROOT, normal_dir: train/good, bogus: 1}}\n",
            "'bogus' is not accepted",
        ),
        (
            "data: {class_path: Folder, init_args: {name: x, root: ROOT/missing, normal_dir: train/good}}\n",
            "could not list its images",
        ),
        (
            (
                "data: {class_path: Folder, init_args: {name: x, root: ROOT, normal_dir: train/good, "
                "normal_test_dir: test/good}}\n"
            ),
            "8 normal and 0 anomalous",
        ),
    ],
)
def test_benchmark_data_config_errors_name_the_file(content, expected, generated_root, tmp_path, capsys):
    from fsad_anomalib.benchmark.__main__ import main

    path = tmp_path / "data.yaml"
    if content is not None:
        path.write_text(content.replace("ROOT", str(generated_root)))
    with pytest.raises(SystemExit):
        main(["--data", str(path), "--no-timing", "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert f"--data {path}:" in err and expected in err
    assert not (tmp_path / "out").exists()  # nothing ran


def test_benchmark_refuses_a_set_given_twice(generated_root, tmp_path, capsys):
    from fsad_anomalib.benchmark.__main__ import main

    first = _data_config(tmp_path / "a.yaml", generated_root)
    second = _data_config(tmp_path / "b.yaml", generated_root, mask_dir=None)  # another file, the same name
    with pytest.raises(SystemExit):
        main(["--data", first, second, "--k", "2", "--output", str(tmp_path / "out")])
    assert "the set Folder/toy is given more than once" in capsys.readouterr().err


def test_benchmark_refuses_a_k_above_the_data_configs_pool(generated_root, tmp_path, capsys):
    """The generated set has 12 normal training images: K = 16 stops the command before the first run, not after."""
    from fsad_anomalib.benchmark.__main__ import main

    config = _data_config(tmp_path / "a.yaml", generated_root)
    with pytest.raises(SystemExit):
        main(["--data", config, "--k", "4", "16", "--output", str(tmp_path / "out")])
    assert f"--data {config}: --k 16 needs 16 normal training images, and the datamodule's training split holds 12" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--sets", "ELPV/mono", "Foo/bar"], "--sets: unknown set 'Foo/bar'"),
        (["--sets", "ELPV/mono", "ELPV/foo"], "--sets ELPV/foo: ELPV category must be one of ('mono', 'poly')"),
        (["--sets", "MVTecAD/bottle", "--evaluation", "dev"], "--evaluation dev: only the offline sets"),
    ],
)
def test_benchmark_refuses_a_wrong_set_before_the_first_run(argv, expected, tmp_path, capsys):
    """A wrong name among --sets used to fail at that set's first run, after the sets before it had run."""
    from fsad_anomalib.benchmark.__main__ import main

    with pytest.raises(SystemExit):
        main([*argv, "--k", "1", "--output", str(tmp_path / "out")])
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--k", "0"], "argument --k: expected an integer >= 1, got '0'"),
        (["--k", "two"], "argument --k: expected an integer >= 1, got 'two'"),
        (["--seeds", "-1"], "argument --seeds: expected an integer >= 0, got '-1'"),  # numpy's seed bound, deep inside
        (["--image-size", "16"], "argument --image-size: expected an integer >= 32, got '16'"),
        (["--eval-batch-size", "0"], "argument --eval-batch-size: expected an integer >= 1, got '0'"),
        (["--false-reject-rate", "5"], "argument --false-reject-rate: expected a rate in (0, 0.5), e.g. 0.05"),
        (["--confirm", "1"], "argument --confirm: expected an integer >= 2, got '1'"),
        (["--grow"], "--grow grows each model by the --confirm N pool normals: give --confirm N as well."),
    ],
)
def test_benchmark_numeric_options_are_checked_up_front(argv, expected, tmp_path, capsys):
    from fsad_anomalib.benchmark import speed
    from fsad_anomalib.benchmark.__main__ import main

    with pytest.raises(SystemExit):
        main(["--sets", "ELPV/mono", *argv, "--output", str(tmp_path / "out")])
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):
        speed.main(["--rounds", "0"])
    assert "argument --rounds: expected an integer >= 1, got '0'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--model-args", '{"score_mode": "bogus"}'], "score_mode must be one of"),
        (["--model-args", '{"nope": 1}'], "unexpected keyword argument 'nope'"),
        (["--set-model-args", 'ELPV/mono={"fine_tuning": {"steps": 0}}'], "steps must be an integer >= 1"),
        (["--model-args", '{"fine_tuning": {"synthesis": "perlin"}}'], "synthesis must be one of"),
        (["--model-args", '{"fine_tuning": 3}'], 'fine_tuning must be "auto", true, false or an object'),
    ],
)
def test_benchmark_checks_fewshotcontrastive_arguments_before_the_first_run(argv, expected, tmp_path, capsys):
    """They failed at the first FewShotContrastive run, after the stock runs before it, with a traceback."""
    from fsad_anomalib.benchmark.__main__ import main

    with pytest.raises(SystemExit):
        main(["--sets", "ELPV/mono", "--methods", "PatchCore", "frozen", *argv, "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert "FewShotContrastive on ELPV/mono (--model-args, --set-model-args, --backbone):" in err and expected in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("module", "argv", "expected"),
    [
        ("speed", ["--k", "0"], "argument --k: expected an integer >= 1"),
        ("speed", ["--image-size", "8"], "argument --image-size: expected an integer >= 32"),
        ("speed", ["--threads", "-2"], "argument --threads: expected an integer >= 0"),
    ],
)
def test_speed_numeric_options_are_checked(module, argv, expected, capsys):
    import importlib

    with pytest.raises(SystemExit):
        importlib.import_module(f"fsad_anomalib.benchmark.{module}").main(argv)
    assert expected in capsys.readouterr().err


def test_results_md_says_when_a_threshold_flags_nothing() -> None:
    """A threshold above every test image reads as such, not as a row of zeros that looks like a perfect line."""
    from fsad_anomalib.benchmark.report import threshold_table

    def row(seed: int, method: str, fr: float, det: float) -> dict:
        at = {"false_reject_rate": fr, "detection_rate": det}
        return {
            "dataset": "ELPV",
            "category": "mono",
            "k_shot": 2,
            "seed": seed,
            "method": method,
            "threshold": {"target_false_reject_rate": 0.05, "at": {"0.05": at}},
        }

    rows = [row(0, "A", 0.0, 0.0), row(1, "A", 0.0, 0.0), row(0, "B", 0.0, 0.0), row(1, "B", 0.04, 0.5)]
    lines = {line.split(" | ")[3]: line for line in threshold_table(rows)[2:]}
    assert "flags nothing (threshold above every test image)" in lines["A"] and "0.0 %" not in lines["A"]
    assert "(flags nothing in 1 of 2 runs)" in lines["B"] and "2.0 %" in lines["B"]
