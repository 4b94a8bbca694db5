"""Lightning callbacks of fsad-anomalib."""

__all__: list[str] = []
