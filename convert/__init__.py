"""instaflow_edge.convert: component specs, pruning, ONNX and Core ML export.

``export(ConvertConfig(...))`` is the verb; it returns the manifest (the CLI prints its parity table).
Targets register themselves in ``config.TARGETS`` when their module is imported, which happens here,
lazily, so ``import instaflow_edge.convert`` stays light.
"""

from __future__ import annotations

import importlib

from .config import TARGETS, ConvertConfig, Target, target  # noqa: F401

_TARGET_MODULES = {Target.onnx: "instaflow_edge.convert.onnx", Target.coreml: "instaflow_edge.convert.coreml",
                   Target.openvino: "instaflow_edge.convert.openvino", Target.web: "instaflow_edge.convert.web"}


def export(config: ConvertConfig) -> dict:
    """Export ``config.model`` for ``config.target`` (the config was checked when it was made); returns
    the written manifest."""
    importlib.import_module(_TARGET_MODULES[config.target])
    return TARGETS[config.target](config)
