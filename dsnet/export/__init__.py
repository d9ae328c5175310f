"""Deployment exports: ONNX graphs of static sub-networks and ONNX bundles of the dynamic model."""

from dsnet.export.compact import compact_copy
from dsnet.export.onnx import (
    MANIFEST_FORMAT,
    OnnxDynamicModel,
    check_dynamic,
    check_static,
    export_dynamic,
    export_static,
    ort_session,
    preprocessing_spec,
)

__all__ = [
    "MANIFEST_FORMAT",
    "OnnxDynamicModel",
    "check_dynamic",
    "check_static",
    "compact_copy",
    "export_dynamic",
    "export_static",
    "ort_session",
    "preprocessing_spec",
]
