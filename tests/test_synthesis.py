"""Anomaly synthesis: masks cover exactly the pixels that changed."""

import pytest
import torch

from fsad_anomalib.fine_tuning import SYNTHESIS_MODES, AnomalySynthesizer


@pytest.mark.parametrize("mode", ["cutpaste", "speck"])
def test_mask_matches_changed_pixels(mode):
    torch.manual_seed(0)
    images = torch.rand(6, 3, 96, 96)
    out, masks = AnomalySynthesizer(mode)(images)
    assert out.shape == images.shape
    assert masks.shape == (6, 1, 96, 96)
    changed = (out - images).abs().amax(1, keepdim=True) > 1e-6
    assert not (changed & (masks == 0)).any(), "pixels changed outside the mask"
    assert torch.all(masks.flatten(1).sum(1) > 0), "every image gets an anomaly"
    # on a random texture nearly every masked pixel really changes
    assert changed.float().sum() / masks.sum() > 0.95
    assert out.min() >= 0 and out.max() <= 1


def test_none_mode_and_errors():
    images = torch.rand(2, 3, 32, 32)
    out, masks = AnomalySynthesizer("none")(images)
    assert torch.equal(out, images) and masks.sum() == 0
    with pytest.raises(ValueError, match="synthesis must be one of"):
        AnomalySynthesizer("scribble")
    with pytest.raises(ValueError, match="expects images"):
        AnomalySynthesizer("cutpaste")(torch.rand(3, 32, 32))
    assert SYNTHESIS_MODES == ("cutpaste", "speck", "none")


def test_synthesis_is_seeded():
    images = torch.rand(2, 3, 64, 64)
    for mode in ("cutpaste", "speck"):
        torch.manual_seed(3)
        a, _ = AnomalySynthesizer(mode)(images)
        torch.manual_seed(3)
        b, _ = AnomalySynthesizer(mode)(images)
        assert torch.equal(a, b)
        c, _ = AnomalySynthesizer(mode)(images)
        assert not torch.equal(a, c)
