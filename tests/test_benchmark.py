"""The benchmark runs end to end on a tiny generated dataset, writes one row per run and resumes."""

from __future__ import annotations

import json

from fsad_anomalib.benchmark.report import write_plots, write_table
from fsad_anomalib.benchmark.runner import run_benchmark

from .conftest import folder_datamodule


def test_benchmark_end_to_end_and_resume(generated_root, tmp_path):
    out = tmp_path / "bench"
    sets = {"generated/toy": lambda: folder_datamodule(generated_root)}
    methods = ["FewShotContrastive", "frozen", "PatchCore", "PaDiM"]
    args = {"fine_tune_steps": 2, "n_views": 2}
    rows = run_benchmark(sets, k_shots=[1, 2], seeds=[0], methods=methods, output=out, image_size=64,
                         fsc_args=args, progress=lambda _: None)  # fmt: skip
    assert len(rows) == 2 * len(methods)
    lines = (out / "runs.jsonl").read_text().splitlines()
    assert len(lines) == 2 * len(methods)
    row = json.loads(lines[0])
    for key in ("image_AUROC", "pixel_AUROC", "train_s", "ms_b1", "ms_b32", "peak_rss_mb", "support_set"):
        assert key in row
    assert len(row["support_set"]) == row["k_shot"]
    assert json.loads((out / "backbone_floor.json").read_text())["ms_b1"] > 0
    # resuming runs nothing new
    again = run_benchmark(sets, k_shots=[1, 2], seeds=[0], methods=methods, output=out, image_size=64,
                          fsc_args=args, progress=lambda _: None)  # fmt: skip
    assert len(again) == len(rows)
    assert len((out / "runs.jsonl").read_text().splitlines()) == len(lines)
    table = write_table(again, out / "results.md", methods=methods)
    assert "PatchCore" in table and "K=2" in table
    plots = write_plots(again, out)
    assert all(p.exists() and p.stat().st_size > 0 for p in plots)
