"""``python -m fsad_anomalib.backbones [ARCH]`` prints the ``local-dir:`` name of the offline weights."""

import sys

from .offline import offline_backbone

if __name__ == "__main__":
    print(offline_backbone(sys.argv[1] if len(sys.argv) > 1 else "tf_efficientnet_lite0"))
