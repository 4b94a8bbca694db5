"""Anomaly synthesis for L_NP: CutPaste and specks, each with its mask.

Images are float tensors in [0, 1], shape ``(B, C, H, W)``; every generator returns the altered
images and a mask ``(B, 1, H, W)`` that is 1 exactly where pixels may have changed. Randomness comes
from torch's global generator (seeded by ``lightning.seed_everything`` or the fine-tuning ``seed``), so
runs repeat.

* ``cutpaste`` (Li et al., "CutPaste: Self-Supervised Learning for Anomaly Detection and Localization",
  CVPR 2021): a rectangle (2-15 % of the image, aspect 0.3-3.3) is copied from another place of the same
  image, brightness/contrast jittered, and pasted.
* ``speck``: one to three small ellipses (radius 2-8 px at 256 px) filled with grey pixel noise of the image's
  own mean and 1-2 times its standard deviation, blended by 50-100 %: small local flaws in a fine texture.
* ``none``: no synthesized anomaly (L_NP off).
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["SYNTHESIS_MODES", "AnomalySynthesizer", "cutpaste", "speck"]

SYNTHESIS_MODES = ("cutpaste", "speck", "none")


def _uniform(low: float, high: float) -> float:
    return float(torch.empty(1).uniform_(low, high).item())


def _paste(images: torch.Tensor, sizes: list[tuple[float, float]], jitter: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste a rectangle of content copied from elsewhere in each image, with its mask."""
    b, _, h, w = images.shape
    device = images.device
    ys = torch.arange(h, device=device, dtype=images.dtype).view(h, 1)
    xs = torch.arange(w, device=device, dtype=images.dtype).view(1, w)
    out = images.clone()
    masks = torch.zeros(b, 1, h, w, device=device, dtype=images.dtype)
    for i in range(b):
        box_w, box_h = sizes[i]
        ext_x, ext_y = 0.5 * box_w, 0.5 * box_h  # half extents, to keep the box inside the image
        cx = _uniform(ext_x, max(ext_x, w - 1 - ext_x))
        cy = _uniform(ext_y, max(ext_y, h - 1 - ext_y))
        mask = (((xs - cx).abs() <= box_w / 2) & ((ys - cy).abs() <= box_h / 2)).to(images.dtype)
        if mask.sum() == 0:
            mask[round(cy), round(cx)] = 1.0
        # content from another place: shift by at least the box size in one direction
        dy = int(torch.randint(int(ext_y) + 1, max(int(ext_y) + 2, h - int(ext_y)), (1,)).item())
        dx = int(torch.randint(int(ext_x) + 1, max(int(ext_x) + 2, w - int(ext_x)), (1,)).item())
        source = torch.roll(images[i], shifts=(dy, dx), dims=(-2, -1))
        gain = _uniform(1 - jitter, 1 + jitter)
        offset = _uniform(-jitter / 2, jitter / 2)
        mean = source.mean()
        source = ((source - mean) * gain + mean + offset).clamp(0.0, 1.0)
        out[i] = images[i] * (1 - mask) + source * mask
        masks[i, 0] = mask
    return out, masks


def cutpaste(
    images: torch.Tensor, area_ratio: tuple[float, float] = (0.02, 0.15), aspect_ratio: float = 0.3, jitter: float = 0.3
) -> tuple[torch.Tensor, torch.Tensor]:
    """CutPaste: copy a rectangle of the image elsewhere, jittered. Returns images and masks."""
    _check(images)
    b, _, h, w = images.shape
    sizes = []
    for _ in range(b):
        area = _uniform(*area_ratio) * h * w
        log_ar = _uniform(math.log(aspect_ratio), math.log(1 / aspect_ratio))
        ar = math.exp(log_ar)
        sizes.append((min(w - 2, math.sqrt(area * ar)), min(h - 2, math.sqrt(area / ar))))
    return _paste(images, sizes, jitter)


def speck(
    images: torch.Tensor,
    radius: tuple[float, float] = (2.0, 8.0),
    noise: tuple[float, float] = (1.0, 2.0),
    blend: tuple[float, float] = (0.5, 1.0),
    max_specks: int = 3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Small noisy ellipses: pixel noise with the image's mean and a multiple of its standard deviation.

    Args:
        images: ``(B, C, H, W)`` in [0, 1].
        radius: Range of each semi-axis in pixels at 256 px (scaled with the image's shorter side).
        noise: Range of the noise's standard deviation, as a multiple of the image's.
        blend: Range of the weight of the noise against the original pixels.
        max_specks: At most this many ellipses per image.
    """
    _check(images)
    b, c, h, w = images.shape
    scale = min(h, w) / 256.0
    device, dtype = images.device, images.dtype
    ys = torch.arange(h, device=device, dtype=dtype).view(h, 1)
    xs = torch.arange(w, device=device, dtype=dtype).view(1, w)
    out = images.clone()
    masks = torch.zeros(b, 1, h, w, device=device, dtype=dtype)
    for i in range(b):
        mask = torch.zeros(h, w, device=device, dtype=torch.bool)
        for _ in range(int(torch.randint(1, max_specks + 1, (1,)).item())):
            rx, ry = (max(1.0, _uniform(*radius) * scale) for _ in range(2))
            cx, cy = _uniform(rx, w - 1 - rx), _uniform(ry, h - 1 - ry)
            mask |= ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1.0
        mean, std = images[i].mean(), images[i].std().clamp_min(0.05)
        noise_map = torch.randn(1, h, w, device=device, dtype=dtype).expand(c, h, w)  # grey noise
        texture = (mean + _uniform(*noise) * std * noise_map).clamp(0.0, 1.0)
        weight = _uniform(*blend) * mask.to(dtype)
        out[i] = images[i] * (1 - weight) + texture * weight
        masks[i, 0] = mask.to(dtype)
    return out, masks


def _check(images: torch.Tensor) -> None:
    if images.ndim != 4 or images.shape[1] not in {1, 3}:
        msg = f"Anomaly synthesis expects images of shape (B, 1|3, H, W), got {tuple(images.shape)}."
        raise ValueError(msg)
    min_side = 8
    if min(images.shape[-2:]) < min_side:
        msg = (
            f"Anomaly synthesis needs images of at least {min_side}x{min_side} pixels, got {tuple(images.shape[-2:])}."
        )
        raise ValueError(msg)


class AnomalySynthesizer(nn.Module):
    """Synthesize anomalous versions of a batch of normal images.

    Args:
        mode (str): One of ``SYNTHESIS_MODES``: ``cutpaste``, ``speck`` or ``none``. Defaults to ``"cutpaste"``.

    Example:
        >>> import torch
        >>> images, masks = AnomalySynthesizer("speck")(torch.rand(2, 3, 64, 64))
        >>> images.shape, masks.shape
        (torch.Size([2, 3, 64, 64]), torch.Size([2, 1, 64, 64]))
    """

    def __init__(self, mode: str = "cutpaste") -> None:
        super().__init__()
        if mode not in SYNTHESIS_MODES:
            msg = f"synthesis must be one of {SYNTHESIS_MODES}, got '{mode}'."
            raise ValueError(msg)
        self.mode = mode

    @property
    def enabled(self) -> bool:
        """Whether anomalies are produced at all."""
        return self.mode != "none"

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return anomalous images and their masks."""
        if self.mode == "none":
            return images, torch.zeros_like(images[:, :1])
        return {"cutpaste": cutpaste, "speck": speck}[self.mode](images)
