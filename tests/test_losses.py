"""Losses against values computed by hand, and the direction of their gradients."""

import math

import pytest
import torch
import torch.nn.functional as F  # noqa: N812 - the name torch itself uses

from fsad_anomalib.fine_tuning.loss import (
    CrossInstancePositiveLoss,
    FewShotContrastiveLoss,
    NTXentLoss,
    SynthesizedNegativeLoss,
)


def unit(*rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float64), dim=-1)


def test_ntxent_matches_hand_computation():
    tau = 0.5
    z1 = unit([1.0, 0.0], [0.0, 1.0])
    z2 = unit([1.0, 0.0], [0.0, 1.0])
    # anchor z1[0]: positive z2[0] (cos 1), negatives z1[1], z2[1] (cos 0)
    per_anchor = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + 2 * math.exp(0)))
    # all four anchors are symmetric
    assert NTXentLoss(tau)(z1, z2).item() == pytest.approx(per_anchor, rel=1e-9)


def test_ntxent_asymmetric_case():
    tau = 1.0
    z1 = unit([1.0, 0.0], [1.0, 1.0])
    z2 = unit([0.0, 1.0], [1.0, 0.0])
    z = torch.cat([z1, z2])
    sims = (z @ z.T).numpy()
    pos = {0: 2, 1: 3, 2: 0, 3: 1}
    expected = 0.0
    for i in range(4):
        denom = sum(math.exp(sims[i, k] / tau) for k in range(4) if k != i)
        expected += -math.log(math.exp(sims[i, pos[i]] / tau) / denom)
    assert NTXentLoss(tau)(z1, z2).item() == pytest.approx(expected / 4, rel=1e-9)


def test_ntxent_is_zero_without_negatives_and_rejects_bad_temperature():
    z = unit([1.0, 0.0])
    assert NTXentLoss()(z, z).item() == 0.0
    with pytest.raises(ValueError, match="temperature"):
        NTXentLoss(0.0)


def test_ntxent_gradient_pulls_views_together():
    z1 = unit([1.0, 0.0], [0.0, 1.0]).requires_grad_(requires_grad=True)
    z2 = unit([0.6, 0.8], [0.8, -0.6])
    NTXentLoss(0.5)(z1, z2).backward()
    # descending the gradient moves z1[0] towards its positive z2[0]
    assert (-z1.grad[0] @ z2[0]).item() > 0


def test_cross_instance_positive_by_hand():
    z = unit([1.0, 0.0], [0.0, 1.0], [1.0, 0.0])
    ids = torch.tensor([0, 1, 0])
    # pairs of different images: (0,1), (1,0), (1,2), (2,1): squared distance 2 each
    assert CrossInstancePositiveLoss()(z, ids).item() == pytest.approx(2.0)
    assert CrossInstancePositiveLoss()(z, torch.zeros(3, dtype=torch.long)).item() == 0.0


def test_cross_instance_gradient_pulls_instances_together():
    z = unit([1.0, 0.0], [0.0, 1.0]).requires_grad_(requires_grad=True)
    CrossInstancePositiveLoss()(z, torch.tensor([0, 1])).backward()
    assert (-z.grad[0] @ z[1].detach()).item() > 0


def test_synthesized_negative_by_hand():
    tau = 1.0
    z1 = unit([1.0, 0.0])
    z2 = unit([1.0, 0.0])
    a = unit([0.0, 1.0], [-1.0, 0.0])
    expected = -math.log(math.exp(1) / (math.exp(1) + math.exp(0) + math.exp(-1)))
    assert SynthesizedNegativeLoss(tau)(z1, z2, a).item() == pytest.approx(expected, rel=1e-9)
    assert SynthesizedNegativeLoss(tau)(z1, z2, a[:0]).item() == 0.0


def test_synthesized_negative_gradient_pushes_anomalies_away():
    z1 = unit([1.0, 0.0])
    z2 = unit([0.9, 0.1])
    a = unit([0.8, 0.6]).requires_grad_(requires_grad=True)
    SynthesizedNegativeLoss(0.5)(z1, z2, a).backward()
    assert (-a.grad[0] @ z1[0]).item() < 0  # a step moves the anomaly away from the normal


def test_total_loss_combines_terms():
    torch.manual_seed(0)
    z1, z2, a = (F.normalize(torch.randn(3, 4), dim=-1) for _ in range(3))
    loss = FewShotContrastiveLoss(0.2, lambda_pp=0.3, lambda_np=0.7)
    total, parts = loss(z1, z2, a)
    expected = parts["loss_con"] + 0.3 * parts["loss_pp"] + 0.7 * parts["loss_np"]
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert parts["loss_np"].item() > 0
    off, parts_off = FewShotContrastiveLoss(0.2, lambda_pp=0.0, lambda_np=0.0)(z1, z2, a)
    assert off.item() == pytest.approx(parts_off["loss_con"].item())
    with pytest.raises(ValueError, match="lambda"):
        FewShotContrastiveLoss(lambda_pp=-1)


def test_dense_negative_by_hand_and_gradient():
    from fsad_anomalib.fine_tuning.loss import DenseSynthesizedNegativeLoss

    tau = 1.0
    # one image, 1x2 feature map: location 0 unchanged, location 1 inside the defect mask
    normal = unit([1.0, 0.0], [0.0, 1.0]).T.reshape(1, 2, 1, 2)
    anomalous = unit([1.0, 0.0], [-1.0, 0.0]).T.reshape(1, 2, 1, 2).clone().requires_grad_(requires_grad=True)
    mask = torch.tensor([[[[0.0, 1.0]]]])
    loss = DenseSynthesizedNegativeLoss(tau)(normal, anomalous, mask)
    # anchor u_0 = (1, 0): positive u'_0 = (1, 0) (cos 1), negative u'_1 = (-1, 0) (cos -1)
    expected = -math.log(math.exp(1) / (math.exp(1) + math.exp(-1)))
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    loss.backward()
    grad_negative = anomalous.grad[0, :, 0, 1]
    assert (-grad_negative @ normal[0, :, 0, 0]).item() < 0  # the defect patch is pushed away
    empty = DenseSynthesizedNegativeLoss()(normal, anomalous.detach(), torch.zeros_like(mask))
    assert empty.item() == 0.0
