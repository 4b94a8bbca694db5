"""``python -m fsad_anomalib.benchmark``: FewShotContrastive vs PatchCore and PaDiM on K-shot support sets.

Examples:
    python -m fsad_anomalib.benchmark --sets ELPV/mono ELPV/poly Textile/local --k 1 2 4 8 16 --seeds 0 1 2
    python -m fsad_anomalib.benchmark --sets ELPV/mono --k 4 --evaluation dev --methods frozen FewShotContrastive
    python -m fsad_anomalib.benchmark --data my_product.yaml --k 1 2 4 8 --methods FewShotContrastive PatchCore PaDiM
    python -m fsad_anomalib.benchmark --report-only --compare FewShotContrastive PatchCore --output benchmark_results
    python -m fsad_anomalib.benchmark --backbone resnet18 --method-config Dfm=configs/dfm_elpv.yaml --methods PatchCore
    python -m fsad_anomalib.benchmark --executor ray --ray-address auto --sets MVTecAD/bottle MVTecAD/cable
"""

from __future__ import annotations

import argparse
import logging
import sys
from functools import partial
from pathlib import Path
from typing import Any

from fsad_anomalib.benchmark.cli import parse_json_object, quiet_logs
from fsad_anomalib.benchmark.method_config import MethodConfig
from fsad_anomalib.benchmark.methods import (
    FSC_VARIANTS,
    METHODS,
    build_method,
    few_shot_contrastive_args,
    methods_on,
    stock_layers,
)
from fsad_anomalib.benchmark.options import build_parser
from fsad_anomalib.benchmark.report import failed_table, paired_table, write_plots, write_table
from fsad_anomalib.benchmark.runner import load_runs, merge_runs, run_benchmark, run_key
from fsad_anomalib.benchmark.sets import DataConfig, builtin_datamodule


def _sets_and_data(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[list[str], list[DataConfig]]:
    """Every set's label and the ``--data`` configs, checked: a wrong name, file or K stops the command now."""
    if args.sets is None:
        args.sets = [] if args.data else ["ELPV/mono", "ELPV/poly", "Textile/local"]
    if args.data and args.evaluation != "test":
        parser.error(
            f"--evaluation {args.evaluation} applies to the offline --sets; a --data datamodule is scored on "
            "its own test set (ELPV and Textile take 'evaluation: dev' in their init_args)."
        )
    for label in [] if args.report_only else args.sets:  # --report-only: labels only filter the runs
        try:
            builtin_datamodule(label, args)
        except ValueError as exc:  # noqa: PERF203 - the first bad set ends the command, by name
            parser.error(f"--sets {label}: {exc}" if not str(exc).startswith("--") else str(exc))
    data_configs = []
    for path in args.data:
        try:
            data_configs.append(DataConfig(path))
        except ValueError as exc:
            parser.error(str(exc))
        if max(args.k) > data_configs[-1].pool:
            parser.error(
                f"--data {path}: --k {max(args.k)} needs {max(args.k)} normal training images, and the "
                f"datamodule's training split holds {data_configs[-1].pool}."
            )
    labels = [*args.sets, *(config.label for config in data_configs)]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        parser.error(
            f"--sets/--data: the set {', '.join(repeated)} is given more than once (a --data set is named "
            "<class>/<category or name>)."
        )
    for config in data_configs:
        for note in config.notes:
            print(f"--data {config.path} ({config.label}): {note}.", flush=True)
    return labels, data_configs


def _check_model_args(
    parser: argparse.ArgumentParser, args: argparse.Namespace, labels: list[str], set_args: dict[str, dict]
) -> None:
    """Build FewShotContrastive once per set, so that a wrong argument stops the command before the first run."""
    fsc_methods = [method for method in args.methods if method in FSC_VARIANTS]
    checked: list[dict] = []  # sets without --set-model-args share one check
    for label in labels if fsc_methods else []:
        model_args = {**args.model_args, **set_args.get(label, {})}
        if model_args in checked:
            continue
        checked.append(model_args)
        try:  # the arguments as given (fine-tuning included, whichever variants run), then each variant's
            build_method("FewShotContrastive", args.backbone, args.image_size, model_args, pre_trained=args.pretrained)
            for method in fsc_methods:
                few_shot_contrastive_args(method, model_args)
        except (TypeError, ValueError, RuntimeError) as exc:
            parser.error(f"FewShotContrastive on {label} (--model-args, --set-model-args, --backbone): {exc}")
    stock = [method for method in args.methods if method.removesuffix("+fine-tuning") in {"PatchCore", "PaDiM"}]
    for label in labels if stock else []:
        try:  # PatchCore and PaDiM read FewShotContrastive's feature depths of this backbone
            stock_layers(args.backbone, {**args.model_args, **set_args.get(label, {})}.get("layers"))
        except ValueError as exc:  # noqa: PERF203 - the first bad set ends the command, by name
            parser.error(f"{', '.join(stock)} on {label} (--backbone, the layers of --model-args): {exc}")


def _method_configs(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, MethodConfig]:
    """Every ``--method-config NAME=FILE``, read and built once: a bad file stops the command before any run."""
    configs: dict[str, MethodConfig] = {}
    for item in args.method_config:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            parser.error(f"--method-config '{item}': expected NAME=FILE, e.g. Dfm=configs/dfm_elpv.yaml.")
        if name in METHODS or name in configs:
            parser.error(
                f"--method-config '{item}': the name {name} is taken (built-in methods: "
                f"{', '.join(METHODS)}); "
                "choose another."
            )
        try:
            configs[name] = MethodConfig(name, path)
        except ValueError as exc:
            parser.error(str(exc))
        for note in configs[name].notes:
            print(f"--method-config {item}: {note}.", flush=True)
    return configs


def _checked(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple:
    """Every option checked before any run: the sets' labels, ``--data`` configs, method configs, per-set args."""
    if args.ray_address and args.executor != "ray":
        parser.error("--ray-address joins a Ray cluster: give --executor ray as well.")
    if args.grow and not args.confirm:
        parser.error("--grow grows each model by the --confirm N pool normals: give --confirm N as well.")
    method_configs = {} if args.report_only else _method_configs(parser, args)
    names = [item.partition("=")[0] for item in args.method_config]
    unknown = [method for method in args.methods or [] if method not in METHODS and method not in names]
    if unknown:
        parser.error(
            f"--methods: unknown {', '.join(unknown)} (built-in: {', '.join(METHODS)}; or a --method-config NAME)."
        )
    methods, skipped = methods_on(args.backbone, list(dict.fromkeys([*(args.methods or METHODS), *names])))
    if skipped and args.methods is not None:  # named: say why they do not run (the default list leaves them quietly)
        print(skipped, file=sys.stderr, flush=True)
    args.methods = methods
    if not args.methods:
        parser.error(f"--methods: none of them runs on --backbone {args.backbone}.")
    labels, data_configs = _sets_and_data(parser, args)
    logging.basicConfig(level=logging.ERROR)
    quiet_logs()
    for pair in args.compare:
        unknown = [name for name in pair if name not in args.methods]
        if unknown:
            parser.error(
                f"--compare {' '.join(pair)}: {', '.join(unknown)} is not among --methods ({' '.join(args.methods)})."
            )
        if pair[0] == pair[1]:
            parser.error(f"--compare {' '.join(pair)}: name two different methods.")
    set_args: dict[str, dict] = {}
    for item in args.set_model_args:
        label, sep, text = item.partition("=")
        if not sep or label not in labels:
            parser.error(f"--set-model-args '{item}': expected SET=JSON with SET one of the sets {labels}.")
        try:
            set_args[label] = parse_json_object(text, f"--set-model-args '{item}'")
        except ValueError as exc:
            parser.error(str(exc))
    if not args.report_only:
        _check_model_args(parser, args, labels, set_args)

    return labels, data_configs, method_configs, set_args


def _included(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[dict]:
    """The runs that did not fail in the --include-runs folders, read once."""
    for folder in args.include_runs:
        if not (Path(folder) / "runs.jsonl").exists():
            parser.error(f"--include-runs: {Path(folder) / 'runs.jsonl'} does not exist.")
    return [r for folder in args.include_runs for r in load_runs(folder) if "error" not in r]


def _rows(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    data_configs: list,
    method_configs: dict,
    set_args: dict,
    included: list[dict],
) -> list[dict]:
    """The runs: those already in --output (--report-only), or the benchmark's."""
    builders: dict[str, Any] = {label: partial(builtin_datamodule, label, args) for label in args.sets}
    builders.update({config.label: config for config in data_configs})
    if args.report_only:
        runs_file = Path(args.output) / "runs.jsonl"
        if runs_file.exists():
            return load_runs(args.output)
        if not args.include_runs:
            parser.error(f"--report-only: {runs_file} does not exist; run the benchmark first.")
        Path(args.output).mkdir(parents=True, exist_ok=True)  # a summary of other folders' runs
        return []
    return run_benchmark(
        builders,
        k_shots=args.k,
        seeds=args.seeds,
        methods=args.methods,
        output=args.output,
        backbone=args.backbone,
        image_size=args.image_size,
        fsc_args=args.model_args,
        set_fsc_args=set_args,
        time_inference=not args.no_timing,
        accelerator=args.accelerator,
        false_reject_rate=args.false_reject_rate,
        progress=lambda line: print(line, flush=True),
        pre_trained=args.pretrained,
        method_configs=method_configs,
        executor=args.executor,
        ray_address=args.ray_address,
        cpus_per_run=args.cpus_per_run,
        confirm=args.confirm,
        grow=args.grow,
        held_elsewhere={run_key(r) for r in included},
    )


def _report(args: argparse.Namespace, rows: list[dict], labels: list[str], included: list[dict]) -> str:
    """results.md (the table, where the runs come from, the paired comparisons, failed runs) and the plots."""
    wanted = {tuple(label.partition("/")[::2]) for label in labels}

    def requested(row: dict) -> bool:
        return (
            (row["dataset"], row["category"]) in wanted
            and row["k_shot"] in args.k
            and row["seed"] in args.seeds
            and row["method"] in args.methods
        )

    # --report-only tables the requested runs; a run tables all of --output, plus the requested included runs
    own = [r for r in rows if requested(r) or not args.report_only]
    failed = [r for r in own if "error" in r]
    own = [r for r in own if "error" not in r]
    failed = [r for r in failed if run_key(r) not in {run_key(row) for row in own}]  # not run again since
    rows = merge_runs(own, [r for r in included if requested(r)])
    table = write_table(rows, f"{args.output}/results.md", methods=args.methods)
    sections = []  # below the table: where the runs come from, then the paired comparisons
    if len(rows) > len(own):
        sections.append(
            f"\n{len(rows) - len(own)} of these {len(rows)} runs come from --include-runs "
            f"{' '.join(args.include_runs)} (runs {args.output} does not hold).\n"
        )
    sections += ["\n" + paired_table(rows, method, other) for method, other in args.compare]
    if failed:
        sections.append(failed_table(failed))
    if sections:
        with Path(f"{args.output}/results.md").open("a", encoding="utf-8") as handle:
            handle.write("".join(sections))
        table += "".join(sections)
    write_plots(rows, args.output)
    return table


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write runs.jsonl, results.md and PNG plots: parser, checks, run and report."""
    parser = build_parser(__doc__)
    args = parser.parse_args(argv)
    labels, data_configs, method_configs, set_args = _checked(parser, args)
    included = _included(parser, args)
    rows = _rows(parser, args, data_configs, method_configs, set_args, included)
    print(_report(args, rows, labels, included))
    return 0


if __name__ == "__main__":
    sys.exit(main())
