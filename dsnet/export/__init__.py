"""Deployment: ONNX graphs and bundles, the split of dynamic inference as plain graphs, the serving runtimes."""

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
from dsnet.export.serving import (
    AUTO_RUNTIME,
    RUNTIMES,
    EagerServing,
    OnnxServing,
    ServingModel,
    ServingOutput,
    SplitServing,
    build_serving,
    check_serving,
)
from dsnet.export.split import SplitModules, plain_graph, split_dynamic

__all__ = [
    "AUTO_RUNTIME",
    "MANIFEST_FORMAT",
    "RUNTIMES",
    "EagerServing",
    "OnnxDynamicModel",
    "OnnxServing",
    "ServingModel",
    "ServingOutput",
    "SplitModules",
    "SplitServing",
    "build_serving",
    "check_dynamic",
    "check_serving",
    "check_static",
    "compact_copy",
    "export_dynamic",
    "export_static",
    "ort_session",
    "plain_graph",
    "preprocessing_spec",
    "split_dynamic",
]
