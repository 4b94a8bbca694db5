"""Every shipped config loads and trains, with its own split settings; the plugin hook is lazy.

The README's command sequence (train, test, predict, confirm, export by short name) runs in test_readme_workflow.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))

# Generated data stands in for datasets that are not on this machine; offline sets get a small test split.
GENERATED = [
    "--data.datamodule.class_path=Folder",
    "--data.datamodule.init_args.name=generated",
    "--data.datamodule.init_args.root={root}",
    "--data.datamodule.init_args.normal_dir=train/good",
    "--data.datamodule.init_args.abnormal_dir=test/bad",
    "--data.datamodule.init_args.normal_test_dir=test/good",
    "--data.datamodule.init_args.mask_dir=mask/bad",
]
SMALL_OFFLINE = ["--data.datamodule.init_args.n_test_normal=6", "--data.datamodule.init_args.n_test_abnormal=6"]


def _overrides(config: Path, root: Path, workdir: Path) -> list[str]:
    text = config.read_text(encoding="utf-8")
    args = ["--default_root_dir", str(workdir), "--trainer.enable_progress_bar=false"]
    if "trainer:\n  callbacks:" in text:
        args += ["--trainer.callbacks.init_args.steps=2"]
    if "class_path: FewShotContrastive" in text:
        args += [
            "--model.init_args.image_size=64",
            "--model.init_args.fine_tuning.init_args.steps=2",
            "--model.init_args.n_views=2",
        ]
    else:
        from fsad_anomalib.backbones import offline_backbone

        args += [f"--model.init_args.backbone={offline_backbone()}"]
    if "class_path: ELPV" in text or "class_path: Textile" in text:
        args += SMALL_OFFLINE
    else:
        args += [a.format(root=root) for a in GENERATED]
    return args


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_config_loads_and_runs(config, generated_root, tmp_path):
    from anomalib.cli import AnomalibCLI

    cli = AnomalibCLI(["train", "--config", str(config), *_overrides(config, generated_root, tmp_path)], run=False)
    cli.engine.train(model=cli.model, datamodule=cli.datamodule)
    metrics = cli.engine.trainer.callback_metrics
    assert "image_AUROC" in metrics
    assert len(cli.datamodule.train_data) == cli.datamodule.k_shot


def test_plugin_hook_is_lazy_and_optional():
    """Unrelated processes do not import anomalib or torch; the hook can be switched off (three processes at once)."""
    plain = "import sys; print('torch' in sys.modules, 'anomalib' in sys.modules, 'fsad_anomalib' in sys.modules)"
    hooked = "import anomalib.models, sys; print('fsad_anomalib.models' in sys.modules)"
    runs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
        for code, env in ((plain, None), (hooked, None), (hooked, {**os.environ, "FSAD_ANOMALIB_NO_PLUGIN": "1"}))
    ]
    outs = [run.communicate(timeout=300)[0].split() for run in runs]
    assert all(run.returncode == 0 for run in runs)
    assert outs[0] == ["False", "False", "False"]  # the .pth line imports nothing until anomalib.models is imported
    assert outs[1][-1] == "True"
    assert outs[2][-1] == "False"


# what each package may load besides itself: layers import one way (data below fine-tuning below models)
FORBIDDEN = {
    "data": ("fsad_anomalib.fine_tuning", "fsad_anomalib.backbones", "fsad_anomalib.models"),
    "backbones": ("fsad_anomalib.fine_tuning", "fsad_anomalib.models"),
    "fine_tuning": ("fsad_anomalib.models",),
    "callbacks": ("fsad_anomalib.models",),
    "post_processing": ("fsad_anomalib.models", "fsad_anomalib.fine_tuning"),
    "models": ("fsad_anomalib.benchmark",),
    "benchmark.runner": (),
}


def test_each_package_imports_first_and_layers_point_one_way() -> None:
    """Any public package can be a program's first import, and loads no package above it (one process each)."""
    code = "import sys, fsad_anomalib.{}; print(sorted(m for m in sys.modules if m.startswith('fsad_anomalib.')))"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "FSAD_ANOMALIB_NO_PLUGIN": "1"}  # the hook would import models
    runs = {
        package: subprocess.Popen(  # side by side: most of each is the import of torch and anomalib
            [sys.executable, "-c", code.format(package)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for package in FORBIDDEN
    }
    for package, run in runs.items():
        out, err = run.communicate(timeout=300)
        assert run.returncode == 0, err[-2000:]
        loaded = ast.literal_eval(out.strip().split("\n")[-1])
        assert not [m for m in loaded if m.startswith(FORBIDDEN[package])], (package, loaded)
