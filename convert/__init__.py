"""instaflow_edge.convert: component specs, pruning, ONNX and Core ML export.

``export(ConvertConfig(...))`` is the verb; targets register themselves in ``config.TARGETS`` when
their module is imported, which happens here, lazily, so ``import instaflow_edge.convert`` stays light.
"""

from __future__ import annotations

import importlib

from .config import TARGETS, ConvertConfig, Target, target  # noqa: F401

_TARGET_MODULES = {"onnx": "instaflow_edge.convert.onnx", "coreml": "instaflow_edge.convert.coreml"}


def export(config: ConvertConfig) -> dict:
    """Export ``config.model`` for ``config.target``; returns the written manifest."""
    config.validate()
    name = config.target.value
    importlib.import_module(_TARGET_MODULES[name])
    return TARGETS[name](config)
