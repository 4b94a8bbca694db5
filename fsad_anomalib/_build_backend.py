"""PEP 517 backend: setuptools, plus ``fsad_anomalib-plugin.pth`` in the wheel (see ``fsad_anomalib._plugin``).

setuptools has no declarative way to put a ``.pth`` file at the root of a wheel, so this thin wrapper
adds it (with its RECORD line) to the wheels setuptools builds, editable ones included, and leaves this
module itself out of them: it builds the wheel and is never imported from one.
"""

from __future__ import annotations

import base64
import hashlib
import zipfile
from pathlib import Path

from setuptools import build_meta as _orig
from setuptools.build_meta import *  # noqa: F403

PTH_NAME = "fsad_anomalib-plugin.pth"
BUILD_ONLY = "fsad_anomalib/_build_backend.py"
# One line, run by site.py at start-up: defines a finder that waits for ``import anomalib.models`` and
# only then imports fsad_anomalib._plugin (see that module). It imports nothing itself.
PTH_LINE = (
    b'import os, sys; exec("class _FsadAnomalibHook:\\n def find_spec(self, name, path=None, target=None):\\n'
    b"  if name != 'anomalib.models': return None\\n  sys.meta_path.remove(self)\\n"
    b"  from fsad_anomalib._plugin import hook_spec\\n  return hook_spec(name)\\n"
    b"if not os.environ.get('FSAD_ANOMALIB_NO_PLUGIN'): sys.meta_path.insert(0, _FsadAnomalibHook())\")\n"
)


def _add_pth(wheel_directory: str, wheel_name: str) -> str:
    path = Path(wheel_directory) / wheel_name
    with zipfile.ZipFile(path) as archive:
        items = [(info, archive.read(info.filename)) for info in archive.infolist()]
    digest = base64.urlsafe_b64encode(hashlib.sha256(PTH_LINE).digest()).rstrip(b"=").decode()
    record_line = f"{PTH_NAME},sha256={digest},{len(PTH_LINE)}\n"
    tmp = path.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(PTH_NAME, PTH_LINE)
        for info, data in items:
            if info.filename in {PTH_NAME, BUILD_ONLY}:
                continue
            if info.filename.endswith(".dist-info/RECORD"):
                lines = [line for line in data.decode().splitlines() if not line.startswith(BUILD_ONLY + ",")]
                archive.writestr(info, ("\n".join(lines) + "\n" + record_line).encode())
                continue
            archive.writestr(info, data)
    tmp.replace(path)
    return wheel_name


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None) -> str:  # noqa: ANN001
    return _add_pth(wheel_directory, _orig.build_wheel(wheel_directory, config_settings, metadata_directory))


def build_editable(wheel_directory, config_settings=None, metadata_directory=None) -> str:  # noqa: ANN001
    return _add_pth(wheel_directory, _orig.build_editable(wheel_directory, config_settings, metadata_directory))
