"""instaflow_edge.convert: export the one-step generator to every target (ONNX, Core ML, OpenVINO, web).

``export(ConvertConfig(model, output, options=OnnxOptions(...)))`` is the verb; it returns the manifest
(the CLI prints its parity table). The options' type is the target; each options class names the module
whose exporter registers in ``config.TARGETS``, imported here on first use, so ``import
instaflow_edge.convert`` stays light.
"""

from __future__ import annotations

import importlib

from .config import (  # noqa: F401  (the package's API)
    OPTIONS,
    TARGETS,
    ConvertConfig,
    CoreMLOptions,
    OnnxOptions,
    OpenVINOOptions,
    Target,
    WebOptions,
    target,
)


def export(config: ConvertConfig) -> dict:
    """Export ``config.model`` for its options' target (the config was checked when it was made); returns
    the written manifest."""
    importlib.import_module(type(config.options).module)
    return TARGETS[config.target](config)
