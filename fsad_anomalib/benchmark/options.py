"""The command line of ``python -m fsad_anomalib.benchmark``: its options, their defaults and help."""

from __future__ import annotations

import argparse

from fsad_anomalib.benchmark.cli import int_at_least, json_object, rate
from fsad_anomalib.benchmark.executors import EXECUTORS
from fsad_anomalib.benchmark.methods import METHODS
from fsad_anomalib.benchmark.sets import SETS_HELP

__all__ = ["build_parser"]


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """The options of ``python -m fsad_anomalib.benchmark`` (``description``: its usage text)."""
    parser = argparse.ArgumentParser(
        prog="python -m fsad_anomalib.benchmark",
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--sets",
        nargs="+",
        default=None,
        help=f"named sets: {SETS_HELP} (default: the three offline sets, unless --data is given)",
    )
    parser.add_argument(
        "--data",
        nargs="+",
        default=[],
        metavar="FILE",
        help="anomalib datamodule configs, each a set of its own: the 'data:' section of a file "
        "`anomalib train --config` reads (class_path and init_args; a FewShot wrapper is unwrapped, "
        "--k and --seeds draw the support sets), or class_path and init_args alone. Other sections "
        "are ignored: FewShotContrastive's arguments come from --model-args",
    )
    parser.add_argument("--k", nargs="+", type=int_at_least(1), default=[1, 2, 4, 8, 16])
    parser.add_argument("--seeds", nargs="+", type=int_at_least(0), default=[0, 1, 2])
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        metavar="METHOD",
        help=f"built-in methods ({', '.join(METHODS)}) and --method-config names (default: every "
        "built-in one that runs on --backbone, AnomalyDINO on DINOv2 ViTs only; each --method-config method runs "
        "whether listed or not)",
    )
    parser.add_argument(
        "--method-config",
        nargs="+",
        default=[],
        metavar="NAME=FILE",
        help="any anomalib model as a method named NAME: the 'model:' section of a file `anomalib "
        "train --config` reads (class_path and init_args), or those two keys alone; trained and "
        "tested on the same support sets, post-processing and metrics as the built-in methods",
    )
    parser.add_argument("--output", default="benchmark_results")
    parser.add_argument(
        "--backbone",
        default="offline:tf_efficientnet_lite0",
        help="any timm CNN (resnet18, wide_resnet50_2, ...) or offline:<arch>; PatchCore and PaDiM "
        "read the feature depths FewShotContrastive reads, by name through timm's feature_info",
    )
    parser.add_argument(
        "--no-pretrained",
        dest="pretrained",
        action="store_false",
        help="random backbone weights for every built-in method (no download: tests, smoke runs)",
    )
    parser.add_argument("--image-size", type=int_at_least(32), default=256)
    parser.add_argument(
        "--model-args", type=json_object, default="{}", help="JSON dict of FewShotContrastive arguments"
    )
    parser.add_argument(
        "--set-model-args",
        nargs="+",
        default=[],
        metavar="SET=JSON",
        help="FewShotContrastive arguments for one set only, over --model-args, "
        "e.g. 'Textile/local={\"layers\": [1, 2]}'",
    )
    parser.add_argument("--no-timing", action="store_true", help="skip inference timing per run")
    parser.add_argument(
        "--evaluation",
        choices=["test", "dev"],
        default="test",
        help="offline sets: score on the test set, on the development set (images the test set "
        "never uses) to choose settings",
    )
    parser.add_argument(
        "--false-reject-rate",
        type=rate,
        default=0.05,
        help="each method's OK/NG threshold is set from its K normals for this target share of good "
        "parts rejected; results.md tables the rates it gives on the test set (default 0.05)",
    )
    parser.add_argument(
        "--confirm",
        type=int_at_least(2),
        default=0,
        metavar="N",
        help="also confirm each run's threshold on N further normals of the training pool (neither "
        "support nor test images), as a line would on its first good parts; results.md tables both",
    )
    parser.add_argument(
        "--grow",
        action="store_true",
        help="with --confirm N: then grow each model by those N normals (python -m fsad_anomalib.confirm --grow) "
        "and test it again; results.md tables its AUROC and rates",
    )
    parser.add_argument("--eval-batch-size", type=int_at_least(1), default=32)
    parser.add_argument(
        "--accelerator",
        default="auto",
        help="Lightning accelerator of every run (auto, cpu, gpu, ...); one device per run",
    )
    parser.add_argument(
        "--executor",
        choices=EXECUTORS,
        default="serial",
        help="serial: one run after another, each in a process of its own; ray: every run a Ray "
        "task (one GPU each where the cluster has GPUs, else --cpus-per-run CPUs; needs the "
        "'distributed' extra)",
    )
    parser.add_argument(
        "--ray-address",
        default=None,
        help="--executor ray: the cluster to join ('auto' for the one `ray start` set up on this "
        "node, or host:port); without it a local cluster starts on this machine",
    )
    parser.add_argument(
        "--cpus-per-run",
        type=int_at_least(1),
        default=None,
        help="torch threads of each run, and the CPUs a Ray task asks for (default: torch's own "
        "thread count; on Ray, 1). Rows are the same on both executors for the same value",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="run nothing: write results.md and the plots from the runs already in --output (and "
        "--include-runs; with --include-runs, --output may hold no runs: a summary folder)",
    )
    parser.add_argument(
        "--include-runs",
        nargs="+",
        default=[],
        metavar="DIR",
        help="also put the runs of these earlier output folders in the table and plots, where --output "
        "has no run of the same set, K, seed and method (e.g. stock PatchCore/PaDiM rows, which no "
        "FewShotContrastive argument changes); those runs are not run again, and nothing is copied into "
        "--output's runs.jsonl",
    )
    parser.add_argument(
        "--compare",
        nargs=2,
        action="append",
        default=[],
        metavar=("METHOD", "OTHER"),
        help="also table METHOD against OTHER run by run on the same support sets (mean difference, "
        "in how many pairs METHOD is ahead, level or behind, and the p-value of a two-sided "
        "sign-flip test); may be given more than once",
    )
    parser.add_argument("--mvtec-root", default="./datasets/MVTecAD")
    parser.add_argument("--visa-root", default="./datasets/visa")
    return parser
