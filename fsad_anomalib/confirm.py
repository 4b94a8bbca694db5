r"""Confirm a trained model's OK/NG threshold on further good parts: :func:`confirm`, and its command.

The threshold from the K training images is right on average over support sets, not for each: K images need not
show how much a product varies. Confirmation resets the image and pixel thresholds from N further **good** parts
(no defective image) scored by the model as it is deployed. With at least ``1 / rate - 1`` of them (19 for 5 %, 99
for 1 %) the threshold is their split-conformal order statistic, the ``ceil((N + 1) (1 - rate))``-th smallest
score, which a new good part exceeds with probability at most ``rate`` whatever the scores' distribution (they are
exchangeable with the line's own good parts); with fewer, the normal prediction bound of their scores.

::

    python -m fsad_anomalib.confirm --model FewShotContrastive --ckpt model.ckpt \\
        --images line/good --output confirmed.ckpt [--false-reject-rate 0.05]

The new checkpoint works with ``anomalib predict`` and ``anomalib export`` as the old one did. Give only good
parts: a defective one among them raises the threshold.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import anomalib.models as anomalib_models
import torch
from anomalib.data import ImageBatch
from anomalib.data.utils import read_image
from anomalib.data.utils.image import get_image_filenames_from_dir
from lightning import LightningModule

from fsad_anomalib import models as our_models
from fsad_anomalib.models.few_shot_contrastive.torch_model import NotFittedError
from fsad_anomalib.post_processing.bounds import check_rate, conformal_bound, conformal_minimum
from fsad_anomalib.post_processing.evidence import score_batch
from fsad_anomalib.post_processing.growth import DEFAULT_FOLDS
from fsad_anomalib.post_processing.growth import grow as grow_model
from fsad_anomalib.post_processing.normal_threshold import NormalThresholdPostProcessor

logger = logging.getLogger(__name__)

__all__ = ["confirm", "confirm_checkpoint", "main"]


def _model_class(name: str) -> type:
    for module in (our_models, anomalib_models):
        found = getattr(module, name, None)
        if isinstance(found, type) and hasattr(found, "load_from_checkpoint"):
            return found
    msg = (
        f"--model {name}: not a model class of fsad_anomalib.models or anomalib.models (e.g. FewShotContrastive, "
        "Patchcore)."
    )
    raise ValueError(msg)


def _images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        msg = f"--images {folder}: not a folder."
        raise ValueError(msg)
    try:
        return get_image_filenames_from_dir(folder)  # anomalib's: torchvision's image suffixes, recursively, sorted
    except ValueError as error:
        msg = f"--images {folder}: {error}."
        raise ValueError(msg) from error


def _batches(paths: Sequence[Path]) -> Iterator[ImageBatch]:
    """One image at a time (good parts need not share a size; the model's pre-processor resizes them)."""
    for path in paths:
        try:
            image = read_image(path, as_tensor=True)
        except Exception as error:
            msg = f"--images: cannot read {path} as an image ({type(error).__name__}: {error})."
            raise ValueError(msg) from error
        yield ImageBatch(image=image[None], image_path=[str(path)])


@torch.no_grad()
def confirm(
    model: LightningModule,
    images: torch.Tensor | Iterable[Any],
    false_reject_rate: float | None = None,
    grow: bool = False,
    folds: int = DEFAULT_FOLDS,
) -> dict[str, Any]:
    """Reset the image and pixel thresholds from N further **good** parts (no defective ones), as the line runs.

    The threshold from the K training images is right on average over support sets, not for yours: K images
    need not show how much the product varies. ``images`` are good parts the model never saw, scored by the
    trained ``model`` as it is deployed. With at least ``1 / rate - 1`` of them (19 for 5 %, 99 for 1 %) the
    threshold is their split-conformal order statistic (:func:`conformal_bound`): at most ``rate`` of the line's
    good parts lie above it, whatever the scores' distribution. With fewer it is the prediction bound of their
    scores, never below the highest, with a warning. Save the checkpoint (or export) again to deploy it.

    Args:
        model (LightningModule): The trained model, with its NormalThresholdPostProcessor.
        images (torch.Tensor | Iterable): Good parts: a ``(N, 3, H, W)`` tensor in [0, 1], or batches of them
            (tensors, or anomalib batches such as a datamodule's dataloader yields, labels ignored).
        false_reject_rate (float | None): A new target rate; defaults to the current one.
        grow (bool): Also add the parts to the model's references (its Gaussians and memory bank; configuration and
            weights stay) and set the threshold from cross-fitted scores of all K + N images
            (:func:`~fsad_anomalib.post_processing.growth.grow`). A part the current model rejects far above the
            others is not added but listed in the record's ``grown.flagged``. Needs the training images, which the
            post-processor keeps (trained in this process, or loaded by :func:`confirm_checkpoint`).
        folds (int): Folds of the cross-fitted scores when growing. Defaults to 5.

    Returns:
        dict[str, Any]: The new calibration record (also the post-processor's ``calibration``).

    Raises:
        TypeError: ``model`` has no NormalThresholdPostProcessor.
        ValueError: The images are not image batches, fewer than 2 give finite scores, the rate is not in
            (0, 0.5), or ``grow`` without the training images.
    """
    post = getattr(model, "post_processor", None)
    if not isinstance(post, NormalThresholdPostProcessor):
        msg = "confirm(model, images): model must be a trained model with a NormalThresholdPostProcessor."
        raise TypeError(msg)
    rate = post.false_reject_rate if false_reject_rate is None else false_reject_rate
    check_rate(rate)
    if grow and post.references is None:
        msg = (
            "confirm(model, images, grow=True): the model's training images are not at hand (the post-processor "
            "keeps them from training, and checkpoints written since this version carry them); load the "
            "checkpoint with confirm_checkpoint (python -m fsad_anomalib.confirm --grow), or retrain."
        )
        raise ValueError(msg)
    scores, maxima, parts, names = _score_good_parts(model, images, keep=grow)
    finite = scores[torch.isfinite(scores)]
    if finite.numel() < scores.numel():
        logger.warning(
            "Confirmation: %d of %d good parts gave NaN or infinite scores and are left out; check those images.",
            scores.numel() - finite.numel(),
            scores.numel(),
        )
    if finite.numel() < 2:
        msg = f"confirm(model, images) needs at least 2 good parts with finite scores, got {finite.numel()}."
        raise ValueError(msg)
    needed = conformal_minimum(rate)
    if finite.numel() < needed and not grow:  # growing counts the K training images too (growth.grow says)
        logger.warning(
            "Confirmation: %d good parts are fewer than the %d a distribution-free threshold at %.1f %% needs; "
            "using the normal prediction bound of their scores (at least the highest).",
            finite.numel(),
            needed,
            100 * rate,
        )
    previous = {key: post.calibration[key] for key in ("k_shot", "image", "pixel") if key in post.calibration}
    record: dict[str, Any] = {
        "k_shot": post.calibration.get("k_shot"),
        "false_reject_rate": float(rate),
        "confirmed_on": int(finite.numel()),
        "from_training": previous,
    }
    if grow:
        record.update(grow_model(model, post.references, parts, scores, names, float(rate), folds))
        post.adopt(record)
        _log_growth(record)
        return record
    image = conformal_bound(finite, float(rate))
    record.update({"estimator": image["estimator"], "image": {**image, "lowest": float(finite.min())}})
    finite_maxima = maxima[torch.isfinite(maxima)]
    if finite_maxima.numel() >= 2:
        record["pixel"] = {**conformal_bound(finite_maxima, float(rate)), "lowest": float(finite_maxima.min())}
    post.adopt(record)
    logger.info(
        "Confirmation: image threshold %.6g for a %.1f %% false-reject rate, from %d good parts (%s)",
        image["threshold"],
        100 * rate,
        finite.numel(),
        image["estimator"],
    )
    return record


def _log_growth(record: dict[str, Any]) -> None:
    grown = record["grown"]
    logger.info(
        "Grown: %d references + %d good parts; image threshold %.6g for a %.1f %% false-reject rate (%s, %d folds)",
        grown["references"],
        grown["added"],
        record["image"]["threshold"],
        100 * record["false_reject_rate"],
        record["estimator"],
        grown["folds"],
    )
    for flag in grown["flagged"]:
        logger.warning(
            "Not added: %s scores %.6g, above the threshold %.6g and far above the other parts: it may be defective.",
            flag["part"],
            flag["score"],
            flag["threshold"],
        )


def _score_good_parts(
    model: LightningModule, images: torch.Tensor | Iterable[Any], keep: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, list[str]]:
    """Raw image scores, anomaly-map maxima, the pre-processed images (``keep``) and names of good parts."""
    batches = [images] if isinstance(images, torch.Tensor) else images
    was_training = model.training
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    scores, maxima, kept, names = [], [], [], []
    try:
        for index, batch in enumerate(batches):
            tensor = batch if isinstance(batch, torch.Tensor) else getattr(batch, "image", None)
            if not isinstance(tensor, torch.Tensor) or tensor.ndim != 4 or tensor.shape[1] != 3:
                shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(batch).__name__
                msg = (
                    f"confirm(model, images): batch {index} is {shape}; expected good-part images as a "
                    "(N, 3, H, W) tensor in [0, 1], or batches with an .image tensor of that shape."
                )
                raise ValueError(msg)
            tensor = tensor.to(device)
            if model.pre_processor:  # the transform training and `anomalib predict` apply (forward() applies
                transform = getattr(model.pre_processor, "transform", None)  # the export one: no antialias)
                tensor = transform(tensor) if transform is not None else model.pre_processor(tensor)
            batch_scores, batch_maxima = score_batch(model.model, tensor)
            scores.append(batch_scores)
            maxima.append(batch_maxima)
            paths = getattr(batch, "image_path", None) or [f"#{len(names) + i}" for i in range(len(tensor))]
            names.extend(str(path) for path in paths)
            if keep:
                kept.append(tensor.detach().cpu())
    finally:
        model.train(was_training)
    if not scores:
        msg = "confirm(model, images): no images given."
        raise ValueError(msg)
    return torch.cat(scores), torch.cat(maxima), torch.cat(kept) if keep else None, names


def confirm_checkpoint(
    model_name: str,
    ckpt: str | Path,
    images: str | Path,
    output: str | Path,
    false_reject_rate: float | None = None,
    grow: bool = False,
    folds: int = DEFAULT_FOLDS,
) -> dict:
    """Load ``ckpt``, confirm its threshold on the good parts in ``images`` (and ``grow``), write ``output``.

    Returns the record.
    """
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
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=False)
    model.post_processor.on_load_checkpoint(None, model, checkpoint)  # the training images it keeps, if any
    if grow and model.post_processor.references is None:
        msg = f"--ckpt {ckpt}: keeps no training images to grow from (written by an earlier version); retrain it."
        raise ValueError(msg)
    record = confirm(model, _batches(paths), false_reject_rate=false_reject_rate, grow=grow, folds=folds)
    checkpoint["state_dict"] = model.state_dict()
    model.post_processor.on_save_checkpoint(None, model, checkpoint)
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
    parser = argparse.ArgumentParser(
        prog="python -m fsad_anomalib.confirm",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model", required=True, help="the checkpoint's model class: FewShotContrastive, Patchcore, ..."
    )
    parser.add_argument("--ckpt", required=True, help="the trained model's checkpoint")
    parser.add_argument(
        "--images", required=True, help="a folder of good parts the model never saw (searched recursively)"
    )
    parser.add_argument("--output", required=True, help="where to write the confirmed checkpoint")
    parser.add_argument(
        "--false-reject-rate", type=float, default=None, help="a new target rate in (0, 0.5); default: the checkpoint's"
    )
    parser.add_argument(
        "--grow",
        action="store_true",
        help="also add the good parts to the model's references and set the threshold from cross-fitted scores of "
        "all its images (a part the model rejects far above the others is listed, not added)",
    )
    parser.add_argument("--folds", type=int, default=DEFAULT_FOLDS, help="folds of the cross-fitted scores (--grow)")
    args = parser.parse_args(argv)
    if args.folds < 2:
        parser.error(f"--folds {args.folds}: expected an integer of at least 2.")
    try:
        record = confirm_checkpoint(
            args.model, args.ckpt, args.images, args.output, args.false_reject_rate, args.grow, args.folds
        )
    except (ValueError, NotFittedError) as error:
        parser.error(str(error))
    image, rate = record["image"], 100 * record["false_reject_rate"]
    if not args.grow:
        print(
            f"image threshold {image['threshold']:.6g} for a {rate:g} % false-reject rate, from "
            f"{record['confirmed_on']} good parts ({record['estimator']}); written to {args.output}"
        )
        return 0
    grown = record["grown"]
    print(
        f"grown: {grown['references']} training images + {grown['added']} good parts; image threshold "
        f"{image['threshold']:.6g} for a {rate:g} % false-reject rate ({record['estimator']}, {grown['folds']} folds); "
        f"written to {args.output}"
    )
    for flag in grown["flagged"]:
        print(
            f"NOT ADDED: {flag['part']} scores {flag['score']:.6g}, above the current threshold "
            f"{flag['threshold']:.6g} and far above the other good parts (beyond Q3 + 3 IQR of their scores): it may "
            "be defective. Look at it; if it is good, run --grow again with it in a folder of its own."
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
