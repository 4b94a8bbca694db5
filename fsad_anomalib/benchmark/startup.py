"""``python -m fsad_anomalib.benchmark.startup``: interpreter start-up with and without the plugin's .pth file.

Runs ``python -c pass`` alternately with ``fsad_anomalib-plugin.pth`` in place and temporarily renamed
(``--runs`` each, interleaved) and prints the medians. Needs write access to site-packages.
"""

from __future__ import annotations

import argparse
import site
import statistics
import subprocess
import sys
import time
from pathlib import Path

from fsad_anomalib.benchmark.cli import int_at_least


def main(argv: list[str] | None = None) -> int:
    """Measure and print the medians."""
    parser = argparse.ArgumentParser(prog="python -m fsad_anomalib.benchmark.startup", description=__doc__)
    parser.add_argument("--runs", type=int_at_least(1), default=40)
    args = parser.parse_args(argv)
    candidates = [Path(p) / "fsad_anomalib-plugin.pth" for p in site.getsitepackages()]
    pth = next((p for p in candidates if p.exists()), None)
    if pth is None:
        print("fsad_anomalib-plugin.pth is not installed in", [str(c.parent) for c in candidates])
        return 1
    off = pth.with_suffix(".pth.off")
    times: dict[str, list[float]] = {"with the .pth": [], "without": []}
    for _ in range(args.runs):
        for name in times:
            if name == "without":
                pth.rename(off)
            try:
                start = time.perf_counter()
                subprocess.run([sys.executable, "-c", "pass"], check=True)
                times[name].append((time.perf_counter() - start) * 1000)
            finally:
                if name == "without":
                    off.rename(pth)
    for name, values in times.items():
        print(f"{name}: {statistics.median(values):.1f} ms median of {args.runs} interleaved runs of python -c pass")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
