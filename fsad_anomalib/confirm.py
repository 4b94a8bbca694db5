"""Confirm a trained model's OK/NG threshold on a folder of further good parts, from the command line.

::

    python -m fsad_anomalib.confirm --model FewShotContrastive --ckpt model.ckpt \\
        --images line/good --output confirmed.ckpt [--false-reject-rate 0.05]

The checkpoint's model scores the good parts as it is deployed, and
:meth:`~fsad_anomalib.post_processing.NormalThresholdPostProcessor.confirm` resets its image and pixel thresholds from
them (a distribution-free threshold from ``1 / rate - 1`` parts on: 19 for 5 %, 99 for 1 %). The new checkpoint
works with ``anomalib predict`` and ``anomalib export`` as the old one did. Give only good parts: a defective one
among them raises the threshold.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from fsad_anomalib.models.few_shot_contrastive.torch_model import NotFittedError
from fsad_anomalib.post_processing.normal_threshold import NormalThresholdPostProcessor

def _model_class(name: str) -> type:
    import anomalib.models as anomalib_models  # noqa: PLC0415

    from fsad_anomalib import models as our_models  # noqa: PLC0415

    for module in (our_models, anomalib_models):
        found = getattr(module, name, None)
        if isinstance(found, type) and hasattr(found, "load_from_checkpoint"):
            return found
    msg = f"--model {name}: not a model class of fsad_anomalib.models or anomalib.models (e.g. FewShotContrastive, Patchcore)."
    raise ValueError(msg)


def _images(folder: Path) -> list[Path]:
    from anomalib.data.utils.image import get_image_filenames_from_dir  # noqa: PLC0415

    if not folder.is_dir():
        msg = f"--images {folder}: not a folder."
        raise ValueError(msg)
    try:
        return get_image_filenames_from_dir(folder)  # anomalib's: torchvision's image suffixes, recursively, sorted
    except ValueError as error:
        msg = f"--images {folder}: {error}."
        raise ValueError(msg) from error


def _batches(paths: Sequence[Path]) -> Iterator[torch.Tensor]:
    """One image at a time (good parts need not share a size; the model's pre-processor resizes them)."""
    from anomalib.data.utils import read_image  # noqa: PLC0415

    for path in paths:
        try:
            image = read_image(path, as_tensor=True)
        except Exception as error:  # noqa: BLE001 - an unreadable file is named, not a traceback from OpenCV/PIL
            msg = f"--images: cannot read {path} as an image ({type(error).__name__}: {error})."
            raise ValueError(msg) from error
        yield image[None]


def confirm_checkpoint(
    model_name: str, ckpt: str | Path, images: str | Path, output: str | Path, false_reject_rate: float | None = None
) -> dict:
    """Load ``ckpt``, confirm its threshold on the good parts in ``images`` and write ``output``; return the record."""
    ckpt, output = Path(ckpt), Path(output)
    if not ckpt.is_file():
        msg = f"--ckpt {ckpt}: no such file."
        raise ValueError(msg)
    if output.resolve() == ckpt.resolve():
        msg = f"--output {output}: would overwrite --ckpt; write the confirmed model to another file."
        raise ValueError(msg)
    paths = _images(Path(images))
    cls = _model_class(model_name)
    model = cls.load_from_checkpoint(ckpt, map_location="cpu")
    if not isinstance(model.post_processor, NormalThresholdPostProcessor):  # a stock model trained with ours
        model = cls.load_from_checkpoint(ckpt, map_location="cpu", post_processor=NormalThresholdPostProcessor())
    record = model.post_processor.confirm(model, _batches(paths), false_reject_rate=false_reject_rate)
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=False)
    checkpoint["state_dict"] = model.state_dict()
    checkpoint["anomalib_post_processor_config"] = model.post_processor.checkpoint_config()
    # Lightning also keeps each callback's state, the post-processor's buffers included, and restores it after the
    # model's state_dict when a trainer resumes from the file (anomalib test / predict --ckpt_path): replace it too
    callbacks = checkpoint.get("callbacks") or {}
    if model.post_processor.state_key in callbacks:
        callbacks[model.post_processor.state_key] = model.post_processor.state_dict()
    output.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, output)
    return record


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m fsad_anomalib.confirm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--model", required=True, help="the checkpoint's model class: FewShotContrastive, Patchcore, ...")
    parser.add_argument("--ckpt", required=True, help="the trained model's checkpoint")
    parser.add_argument("--images", required=True, help="a folder of good parts the model never saw (searched recursively)")
    parser.add_argument("--output", required=True, help="where to write the confirmed checkpoint")
    parser.add_argument("--false-reject-rate", type=float, default=None,
                        help="a new target rate in (0, 0.5); default: the checkpoint's")
    args = parser.parse_args(argv)
    try:
        record = confirm_checkpoint(args.model, args.ckpt, args.images, args.output, args.false_reject_rate)
    except (ValueError, NotFittedError) as error:
        parser.error(str(error))
    image = record["image"]
    print(f"image threshold {image['threshold']:.6g} for a {100 * record['false_reject_rate']:g} % false-reject rate, "
          f"from {record['confirmed_on']} good parts ({record['estimator']}); written to {args.output}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
