"""``python -m fsad_anomalib.benchmark.elpv_designs``: the two cell designs among ELPV mono normals, and their effect.

About one ELPV mono normal cell in ten shows no busbar lines in its electroluminescence image: only the solder
pads at the cell's edges, and soft horizontal bands. Almost no defective cell has this design. When a K-shot
support set holds none of these cells, every method's memory bank or Gaussian lacks their patches. They then
score like defects and pull the image AUROC down. This command shows it in up to three tables:

* how many cells of each design the pool, test set and development set hold (from the images themselves:
  :func:`busbar_contrast`);
* image AUROC of the benchmark runs in ``--runs`` folders, split by whether the support set held a cell
  without busbars;
* with ``--score K SEED``: a model (``--model-args``, default the ELPV mono config's scoring, fine-tuning off) fitted on
  a K-shot support set of the development split, and the median score of each group of development images, with
  the AUROC with and without the busbar-less normals.

Example::

    python -m fsad_anomalib.benchmark.elpv_designs --runs fsad_anomalib/benchmark/offline_results/knn_views_mono \
        fsad_anomalib/benchmark/offline_results/knn_mono
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from fsad_anomalib.benchmark.cli import json_object
from fsad_anomalib.benchmark.methods import METHODS

if TYPE_CHECKING:
    from anomalib.models.components import AnomalibModule

__all__ = ["NO_BUSBAR_BELOW", "busbar_contrast", "design_counts", "has_busbars", "score_groups", "support_split"]

# Threshold on :func:`busbar_contrast`. ELPV mono cells fall in two separate groups: 71 cells below 0.05 (59 normal, 1
# defective, 11 of defect probability 1/3 or 2/3), none between 0.05 and 0.1, the rest above (8th percentile 0.18). No
# poly normal cell lies below 0.1.
NO_BUSBAR_BELOW = 0.1
# the scoring of configs/few_shot_contrastive_elpv.yaml, with fine-tuning off (the frozen ablation)
MONO_CONFIG_SCORING = {"fine_tune": False, "score_mode": "knn", "n_views": 4, "rot90": False}


def busbar_contrast(path: str | Path, margin: float = 0.13, window: int = 15) -> float:
    """Depth of the darkest horizontal line of a cell image, relative to its mean brightness.

    The mean of each row of the cell's inner part (``margin`` of the side cut off all round) is compared with
    its running median over ``window`` rows. A busbar, a dark line across the whole cell, makes a deep narrow dip
    in that profile. Cells with busbar lines score about 0.15 to 0.6; cells without, about 0.01.
    """
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if image is None:
        msg = f"busbar_contrast: cannot read '{path}' as an image."
        raise FileNotFoundError(msg)
    height, width = image.shape
    cut_h, cut_w = int(height * margin), int(width * margin)
    inner = image[cut_h : height - cut_h, cut_w : width - cut_w].astype(np.float64)
    if inner.shape[0] < window:
        msg = f"busbar_contrast: '{path}' is {height}x{width} pixels; its inner part needs at least {window} rows."
        raise ValueError(msg)
    profile = inner.mean(axis=1)
    padded = np.pad(profile, window // 2, mode="edge")
    median = np.median(np.lib.stride_tricks.sliding_window_view(padded, window), axis=1)
    return float((median - profile).max() / (profile.mean() + 1.0))


@functools.lru_cache(maxsize=None)
def has_busbars(path: str | Path) -> bool:
    """Whether the cell image shows busbar lines (:func:`busbar_contrast` at least :data:`NO_BUSBAR_BELOW`).

    Cached: the tables ask about the same cells again (pool and support sets, test and development splits).
    """
    return busbar_contrast(path) >= NO_BUSBAR_BELOW


def design_counts(category: str = "mono", evaluation: str = "test") -> dict[str, tuple[int, int]]:
    """``{part: (cells without busbars, cells)}`` for the pool, test normals and test anomalies of an ELPV split."""
    from fsad_anomalib.data.offline import elpv_samples  # noqa: PLC0415

    samples = elpv_samples(category, evaluation=evaluation)
    parts = {
        "pool (normal)": samples[samples.split == "train"],
        f"{evaluation} normal": samples[(samples.split == "test") & (samples.label_index == 0)],
        f"{evaluation} abnormal": samples[(samples.split == "test") & (samples.label_index == 1)],
    }
    return {name: (sum(not has_busbars(p) for p in part.image_path), len(part)) for name, part in parts.items()}


def support_split(rows: Iterable[dict[str, Any]], category: str = "mono") -> dict[tuple, dict[str, list[float]]]:
    """Image AUROCs of ELPV ``category`` runs per (K, method), split by support sets with / without a busbar-less cell."""
    from fsad_anomalib.data.offline import elpv_paths  # noqa: PLC0415

    # runs record absolute paths, which differ between machines: find each image by its name in this installation
    installed = {Path(p).name: p for p in elpv_paths(category)[0]}
    out: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: {"with": [], "without": []})
    for row in rows:
        if row["dataset"] != "ELPV" or row["category"] != category or row.get("evaluation", "test") != "test":
            continue
        names = [Path(p).name for p in row["support_set"]]
        for name in names:
            if name not in installed:
                msg = f"support set of run K={row['k_shot']} seed={row['seed']} {row['method']}: {name} is not an ELPV " \
                      f"{category} normal cell of the installed elpv-dataset."
                raise ValueError(msg)
        side = "with" if any(not has_busbars(installed[n]) for n in names) else "without"
        out[(row["k_shot"], row["method"])][side].append(row["image_AUROC"])
    return dict(out)


def score_groups(k_shot: int, seed: int, model: AnomalibModule, category: str = "mono") -> dict[str, Any]:
    """Fit ``model`` on a K-shot development support set; median scores per design and AUROCs."""
    import torch  # noqa: PLC0415
    from anomalib.engine import Engine  # noqa: PLC0415
    from lightning.pytorch import seed_everything  # noqa: PLC0415
    # scikit-learn comes with anomalib; torchmetrics' AUROC would pass these distances through a sigmoid (ties)
    from sklearn.metrics import roc_auc_score  # noqa: PLC0415

    from fsad_anomalib.data import ELPV, FewShot  # noqa: PLC0415

    seed_everything(seed, verbose=False)
    few_shot = FewShot(ELPV(category, evaluation="dev", val_split_mode="none"), k_shot=k_shot, seed=seed)
    engine = Engine(logger=False, enable_progress_bar=False, enable_model_summary=False, devices=1,
                    default_root_dir=Path("results") / "elpv_designs")
    engine.fit(model=model, datamodule=few_shot)
    scores, labels, designs = [], [], []
    model.model.eval()
    with torch.no_grad():
        for batch in few_shot.test_dataloader():
            scores += model.model(batch.image.to(model.device)).pred_score.flatten().tolist()
            labels += batch.gt_label.int().tolist()
            designs += [has_busbars(p) for p in batch.image_path]
    scores_a, labels_a, bars = np.array(scores), np.array(labels), np.array(designs)
    keep = bars | (labels_a == 1)

    def median(values: np.ndarray) -> float:  # no busbar-less cell in a split (poly): NaN, without numpy's warning
        return float(np.median(values)) if values.size else float("nan")

    return {
        "support without busbars": sum(not has_busbars(p) for p in few_shot.support_set),
        "median, normals without busbars": median(scores_a[(labels_a == 0) & ~bars]),
        "median, normals with busbars": median(scores_a[(labels_a == 0) & bars]),
        "median, defective": median(scores_a[labels_a == 1]),
        "AUROC": float(roc_auc_score(labels_a, scores_a)),
        "AUROC without the busbar-less normals": float(roc_auc_score(labels_a[keep], scores_a[keep])),
    }


def _mean(values: list[float]) -> str:
    return f"{statistics.fmean(values):.3f} (n={len(values)})" if values else "-"


def main(argv: list[str] | None = None) -> int:
    """Print the tables as markdown."""
    parser = argparse.ArgumentParser(prog="python -m fsad_anomalib.benchmark.elpv_designs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--category", choices=["mono", "poly"], default="mono")
    parser.add_argument("--runs", nargs="*", default=[], metavar="DIR",
                        help="benchmark output folders; where several hold the same run (K, seed, method), the first "
                        "wins, as with the benchmark's --include-runs")
    parser.add_argument("--methods", nargs="+", default=["frozen", "FewShotContrastive", "PatchCore", "PaDiM"],
                        choices=METHODS)
    parser.add_argument("--score", nargs=2, type=int, metavar=("K", "SEED"),
                        help="also fit a model on a K-shot development support set and print its scores per design")
    parser.add_argument("--model-args", type=json_object, default=json.dumps(MONO_CONFIG_SCORING),
                        help="JSON dict of FewShotContrastive arguments for --score (default: %(default)s)")
    args = parser.parse_args(argv)
    model_args = args.model_args
    if args.score and (args.score[0] < 1 or args.score[1] < 0):
        parser.error(f"--score K SEED: K must be >= 1 and SEED >= 0, got {args.score}.")
    from fsad_anomalib.benchmark.runner import load_runs, merge_runs  # noqa: PLC0415

    for folder in args.runs:
        if not (Path(folder) / "runs.jsonl").exists():
            parser.error(f"--runs: {Path(folder) / 'runs.jsonl'} does not exist.")
    print(f"ELPV {args.category}: cells without busbar lines\n")
    print("| part | without busbars | cells |\n|---|---|---|")
    for evaluation in ("test", "dev"):
        for name, (count, total) in design_counts(args.category, evaluation).items():
            if evaluation == "dev" and name.startswith("pool"):
                continue
            print(f"| {name} | {count} | {total} |")
    if args.score:
        k_shot, seed = args.score
        print(f"\nDevelopment set, {model_args}, K = {k_shot}, seed {seed}\n")
        print("| figure | value |\n|---|---|")
        from fsad_anomalib.models import FewShotContrastive  # noqa: PLC0415

        try:  # built before any data is read, so bad arguments fail first
            model = FewShotContrastive(**model_args)
        except (TypeError, ValueError) as exc:
            parser.error(f"--model-args {json.dumps(model_args)}: {exc}")
        for name, value in score_groups(k_shot, seed, model, args.category).items():
            print(f"| {name} | {value:.4f} |" if isinstance(value, float) else f"| {name} | {value} |")
    if not args.runs:
        return 0
    rows = merge_runs([], *(load_runs(folder) for folder in args.runs))
    split = support_split(rows, args.category)
    print("\nImage AUROC by support set: with at least one cell without busbars, or none (mean, number of runs)\n")
    print("| K | method | support with one | support without |\n|---|---|---|---|")
    for (k_shot, method), sides in sorted(split.items(), key=lambda item: (item[0][0], args.methods.index(item[0][1])
                                                                            if item[0][1] in args.methods else 99)):
        if method in args.methods:
            print(f"| {k_shot} | {method} | {_mean(sides['with'])} | {_mean(sides['without'])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
