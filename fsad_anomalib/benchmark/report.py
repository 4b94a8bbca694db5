"""Tables and plots from ``runs.jsonl``."""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

__all__ = [
    "failed_table",
    "paired_table",
    "sign_flip_p",
    "summarise",
    "threshold_table",
    "write_plots",
    "write_table",
    "write_time_plot",
]


def _has_value(value: float | None) -> bool:
    """Whether a run's metric is a number (not missing, not NaN): the runs tables and comparisons count."""
    return value is not None and not math.isnan(value)


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if _has_value(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


METRICS = {"auroc": "image_AUROC", "pixel_auroc": "pixel_AUROC"}  # summary entry -> run field


def summarise(rows: list[dict[str, Any]]) -> dict[tuple, dict[str, Any]]:
    """Mean and standard deviation over seeds of each metric.

    Per (dataset, category, K, method), and ``<metric>_nan_runs``: how many runs
    lack its value (missing or NaN).
    """
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[row["dataset"], row["category"], row["k_shot"], row["method"]].append(row)
    out = {}
    for key, group in groups.items():
        out[key] = {
            "n": len(group),
            **{entry: _mean_std([r.get(field) for r in group]) for entry, field in METRICS.items()},
            **{
                f"{entry}_nan_runs": sum(not _has_value(r.get(field)) for r in group)
                for entry, field in METRICS.items()
            },
            "train_s": _mean_std([r["train_s"] for r in group]),
            "ms_b1": _mean_std([r.get("ms_b1", float("nan")) for r in group]),
        }
    return out


def _metric_table(summary: dict[tuple, dict[str, Any]], methods: list[str], entry: str) -> list[str]:
    sets = sorted({(k[0], k[1]) for k in summary})
    ks = sorted({k[2] for k in summary})
    lines = ["| set | method | " + " | ".join(f"K={k}" for k in ks) + " |", "|---|---|" + "---|" * len(ks)]
    for dataset, category in sets:
        for method in methods:
            cells = []
            for k in ks:
                values = summary.get((dataset, category, k, method))
                if values is None:
                    cells.append("")
                    continue
                mean, std = values[entry]
                nan_runs = values[f"{entry}_nan_runs"]
                if nan_runs:
                    cells.append(f"NaN in {nan_runs}/{values['n']}" + ("" if math.isnan(mean) else f" ({mean:.3f})"))
                else:
                    cells.append(f"{mean:.3f} +- {std:.3f}")
            if any(cells):
                lines.append(f"| {dataset} {category} | {method} | " + " | ".join(cells) + " |")
    return lines


def threshold_table(rows: list[dict[str, Any]], methods: list[str] | None = None) -> list[str]:
    """Markdown rows of the OK/NG decision per set, K and method.

    The normal-only threshold's false-reject rate on the test normals and detection rate
    on the test anomalies (means over seeds), beside the same rates at anomalib's oracle F1 threshold, learned on the
    test set itself. Runs without a threshold record (older runs.jsonl lines) are left out. Runs made with
    ``--confirm N`` add a row "METHOD, confirmed on N": the same runs, their threshold confirmed on N further normals.
    """
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if isinstance(row.get("threshold"), dict):
            record = row["threshold"]
            targets = record.get("at") or {f"{record['target_false_reject_rate']:g}": record}
            for target, at in targets.items():
                groups[row["dataset"], row["category"], row["k_shot"], float(target), row["method"]].append({
                    **record,
                    "false_reject_rate": at["false_reject_rate"],
                    "detection_rate": at["detection_rate"],
                })
            # the same run, its threshold confirmed on N normals; then the model grown by them (new test scores)
            for kind, label in (("confirmed", "confirmed on"), ("grown", "grown by")):
                later = row.get(kind)
                if isinstance(later, dict) and "at" in later:
                    name = f"{row['method']}, {label} {later['n']}"
                    for target, at in later["at"].items():
                        groups[row["dataset"], row["category"], row["k_shot"], float(target), name].append({
                            **record,
                            "false_reject_rate": at["false_reject_rate"],
                            "detection_rate": at["detection_rate"],
                        })
    if not groups:
        return []
    names = methods or sorted({key[4] for key in groups})
    order = {name: index for index, name in enumerate(names)}
    for key in groups:  # the confirmed and grown rows right after their method's
        base = key[4].partition(", ")[0]
        if key[4] != base and key[4] not in order:
            order[key[4]] = order.get(base, len(names)) + (0.5 if ", confirmed on " in key[4] else 0.75)
    lines = [
        "| set | K | target | method | runs | false rejects | detected | oracle F1: false rejects | detected |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key in sorted(groups, key=lambda key: (key[0], key[1], key[2], key[3], order.get(key[4], len(order)), key[4])):
        dataset, category, k, target, method = key
        group = groups[key]
        cells = []
        for field in ("false_reject_rate", "detection_rate", "oracle_false_reject_rate", "oracle_detection_rate"):
            values = [r[field] for r in group if _has_value(r.get(field))]
            missing = len(group) - len(values)
            cell = f"{100 * statistics.fmean(values):.1f} %" if values else "-"
            cells.append(cell + (f" ({missing} without)" if missing and values else ""))
        silent = sum(1 for r in group if r["false_reject_rate"] == 0 and r["detection_rate"] == 0)
        if silent == len(group):  # a row of zeros would read as a perfect line: say what it is
            cells[:2] = ["flags nothing (threshold above every test image)", "none detected"]
        elif silent:
            cells[1] += f" (flags nothing in {silent} of {len(group)} runs)"
        lines.append(
            f"| {dataset} {category} | {k} | {100 * target:g} % | {method} | {len(group)} | " + " | ".join(cells) + " |"
        )
    return lines


def write_table(rows: list[dict[str, Any]], path: str | Path, methods: list[str] | None = None) -> str:
    """Markdown table: one row per set and method, one column per K, mean +- std image AUROC.

    Where runs have a pixel AUROC (datamodules with masks), a second table gives it for those sets; a run that
    gave non-finite anomaly maps counts as "NaN in", as for image scores.
    """
    summary = summarise(rows)
    methods = methods or sorted({k[3] for k in summary})
    lines = _metric_table(summary, methods, "auroc")
    sizes = defaultdict(set)  # what each set's runs were scored on (older runs.jsonl lines do not say)
    for row in rows:
        if "test_normal" in row:
            size = f"{row['test_normal']} normal + {row['test_anomalous']} anomalous"
            sizes[f"{row['dataset']} {row['category']}"].add(size)
    if sizes:
        sets = "; ".join(f"{name}: {' or '.join(sorted(size))}" for name, size in sorted(sizes.items()))
        lines += ["", f"Test images: {sets}."]
    with_masks = {(r["dataset"], r["category"]) for r in rows if r.get("pixel_AUROC") is not None}  # None: no masks
    if with_masks:
        pixel = {key: value for key, value in summary.items() if (key[0], key[1]) in with_masks}
        lines += ["", "Pixel AUROC (anomaly maps against the ground-truth masks), mean +- std over seeds:", ""]
        lines += _metric_table(pixel, methods, "pixel_auroc")
    thresholds = threshold_table(rows, methods)
    if thresholds:
        lines += [
            "",
            (
                "OK/NG decision at the threshold each method sets from its K normals (target false-reject "
                "rate), "
                "and at anomalib's F1-optimal threshold learned on the test set (an oracle no user has); rates "
                "on the test normals and anomalies, means over seeds:"
            ),
            "",
            *thresholds,
        ]
    grown = growth_table(rows)
    if grown:
        title = "Image AUROC before and after growing each model by the same N pool normals (--grow):"
        lines += ["", title, "", *grown]
    text = "\n".join(lines) + "\n"
    Path(path).write_text(text, encoding="utf-8")
    return text


def growth_table(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown rows: per set, K, method and N, the mean image AUROC of the K-image model and of the grown one."""
    groups: dict[tuple, list[tuple[float, float]]] = defaultdict(list)
    for row in rows:
        grown = row.get("grown")
        if isinstance(grown, dict) and _has_value(grown.get("image_AUROC")) and _has_value(row.get("image_AUROC")):
            key = (row["dataset"], row["category"], row["k_shot"], row["method"], grown["n"])
            groups[key].append((row["image_AUROC"], grown["image_AUROC"]))
    if not groups:
        return []
    lines = ["| set | K | method | N | runs | K images | grown | grown - K images |", "|---" * 8 + "|"]
    for (dataset, category, k, method, n), pairs in sorted(groups.items()):
        before, after = (sum(pair[i] for pair in pairs) / len(pairs) for i in (0, 1))
        lines.append(
            f"| {dataset} {category} | {k} | {method} | {n} | {len(pairs)} | {before:.3f} | {after:.3f} | "
            f"{after - before:+.3f} |"
        )
    return lines


EXACT_SIGN_FLIP_PAIRS = 20


def sign_flip_p(differences: list[float], draws: int = 2**20, seed: int = 0) -> float:
    """Two-sided p-value of a paired sign-flip (permutation) test that the mean difference is 0.

    ``scipy.stats.permutation_test`` with one sample (each difference's sign flipped) on ``|mean|``: the share of
    the ``2**n`` sign patterns at least as far from 0 as the observed one. Exact up to ``EXACT_SIGN_FLIP_PAIRS``
    pairs; beyond, ``draws`` random patterns from a fixed ``seed`` (the same table every time), counted as ``(hits +
    1) / (draws + 1)``. No distribution is assumed; with ``n`` pairs it cannot be below ``2 / 2**n``.
    """
    values = np.asarray(differences, dtype=np.float64)
    if values.size == 0:
        return float("nan")
    if not np.all(np.isfinite(values)):
        msg = f"sign_flip_p: differences must be finite numbers, got {list(differences)}."
        raise ValueError(msg)
    if values.size == 1:  # both signs of one pair are as far from 0: scipy needs two observations
        return 1.0
    exact = values.size <= EXACT_SIGN_FLIP_PAIRS
    result = stats.permutation_test(
        (values,),
        lambda x, axis: np.abs(np.mean(x, axis=axis)),
        permutation_type="samples",
        vectorized=True,
        n_resamples=2**values.size if exact else draws,
        alternative="greater",
        batch=2**16,
        random_state=np.random.default_rng(seed),
    )
    return float(result.pvalue)


def _format_p(p: float) -> str:
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def paired_table(rows: list[dict[str, Any]], method: str, other: str) -> str:
    """Markdown: ``method`` against ``other`` on the same support sets, per set and K, and over all K of a set.

    Runs pair up when they share set, K and seed (so the same support set) and both have a finite image AUROC. Per
    row: the number of pairs, the mean of ``method`` minus ``other``, in how many pairs ``method`` is ahead, level
    (equal AUROC) or behind, and the p-value of a two-sided sign-flip test of the mean difference
    (:func:`sign_flip_p`).
    """
    runs: dict[tuple, dict[str, float]] = defaultdict(dict)
    for row in rows:
        if row["method"] in {method, other}:
            value = row["image_AUROC"]
            if _has_value(value):
                runs[row["dataset"], row["category"], row["k_shot"], row["seed"]][row["method"]] = value
    diffs: dict[tuple, list[float]] = defaultdict(list)
    for (dataset, category, k, _), pair in sorted(runs.items()):
        if len(pair) == 2:
            diffs[dataset, category, k].append(pair[method] - pair[other])
    title = f"{method} against {other}, paired by support set (set, K, seed)"
    if not diffs:
        return f"{title}: no set, K and seed has a finite image AUROC from both.\n"
    lines = [
        f"{title}:",
        "",
        f"| set | K | pairs | mean {method} - {other} | {method} ahead | level | {other} ahead | p (sign-flip) |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def line(label: str, k: str, values: list[float]) -> str:
        ahead, level = sum(d > 0 for d in values), sum(d == 0 for d in values)
        return (
            f"| {label} | {k} | {len(values)} | {statistics.fmean(values):+.3f} | {ahead} | {level} | "
            f"{len(values) - ahead - level} | {_format_p(sign_flip_p(values))} |"
        )

    for dataset, category in sorted({key[:2] for key in diffs}):
        ks = sorted(k for (d, c, k) in diffs if (d, c) == (dataset, category))
        lines.extend(line(f"{dataset} {category}", str(k), diffs[dataset, category, k]) for k in ks)
        if len(ks) > 1:
            lines.append(line(f"{dataset} {category}", "all", [d for k in ks for d in diffs[dataset, category, k]]))
    lines += [
        "",
        (
            f"p: two-sided sign-flip test that the mean difference is 0 (exact up to {EXACT_SIGN_FLIP_PAIRS} "
            "pairs, no distribution assumed); with n pairs it cannot be below 2 / 2^n, 0.25 for three."
        ),
    ]
    return "\n".join(lines) + "\n"


def failed_table(failed: list[dict[str, Any]]) -> str:
    """Markdown: the runs that failed, with their errors (the same command runs them again)."""
    lines = [
        f"\n{len(failed)} runs failed (run the same command again to retry them):\n",
        "| set | K | seed | method | error |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['dataset']} {r['category']} | {r['k_shot']} | {r['seed']} | {r['method']} | "
        f"{' '.join(r['error'].split())[:200].replace('|', '/')} |"
        for r in failed
    ]
    return "\n".join(lines) + "\n"


def write_plots(rows: list[dict[str, Any]], folder: str | Path) -> list[Path]:
    """PNG plots: image AUROC against K per set (std bands) and inference ms per image per method."""
    import matplotlib as mpl  # lazily: matplotlib is only in the test extra

    mpl.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    summary = summarise(rows)
    written = []
    for dataset, category in sorted({(k[0], k[1]) for k in summary}):
        fig, ax = plt.subplots(figsize=(6, 4))
        for method in sorted({k[3] for k in summary}):
            ks = sorted(k[2] for k in summary if k[:2] == (dataset, category) and k[3] == method)
            means = [summary[dataset, category, k, method]["auroc"][0] for k in ks]
            stds = [summary[dataset, category, k, method]["auroc"][1] for k in ks]
            ax.plot(ks, means, marker="o", label=method)
            ax.fill_between(
                ks,
                [m - s for m, s in zip(means, stds, strict=True)],
                [m + s for m, s in zip(means, stds, strict=True)],
                alpha=0.15,
            )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("K (normal training images)")
        ax.set_ylabel("image AUROC")
        ax.set_title(f"{dataset} {category}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = folder / f"auroc_{dataset}_{category}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    timed = [r for r in rows if "ms_b1" in r]
    if timed:
        by_method: dict[str, list[float]] = defaultdict(list)
        for row in timed:
            by_method[row["method"]].append(row["ms_b1"])
        floor = folder / "backbone_floor.json"
        written.append(
            write_time_plot(
                {name: statistics.median(values) for name, values in sorted(by_method.items())},
                folder / "inference_ms.png",
                floor=json.loads(floor.read_text())["ms_b1"] if floor.exists() else None,
                ylabel="ms per image, batch 1 (median)",
            )
        )
    return written


def write_time_plot(
    ms: dict[str, float], path: str | Path, floor: float | None = None, ylabel: str = "ms per image"
) -> Path:
    """Bar plot of milliseconds per image per method, with the bare backbone's time as a dashed line."""
    import matplotlib as mpl  # lazily: matplotlib is only in the test extra

    mpl.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(list(ms), list(ms.values()))
    if floor is not None:
        ax.axhline(floor, color="k", ls="--", label="bare backbone")
        ax.legend()
    ax.set_ylabel(ylabel)
    ax.tick_params(axis="x", rotation=35, labelsize=7)
    for label in ax.get_xticklabels():
        label.set_horizontalalignment("right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
