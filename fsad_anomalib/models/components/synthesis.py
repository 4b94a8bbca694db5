"""Anomaly synthesis for L_NP: CutPaste, CutPaste-scar and Perlin-noise blending, each with its mask.

Images are float tensors in [0, 1], shape ``(B, C, H, W)``; every generator returns the altered
images and a mask ``(B, 1, H, W)`` that is 1 exactly where pixels may have changed. Randomness comes
from torch's global generator (seeded by ``lightning.seed_everything``), so runs repeat.

* ``cutpaste`` (Li et al., CVPR 2021): a rectangle (2-15 % of the image, aspect 0.3-3.3) is copied
  from another place of the same image, brightness/contrast jittered, and pasted.
* ``cutpaste_scar``: a thin rectangle (2-16 px wide, 10-25 px long at 256 px, scaled with the image),
  rotated by up to 45 degrees, jittered and pasted.
* ``perlin``: anomalib's :class:`~anomalib.data.utils.generators.PerlinAnomalyGenerator` (DRAEM-style
  Perlin-noise masks blended with an augmented texture), reused as it is.
* ``crack``: one to three thin dark curves (a random walk of straight segments, 1-3 px wide at 256 px, 20-100 %
  of the image side long, darkened by 20-70 %), the look of cracks and finger interruptions in
  electroluminescence images of solar cells: prior knowledge of the defects, as the paper's L_NP asks for.
* ``speck``: one to three small ellipses (radius 2-8 px at 256 px) filled with grey pixel noise of the image's own
  mean and 1-2 times its standard deviation, blended by 50-100 %: small local flaws in a fine texture.
* ``mixed``: each image gets one of cutpaste, cutpaste_scar and perlin at random.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from anomalib.data.utils.generators import PerlinAnomalyGenerator

__all__ = ["SYNTHESIS_MODES", "AnomalySynthesizer", "crack", "cutpaste", "cutpaste_scar", "perlin", "speck"]

SYNTHESIS_MODES = ("cutpaste", "cutpaste_scar", "perlin", "crack", "speck", "mixed", "none")


def _uniform(low: float, high: float) -> float:
    return float(torch.empty(1).uniform_(low, high).item())


def _paste(
    images: torch.Tensor,
    sizes: list[tuple[float, float]],
    angles: list[float],
    jitter: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste a (rotated) rectangle of content copied from elsewhere in each image, with its mask."""
    b, _, h, w = images.shape
    device = images.device
    ys = torch.arange(h, device=device, dtype=images.dtype).view(h, 1)
    xs = torch.arange(w, device=device, dtype=images.dtype).view(1, w)
    out = images.clone()
    masks = torch.zeros(b, 1, h, w, device=device, dtype=images.dtype)
    for i in range(b):
        box_w, box_h = sizes[i]
        theta = math.radians(angles[i])
        # half extent of the rotated box, to keep it inside the image
        ext_x = 0.5 * (abs(box_w * math.cos(theta)) + abs(box_h * math.sin(theta)))
        ext_y = 0.5 * (abs(box_w * math.sin(theta)) + abs(box_h * math.cos(theta)))
        cx = _uniform(ext_x, max(ext_x, w - 1 - ext_x))
        cy = _uniform(ext_y, max(ext_y, h - 1 - ext_y))
        u = (xs - cx) * math.cos(theta) + (ys - cy) * math.sin(theta)
        v = -(xs - cx) * math.sin(theta) + (ys - cy) * math.cos(theta)
        mask = ((u.abs() <= box_w / 2) & (v.abs() <= box_h / 2)).to(images.dtype)
        if mask.sum() == 0:
            mask[int(round(cy)), int(round(cx))] = 1.0
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
    images: torch.Tensor,
    area_ratio: tuple[float, float] = (0.02, 0.15),
    aspect_ratio: float = 0.3,
    jitter: float = 0.3,
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
    return _paste(images, sizes, [0.0] * b, jitter)


def cutpaste_scar(
    images: torch.Tensor,
    width: tuple[float, float] = (2, 16),
    length: tuple[float, float] = (10, 25),
    rotation: float = 45.0,
    jitter: float = 0.3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CutPaste-scar: a thin rotated stripe copied from elsewhere, jittered. Sizes are for 256 px."""
    _check(images)
    b, _, h, w = images.shape
    scale = min(h, w) / 256.0
    sizes = [
        (max(1.0, _uniform(*width) * scale), max(2.0, _uniform(*length) * scale))
        for _ in range(b)
    ]
    angles = [_uniform(-rotation, rotation) for _ in range(b)]
    return _paste(images, sizes, angles, jitter)


def _segment_distance(
    xs: torch.Tensor, ys: torch.Tensor, start: tuple[float, float], end: tuple[float, float]
) -> torch.Tensor:
    """Distance of every pixel (grids ``xs`` ``(1, W)``, ``ys`` ``(H, 1)``) to the segment ``start``-``end``."""
    (x0, y0), (x1, y1) = start, end
    dx, dy = x1 - x0, y1 - y0
    t = (((xs - x0) * dx + (ys - y0) * dy) / max(dx * dx + dy * dy, 1e-6)).clamp(0.0, 1.0)
    return torch.hypot(xs - x0 - t * dx, ys - y0 - t * dy)


def crack(
    images: torch.Tensor,
    width: tuple[float, float] = (1.0, 3.0),
    length: tuple[float, float] = (0.2, 1.0),
    segments: tuple[int, int] = (1, 4),
    darkness: tuple[float, float] = (0.2, 0.7),
    max_branches: int = 3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Thin dark curves: each a random walk of straight segments, darkened with a soft 1-pixel edge.

    Args:
        images: ``(B, C, H, W)`` in [0, 1].
        width: Width range of a curve in pixels at 256 px (scaled with the image's shorter side).
        length: Length range of a curve as a fraction of the shorter side.
        segments: Range of the number of straight segments per curve (each turns by up to 23 degrees).
        darkness: Range of the fraction by which pixels on the curve are darkened.
        max_branches: At most this many curves per image; the later ones branch off the first.
    """
    _check(images)
    b, _, h, w = images.shape
    side = min(h, w)
    device, dtype = images.device, images.dtype
    ys = torch.arange(h, device=device, dtype=dtype).view(h, 1)
    xs = torch.arange(w, device=device, dtype=dtype).view(1, w)
    out = images.clone()
    masks = torch.zeros(b, 1, h, w, device=device, dtype=dtype)
    for i in range(b):
        distance = torch.full((h, w), float("inf"), device=device, dtype=dtype)
        point = (_uniform(0.1 * w, 0.9 * w), _uniform(0.1 * h, 0.9 * h))
        vertices = [point]
        for _ in range(int(torch.randint(1, max_branches + 1, (1,)).item())):
            point = vertices[int(torch.randint(0, len(vertices), (1,)).item())]
            n_segments = int(torch.randint(segments[0], segments[1] + 1, (1,)).item())
            step = _uniform(*length) * side / n_segments
            angle = _uniform(0.0, 2 * math.pi)
            for _ in range(n_segments):
                angle += _uniform(-0.4, 0.4)
                end = (
                    min(max(point[0] + step * math.cos(angle), 0.0), w - 1.0),
                    min(max(point[1] + step * math.sin(angle), 0.0), h - 1.0),
                )
                distance = torch.minimum(distance, _segment_distance(xs, ys, point, end))
                vertices.append(end)
                point = end
        half = max(0.5, _uniform(*width) * side / 256.0 / 2)
        alpha = (1.0 - (distance - half).clamp_min(0.0)).clamp(0.0, 1.0)  # 1 on the curve, 1 px soft edge
        out[i] = images[i] * (1.0 - _uniform(*darkness) * alpha)
        masks[i, 0] = (alpha > 0).to(dtype)
    return out, masks


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


_PERLIN: PerlinAnomalyGenerator | None = None


def perlin(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DRAEM-style Perlin blending through anomalib's ``PerlinAnomalyGenerator`` (probability 1)."""
    global _PERLIN  # noqa: PLW0603
    _check(images)
    if _PERLIN is None:
        _PERLIN = PerlinAnomalyGenerator(probability=1.0, blend_factor=(0.3, 1.0))
    out, masks = _PERLIN(images)
    return out.clamp(0.0, 1.0), masks.to(images.dtype)


def _check(images: torch.Tensor) -> None:
    if images.ndim != 4 or images.shape[1] not in {1, 3}:  # noqa: PLR2004
        msg = f"Anomaly synthesis expects images of shape (B, 1|3, H, W), got {tuple(images.shape)}."
        raise ValueError(msg)
    min_side = 8
    if min(images.shape[-2:]) < min_side:
        msg = f"Anomaly synthesis needs images of at least {min_side}x{min_side} pixels, got {tuple(images.shape[-2:])}."
        raise ValueError(msg)


class AnomalySynthesizer(nn.Module):
    """Synthesize anomalous versions of a batch, chosen by ``mode`` (one of ``SYNTHESIS_MODES``)."""

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
        if self.mode == "mixed":
            choice = torch.randint(0, 3, (images.shape[0],))
            out = torch.empty_like(images)
            masks = torch.empty_like(images[:, :1])
            for index, fn in enumerate((cutpaste, cutpaste_scar, perlin)):
                selected = (choice == index).nonzero().flatten()
                if len(selected):
                    out[selected], masks[selected] = fn(images[selected])
            return out, masks
        generators = {"cutpaste": cutpaste, "cutpaste_scar": cutpaste_scar, "perlin": perlin, "crack": crack,
                      "speck": speck}
        return generators[self.mode](images)
