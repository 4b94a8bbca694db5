"""OpenVINO IR that infers in FP32 on every CPU, with OpenVINO's default settings.

On CPUs with bf16 units (AVX512-BF16, AMX) OpenVINO's CPU plugin runs convolutions, matrix products and interpolations
in bf16 unless ``INFERENCE_PRECISION_HINT`` says ``f32`` at compile time: a FewShotContrastive score then lies 1e-4 to
1e-2 relative from the eager model's, enough to flip an OK/NG label near the threshold. The plugin reads no inference
precision from the model's ``rt_info`` (its ``runtime_options`` carry only KV-cache and dynamic-quantisation settings),
but it keeps the original precision of every operation marked ``precise`` (the serialised form of OpenVINO's
``DisableFP16Compression``, which its CPU graph honours for bf16 as for f16). The mark does not survive an operation
the plugin replaces by a new one, so :func:`keep_fp32` first writes the two operations of anomalib's exported graphs
that the plugin would replace in their replacement's form (``Interpolate`` v11 as v4, ``Pad`` v12 as v1, same
semantics), then marks every layer. ``compile_model(xml, "CPU")`` and anomalib's ``OpenVINOInferencer`` then score as
the eager model does, without configuration.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET  # noqa: S405 - parses only the IR the export just wrote
from pathlib import Path

import numpy as np

__all__ = ["keep_fp32"]


def _older_forms(xml_path: Path) -> None:
    """Rewrite ``Interpolate`` v11 as v4 and ``Pad`` v12 as v1 (the forms the CPU plugin would convert them to)."""
    import openvino as ov
    from openvino.opset1.ops import pad
    from openvino.opset10.ops import interpolate

    core = ov.Core()
    model = core.read_model(xml_path)
    changed = False
    for op in model.get_ordered_ops():
        version, kind = op.get_type_info().version_id, op.get_type_name()
        inputs = [port.get_source_output() for port in op.inputs()]
        if kind == "Interpolate" and version == "opset11" and len(inputs) == 2:
            a = op.get_attributes()
            rank = inputs[0].get_partial_shape().rank.get_length()
            sizes, scales = (
                (inputs[1], np.ones(rank, np.float32))
                if a["shape_calculation_mode"] == "sizes"
                else (np.zeros(rank, np.int64), inputs[1])
            )
            new = interpolate(
                inputs[0],
                sizes,
                scales,
                a["mode"],
                a["shape_calculation_mode"],
                a["pads_begin"],
                a["pads_end"],
                a["coordinate_transformation_mode"],
                a["nearest_mode"],
                a["antialias"],
                a["cube_coeff"],
                np.arange(rank, dtype=np.int64),
            )
        elif kind == "Pad" and version == "opset12":
            new = pad(inputs[0], inputs[1], inputs[2], op.get_attributes()["pad_mode"], *inputs[3:])
        else:
            continue
        new.set_friendly_name(op.get_friendly_name())
        for target in list(op.output(0).get_target_inputs()):
            target.replace_source_output(new.output(0))
        changed = True
    if not changed:
        return
    model.validate_nodes_and_infer_types()
    # beside the original, then over it: read_model maps the weights file, which must not be written while mapped
    staged = xml_path.with_name(f"{xml_path.stem}.staged.xml")
    ov.save_model(model, staged, compress_to_fp16=False)  # the weights as they were (FP16 ones stay FP16)
    del model, core
    staged.replace(xml_path)
    staged.with_suffix(".bin").replace(xml_path.with_suffix(".bin"))


def keep_fp32(xml_path: str | Path) -> int:
    """Make the OpenVINO IR at ``xml_path`` infer in FP32 under OpenVINO's defaults; return the layers it marked."""
    path = Path(xml_path)
    _older_forms(path)
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
