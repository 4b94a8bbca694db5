"""features_until: the scored layers' outputs, without running the backbone past the deepest of them."""

from __future__ import annotations

import pytest
import torch
from anomalib.models.components import TimmFeatureExtractor

from fsad_anomalib.backbones import resolve_backbone
from fsad_anomalib.models.components.feature_extractor import features_until
from fsad_anomalib.models.components.held_out import local_map, topk_mean
from fsad_anomalib.models.few_shot_contrastive.torch_model import FewShotContrastiveModel


def _count_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize(
    ("backbone", "layers", "skipped"),
    [
        ("offline:tf_efficientnet_lite0", [2, 3, 4], "blocks.6"),  # EfficientNetFeatures: timm runs every block
        ("offline:tf_efficientnet_lite0", ["blocks.2", "blocks.4", "blocks.6"], "blocks.5"),
        ("resnet18", ["layer2", "layer3", "layer4"], "layer4"),  # FeatureListNet
    ],
)
def test_same_features_without_the_deeper_blocks(backbone: str, layers: list, skipped: str) -> None:
    extractor = TimmFeatureExtractor(
        resolve_backbone(backbone), layers=layers, pre_trained=False, requires_grad=True
    ).eval()
    images = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        full = extractor(images)
        calls = _count_calls(extractor.feature_extractor.get_submodule(skipped))
        part = features_until(extractor, images, layers[:2])
    assert calls[0] == 0, f"{skipped} ran although the deepest requested layer is {layers[1]}"
    assert list(part) == layers[:2]
    for layer in layers[:2]:
        torch.testing.assert_close(part[layer], full[layer], rtol=0, atol=0)
    with torch.no_grad():  # a shallower subset alone, out of order
        only = features_until(extractor, images, [layers[1], layers[0]])
    torch.testing.assert_close(only[layers[0]], full[layers[0]], rtol=0, atol=0)


def test_unknown_layer_is_named() -> None:
    extractor = TimmFeatureExtractor(
        resolve_backbone("offline:tf_efficientnet_lite0"), layers=[2, 3], pre_trained=False
    )
    with pytest.raises(ValueError, match=r"layers \[4\] are not among"):
        features_until(extractor, torch.rand(1, 3, 64, 64), [4])


@pytest.mark.parametrize("score_mode", ["patch", "knn", "knn_patch"])
def test_patch_scoring_stops_before_the_global_layer(score_mode: str) -> None:
    """Scores and maps equal those from the full feature pass, and the global layer's blocks never run."""
    torch.manual_seed(0)
    model = FewShotContrastiveModel(pre_trained=False, score_mode=score_mode, coreset_ratio=0.5)
    model.fit(torch.rand(3, 3, 64, 64))
    model.eval()
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        patch, _ = model.features(images)  # the full pass, global layer included
        expected_map = local_map(patch, score_mode, model.patch_mean, model.patch_precision, model.memory_bank)
        calls = _count_calls(model.feature_extractor.feature_extractor.blocks[-1])
        out = model(images)
    assert calls[0] == 0
    expected = (topk_mean(expected_map, model.topk_ratio) - model.score_shift[1]) / model.score_scale[1]  # standardised
    torch.testing.assert_close(out.pred_score, expected, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(out.anomaly_map).all()


def test_layers_out_of_depth_order_label_their_own_features() -> None:
    """Timm returns features shallow to deep; a global layer shallower than a patch layer must not swap them."""
    model = FewShotContrastiveModel(pre_trained=False, layers=(2, 4), global_layer=3)
    patch, emb = model.features(torch.rand(1, 3, 64, 64))
    # Lite0: out index 2 = blocks.2 (40 channels), 3 = blocks.4 (112), 4 = blocks.6 (320)
    assert (model.patch_dim, model.global_dim) == (40 + 320, 112)
    assert (patch.shape[1], emb.shape[1]) == (40 + 320, 112)
    with torch.no_grad():
        assert model.scored_patch_features(torch.rand(1, 3, 64, 64))[0].shape[1] == 40 + 320
