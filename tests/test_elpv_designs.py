"""The ELPV cell-design analysis: busbar detection on generated cells, and the split of benchmark runs."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from fsad_anomalib.benchmark import elpv_designs
from fsad_anomalib.benchmark.elpv_designs import NO_BUSBAR_BELOW, busbar_contrast, main, support_split
from fsad_anomalib.data.offline import elpv_paths


def _cell(path: Path, busbars: bool, seed: int = 0) -> Path:
    """A 300x300 grey cell with noise and soft horizontal bands; with ``busbars``, three dark 4-pixel lines."""
    rng = np.random.default_rng(seed)
    rows = np.arange(300)[:, None]
    image = 170 + 15 * np.sin(rows / 300 * 6 * np.pi) + rng.normal(0, 6, (300, 300))
    if busbars:
        for y in (75, 150, 225):
            image[y : y + 4] -= 90
    cv2.imwrite(str(path), np.clip(image, 0, 255).astype(np.uint8))
    return path


def test_busbar_contrast_separates_the_designs(tmp_path: Path) -> None:
    with_bars = [busbar_contrast(_cell(tmp_path / f"b{i}.png", True, i)) for i in range(3)]
    without = [busbar_contrast(_cell(tmp_path / f"n{i}.png", False, i)) for i in range(3)]
    assert min(with_bars) > 3 * NO_BUSBAR_BELOW
    assert max(without) < NO_BUSBAR_BELOW / 2


def test_real_cells_fall_on_both_sides() -> None:
    """ELPV mono holds both designs (all 588 normals), poly only cells with busbars (its first 40 normals, sorted)."""
    mono = [busbar_contrast(p) for p in sorted(elpv_paths("mono")[0])]
    poly = [busbar_contrast(p) for p in sorted(elpv_paths("poly")[0])[:40]]
    assert sum(c < NO_BUSBAR_BELOW for c in mono) == 59  # of 588: the analysis in the model README
    assert min(poly) > NO_BUSBAR_BELOW


def test_bad_images_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.png"):
        busbar_contrast(tmp_path / "missing.png")
    cv2.imwrite(str(tmp_path / "tiny.png"), np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match="tiny.png"):
        busbar_contrast(tmp_path / "tiny.png")


def _row(k: int, seed: int, method: str, support: list[str], auroc: float) -> dict:
    return {"dataset": "ELPV", "category": "mono", "k_shot": k, "seed": seed, "method": method, "evaluation": "test",
            "support_set": support, "image_AUROC": auroc}


def test_support_split_groups_runs_by_design(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    normals = sorted(elpv_paths("mono")[0])
    bar_less = next(p for p in normals if not elpv_designs.has_busbars(p))
    with_bars = [p for p in normals[:10] if elpv_designs.has_busbars(p)][:3]
    moved = "/elsewhere/images/" + Path(bar_less).name  # recorded on another machine: found by its name
    rows = [
        _row(4, 0, "frozen", [*with_bars, moved], 0.93),
        _row(4, 1, "frozen", [*with_bars, with_bars[0]], 0.90),
        _row(4, 2, "frozen", with_bars + [with_bars[1]], 0.88),
        {**_row(4, 3, "frozen", with_bars, 0.5), "evaluation": "dev"},  # not a test-set run: left out
    ]
    split = support_split(rows)
    assert split == {(4, "frozen"): {"with": [0.93], "without": [0.90, 0.88]}}
    with pytest.raises(ValueError, match="not-a-cell.png"):
        support_split([_row(4, 0, "frozen", ["/x/not-a-cell.png"], 0.9)])

    folder = tmp_path / "runs"
    folder.mkdir()
    (folder / "runs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert main(["--runs", str(folder), "--methods", "frozen"]) == 0
    out = capsys.readouterr().out
    assert "| test normal | 14 | 150 |" in out
    assert "| 4 | frozen | 0.930 (n=1) | 0.890 (n=2) |" in out
    with pytest.raises(SystemExit):
        main(["--runs", str(tmp_path / "nowhere")])


def test_score_prints_each_design(capsys: pytest.CaptureFixture) -> None:
    """--score fits a frozen model on a development support set and scores both designs (K = 1, one view: fast)."""
    args = '{"fine_tune": false, "score_mode": "knn", "n_views": 1}'
    assert main(["--score", "1", "0", "--model-args", args]) == 0
    out = capsys.readouterr().out
    figures = dict(line.strip("|").split("|")[:2] for line in out.splitlines() if line.startswith("| median") or
                   line.startswith("| AUROC"))
    values = {name.strip(): float(value) for name, value in figures.items()}
    assert len(values) == 5
    assert all(np.isfinite(v) for v in values.values())
    assert values["median, defective"] > values["median, normals with busbars"]
    assert 0.5 < values["AUROC"] <= 1.0


@pytest.mark.parametrize(
    "argv",
    [
        ["--score", "0", "1"],
        ["--model-args", "{not json"],
        ["--model-args", "[1]"],
        ["--model-args", '{"score_mode": "nearest"}', "--score", "1", "0"],
        ["--model-args", '{"no_such_argument": 1}', "--score", "1", "0"],
        ["--methods", "PatchKore"],
    ],
)
def test_bad_arguments_are_named(argv: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(argv)
    assert argv[0] in capsys.readouterr().err


def test_default_scorings_are_the_elpv_configs() -> None:
    """The scorings written out for --score and for the speed benchmark are those of the shipped ELPV configs."""
    import yaml

    from fsad_anomalib.benchmark.speed import DEFAULT_VARIANTS

    configs = Path(__file__).parents[1] / "configs"
    mono = yaml.safe_load((configs / "few_shot_contrastive_elpv.yaml").read_text())["model"]["init_args"]
    poly = yaml.safe_load((configs / "few_shot_contrastive_elpv_poly.yaml").read_text())["model"]["init_args"]
    scoring = {key: value for key, value in elpv_designs.MONO_CONFIG_SCORING.items() if key != "fine_tune"}
    assert scoring == {key: mono[key] for key in scoring}
    assert elpv_designs.MONO_CONFIG_SCORING["fine_tune"] is False  # the frozen ablation
    assert scoring in DEFAULT_VARIANTS
    assert {"score_mode": poly["score_mode"]} in DEFAULT_VARIANTS
