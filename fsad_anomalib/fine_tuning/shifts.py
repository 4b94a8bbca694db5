"""Synthetic anomalies of two kinds, made from normal images: local flaws and whole-image shifts.

FewShotContrastive's self-configuration scores them against models built from the other normals (it has no
real defect to look at); they live beside the fine-tuning synthesis, whose families they share (``speck``). Images are
float tensors in [0, 1], shape ``(B, C, H, W)``; all randomness comes from
the ``torch.Generator`` passed in, so a seed repeats a result whatever ran before.

Local families (a small region changes):

* ``speck``: small ellipses of grey pixel noise (:func:`fsad_anomalib.fine_tuning.synthesis.speck`).
* ``line``: a thin straight scratch, darker or brighter, 1-3 px wide and 15-45 % of the side long.
* ``blotch``: a soft-edged stain (radius 4-12 % of the side) that darkens or brightens by 8-20 %.

Global families (the whole image changes, nothing is out of place locally):

* ``gamma``: gamma 0.6-0.8 or 1.25-1.6.
* ``contrast``: contrast around the image's mean times 0.55-0.75 or 1.3-1.6.
* ``blur``: Gaussian blur, sigma 1-2.5 % of the side.
* ``tint``: one colour channel's gain times 0.8-0.88 or 1.12-1.2.
* ``rescale``: zoom into the centre by 1.25-1.6 (the texture or pattern grows coarser).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F  # noqa: N812
from kornia.enhance import adjust_gamma
from kornia.filters import gaussian_blur2d

from fsad_anomalib.fine_tuning.synthesis import speck

__all__ = ["GLOBAL_FAMILIES", "LOCAL_FAMILIES", "SHIFT_FAMILIES", "shift"]

LOCAL_FAMILIES = ("speck", "line", "blotch")
GLOBAL_FAMILIES = ("gamma", "contrast", "blur", "tint", "rescale")
SHIFT_FAMILIES = LOCAL_FAMILIES + GLOBAL_FAMILIES


def _u(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand(1, generator=generator))


def _either(generator: torch.Generator, low: tuple[float, float], high: tuple[float, float]) -> float:
    """A value from ``low`` or from ``high``, each with probability one half."""
    return _u(generator, *low) if float(torch.rand(1, generator=generator)) < 0.5 else _u(generator, *high)


def _grid(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    h, w = image.shape[-2:]
    ys = torch.arange(h, device=image.device, dtype=image.dtype).view(h, 1)
    xs = torch.arange(w, device=image.device, dtype=image.dtype).view(1, w)
    return ys, xs


def _line(image: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    h, w = image.shape[-2:]
    side = min(h, w)
    ys, xs = _grid(image)
    length, width = _u(g, 0.15, 0.45) * side, _u(g, 1.0, 3.0) * side / 256
    theta = _u(g, 0.0, math.pi)
    cx, cy = _u(g, 0.2, 0.8) * w, _u(g, 0.2, 0.8) * h
    along = (xs - cx) * math.cos(theta) + (ys - cy) * math.sin(theta)
    across = -(xs - cx) * math.sin(theta) + (ys - cy) * math.cos(theta)
    mask = ((along.abs() <= length / 2) & (across.abs() <= max(width, 0.75) / 2)).to(image.dtype)
    offset = _either(g, (-0.45, -0.25), (0.25, 0.45))
    return (image + offset * mask).clamp(0, 1)


def _blotch(image: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    h, w = image.shape[-2:]
    side = min(h, w)
    ys, xs = _grid(image)
    rx, ry = _u(g, 0.04, 0.12) * side, _u(g, 0.04, 0.12) * side
    cx, cy = _u(g, 0.15, 0.85) * w, _u(g, 0.15, 0.85) * h
    weight = torch.exp(-0.5 * (((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2) * 2.0)
    gain = _either(g, (0.8, 0.92), (1.08, 1.2))
    return (image * (1 + (gain - 1) * weight)).clamp(0, 1)


def _gamma(image: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return adjust_gamma(image, _either(g, (0.6, 0.8), (1.25, 1.6)))


def _contrast(image: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    # around the mean of all channels: kornia's adjust_contrast_with_mean_subtraction centres on the grey level
    factor = _either(g, (0.55, 0.75), (1.3, 1.6))
    mean = image.mean()
    return ((image - mean) * factor + mean).clamp(0, 1)


def _blur(image: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    sigma = _u(g, 0.01, 0.025) * min(image.shape[-2:])
    size = 2 * math.ceil(3 * sigma) + 1
    return gaussian_blur2d(image[None], (size, size), (sigma, sigma), border_type="reflect")[0]


def _tint(image: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    channel = int(torch.randint(image.shape[0], (1,), generator=g))
    gain = torch.ones(image.shape[0], 1, 1, dtype=image.dtype, device=image.device)
    gain[channel] = _either(g, (0.8, 0.88), (1.12, 1.2))
    return (image * gain).clamp(0, 1)


def _rescale(image: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    h, w = image.shape[-2:]
    zoom = _u(g, 1.25, 1.6)
    ch, cw = max(2, round(h / zoom)), max(2, round(w / zoom))
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = image[None, :, top : top + ch, left : left + cw]
    return F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False, antialias=False)[0]


def _speck(image: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    # speck draws from torch's global stream: run it in a fork seeded from the generator
    seed = int(torch.randint(2**31 - 1, (1,), generator=g))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return speck(image[None])[0][0]


_FAMILIES: dict[str, Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = {
    "speck": _speck,
    "line": _line,
    "blotch": _blotch,
    "gamma": _gamma,
    "contrast": _contrast,
    "blur": _blur,
    "tint": _tint,
    "rescale": _rescale,
}


def shift(images: torch.Tensor, family: str, generator: torch.Generator) -> torch.Tensor:
    """Anomalous versions of ``images`` ``(B, C, H, W)`` in [0, 1]: one draw of ``family`` per image.

    Args:
        images (torch.Tensor): Normal images in [0, 1].
        family (str): One of ``SHIFT_FAMILIES``.
        generator (torch.Generator): The random stream (on the CPU).

    Returns:
        torch.Tensor: The altered images, same shape and dtype.

    Example:
        >>> import torch
        >>> out = shift(torch.rand(2, 3, 64, 64), "gamma", torch.Generator().manual_seed(0))
        >>> out.shape
        torch.Size([2, 3, 64, 64])
    """
    if family not in _FAMILIES:
        msg = f"shift: family must be one of {SHIFT_FAMILIES}, got '{family}'."
        raise ValueError(msg)
    if images.ndim != 4 or min(images.shape[-2:]) < 8:
        msg = f"shift expects images of shape (B, C, H >= 8, W >= 8), got {tuple(images.shape)}."
        raise ValueError(msg)
    return torch.stack([_FAMILIES[family](image, generator) for image in images])
