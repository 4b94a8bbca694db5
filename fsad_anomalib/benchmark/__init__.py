"""Side-by-side benchmark of FewShotContrastive, its ablations, PatchCore and PaDiM."""
