"""OpenVINO IR that infers in FP32 on every CPU, with OpenVINO's default settings.

On CPUs with bf16 units (AVX512-BF16, AMX) OpenVINO's CPU plugin runs convolutions and matrix products in bf16 unless
``INFERENCE_PRECISION_HINT`` says ``f32`` at compile time: a FewShotContrastive score then lies about 1e-4 to 1e-2
relative from the eager model's, enough to flip an OK/NG label near the threshold. The plugin reads no inference
precision from the model's ``rt_info`` (its ``runtime_options`` only carry KV-cache and dynamic-quantisation settings),
but it keeps the original precision of every operation marked ``precise`` (OpenVINO's serialised
``DisableFP16Compression`` attribute, which its CPU graph honours for bf16 as for f16). :func:`keep_fp32` marks every
layer of an IR that way, so ``compile_model(xml, "CPU")`` and anomalib's ``OpenVINOInferencer`` score as the eager model
does without any configuration.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET  # noqa: N817 - the stdlib's usual alias
from pathlib import Path

__all__ = ["keep_fp32"]


def keep_fp32(xml_path: str | Path) -> int:
    """Mark every layer of the OpenVINO IR at ``xml_path`` ``precise`` (kept in FP32); return how many were marked.

    The weights file is left as it is (FP16-compressed weights stay compressed; they are computed in FP32).
    """
    path = Path(xml_path)
    tree = ET.parse(path)  # noqa: S314 - an IR this process has just written
    marked = 0
    for layer in tree.getroot().iter("layer"):
        rt_info = layer.find("rt_info")
        if rt_info is None:
            rt_info = ET.Element("rt_info")
            layer.insert(1 if layer.find("data") is not None else 0, rt_info)
        if not any(item.get("name") == "precise" for item in rt_info.iter("attribute")):
            ET.SubElement(rt_info, "attribute", {"name": "precise", "version": "0"})
            marked += 1
    tree.write(path, encoding="utf-8", xml_declaration=True)
    return marked
