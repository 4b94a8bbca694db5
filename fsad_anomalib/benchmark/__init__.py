"""Side-by-side benchmark of FewShotContrastive, its ablations, PatchCore, PaDiM and any anomalib model.

``python -m fsad_anomalib.benchmark``: every method on the same K-shot support sets, on any timm backbone, one run
after another or as Ray tasks across a cluster (``--executor ray``).
"""
