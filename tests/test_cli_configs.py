"""Every shipped config loads and trains, with its own split settings; the plugin hook is lazy.

The README's command sequence (train, test, predict, confirm, export by short name) runs in test_readme_workflow.
"""

from __future__ import annotations

import ast
import graphlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import make_dataset

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
# stock models (PatchCore, PaDiM, DFM) at 64 px as FewShotContrastive (their own resizing otherwise: 256 px)
SMALL_STOCK = [
    "--model.init_args.pre_processor.class_path=anomalib.pre_processing.PreProcessor",
    "--model.init_args.pre_processor.init_args.transform.class_path=torchvision.transforms.v2.Resize",
    "--model.init_args.pre_processor.init_args.transform.init_args.size=[64, 64]",
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

        args += [f"--model.init_args.backbone={offline_backbone()}", *SMALL_STOCK]
    if "class_path: ELPV" in text or "class_path: Textile" in text:
        args += SMALL_OFFLINE
    else:
        args += [a.format(root=root) for a in GENERATED]
    return args


@pytest.fixture(scope="module")
def small_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Generated data for the configs of data sets not on this machine: 5 normals to train on (the folder config
    takes every one), 4 good and 4 bad to test.
    """
    return make_dataset(tmp_path_factory.mktemp("small"), n_train=5, n_test=4)


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_config_loads_and_runs(config, small_root, tmp_path):
    from anomalib.cli import AnomalibCLI

    cli = AnomalibCLI(["train", "--config", str(config), *_overrides(config, small_root, tmp_path)], run=False)
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


# what each package may import besides itself: layers point one way (data below fine-tuning below models)
FORBIDDEN = {
    "data": ("fsad_anomalib.fine_tuning", "fsad_anomalib.backbones", "fsad_anomalib.models"),
    "backbones": ("fsad_anomalib.fine_tuning", "fsad_anomalib.models"),
    "fine_tuning": ("fsad_anomalib.models",),
    "callbacks": ("fsad_anomalib.models",),
    "post_processing": ("fsad_anomalib.models", "fsad_anomalib.fine_tuning"),
    "models": ("fsad_anomalib.benchmark",),
}
PACKAGE = Path(__file__).parents[1] / "fsad_anomalib"
LAZY = {"fsad_anomalib._plugin"}  # the plugin hook imports on first use, on purpose


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _ancestors(name: str) -> set[str]:
    """The packages that loading ``name`` loads first: ``a`` and ``a.b`` for ``a.b.c``."""
    return {name.rsplit(".", n)[0] for n in range(1, name.count(".") + 1)}


def _imports(path: Path, modules: set[str]) -> tuple[set[str], set[str]]:
    """The package's modules that ``path`` imports when it loads, and those it imports inside functions."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    at_load, in_functions = set(), set()

    def visit(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return  # never runs
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for written in targets:
            target = written
            while target and target not in modules:  # `a.b.c` loads `a.b.c` or the package that defines `c`
                target = target.rpartition(".")[0]
            if target.startswith("fsad_anomalib") and target != name:
                (in_functions if in_function else at_load).add(target)
        inside = in_function or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        for child in ast.iter_child_nodes(node):
            visit(child, inside)

    visit(ast.parse(path.read_text(encoding="utf-8")), in_function=False)
    return at_load, in_functions


def test_layers_point_one_way_with_no_cycle_and_no_hidden_import() -> None:
    """The package's import graph, read from its source: no cycle, no import inside a function (which could hide one)
    but the plugin hook's, and no package loads one above it, directly or through others.
    """
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files)
    graph, hidden = {}, {}
    for name, path in files.items():
        at_load, in_functions = _imports(path, modules)
        own = _ancestors(name) | {name}  # a module's own packages are loading already when it loads
        graph[name] = {m for target in at_load for m in _ancestors(target) | {target}} - own
        if in_functions and name not in LAZY:
            hidden[name] = in_functions
    assert not hidden, hidden
    assert "fsad_anomalib.data" in graph and "fsad_anomalib.data.few_shot" in graph["fsad_anomalib.data"]  # reads it
    order = list(graphlib.TopologicalSorter(graph).static_order())  # raises CycleError on a cycle
    assert set(order) >= modules

    def reach(name: str) -> set[str]:
        seen, todo = set(), [name]
        while todo:
            for target in graph.get(todo.pop(), ()):
                if target not in seen:
                    seen.add(target)
                    todo.append(target)
        return seen

    for package, forbidden in FORBIDDEN.items():
        prefix = f"fsad_anomalib.{package}"
        for name in (m for m in modules if m == prefix or m.startswith(f"{prefix}.")):
            assert not [m for m in reach(name) if m.startswith(forbidden)], (name, sorted(reach(name)))
