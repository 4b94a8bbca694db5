"""Check image files before a run, so bad input fails early with the file's name instead of deep in a loader."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from PIL import Image, UnidentifiedImageError

__all__ = ["ImageFileError", "check_image_file", "check_image_files"]

# modes anomalib's reader turns into RGB correctly (it calls PIL's convert("RGB"))
_SAFE_MODES = {"1", "L", "P", "RGB", "RGBA", "LA", "CMYK", "YCbCr", "PA", "La", "RGBa"}


class ImageFileError(ValueError):
    """An image file that cannot be used, with the file named in the message."""


def check_image_file(path: str | Path) -> None:
    """Raise :class:`ImageFileError` if ``path`` is missing, empty, not an image, truncated or of an unsafe mode."""
    path = Path(path)
    if not path.is_file():
        msg = f"{path}: image file does not exist."
        raise ImageFileError(msg)
    if path.stat().st_size == 0:
        msg = f"{path}: image file is empty (0 bytes)."
        raise ImageFileError(msg)
    try:
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:  # verify() does not decode pixels: load to catch truncation
            image.load()
            mode = image.mode
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        msg = f"{path}: not a readable image ({exc}). Remove it from the image folder or replace it."
        raise ImageFileError(msg) from exc
    if mode not in _SAFE_MODES:
        msg = (
            f"{path}: image mode '{mode}' (16-bit or float) would be clipped to 8 bits by anomalib's reader, "
            "which turns most pixels white. Convert it to 8-bit first, e.g. scale 16-bit values by 1/257."
        )
        raise ImageFileError(msg)


def check_image_files(paths: Iterable[str | Path], what: str = "dataset") -> None:
    """Check every file; the error names the first bad file and how many are bad."""
    bad = []
    for path in paths:
        try:
            check_image_file(path)
        except ImageFileError as exc:  # noqa: PERF203 - each file's own error, by name
            bad.append(str(exc))
    if bad:
        extra = f" (and {len(bad) - 1} more bad file(s))" if len(bad) > 1 else ""
        msg = f"{what}: {bad[0]}{extra}"
        raise ImageFileError(msg)
