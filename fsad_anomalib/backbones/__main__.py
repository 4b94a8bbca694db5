"""Backbone weights for machines without network access.

``python -m fsad_anomalib.backbones [ARCH]`` prints the ``local-dir:`` name of the offline EfficientNet-Lite weights
(``tf_efficientnet_lite0``, ``_lite1``, ``_lite2``); ``python -m fsad_anomalib.backbones --save NAME --to FOLDER``
fetches any timm model's pretrained weights (network access) into ``FOLDER/NAME`` and prints its ``local-dir:`` name,
the backbone to give on the machine the folder is copied to.
"""

import argparse
import sys

from .offline import OfflineWeightsError, offline_backbone, save_pretrained


def main(argv: list[str] | None = None) -> int:
    """Print a ``local-dir:`` backbone name: the offline Lite weights, or weights fetched with ``--save``."""
    parser = argparse.ArgumentParser(prog="python -m fsad_anomalib.backbones", description=__doc__.split("\n\n")[1])
    parser.add_argument("arch", nargs="?", default="tf_efficientnet_lite0", help="offline EfficientNet-Lite weights")
    parser.add_argument("--save", metavar="NAME", help="a timm model whose pretrained weights to fetch")
    parser.add_argument("--to", metavar="FOLDER", default="backbones", help="where --save writes (default: backbones)")
    args = parser.parse_args(argv)
    try:
        print(save_pretrained(args.save, args.to) if args.save else offline_backbone(args.arch))
    except OfflineWeightsError as exc:
        parser.exit(1, f"error: {exc}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
