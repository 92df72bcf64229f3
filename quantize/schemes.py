"""The names of the quantization and compression choices, as ``str`` enums: the ONNX schemes and
engines, the Core ML compressions and deployment targets.

The registries that implement them (``quantize/onnx.py: SCHEMES``, ``quantize/coreml.py: SCHEMES``)
are keyed by these members, and the CLI's help lists them from here. This module is imported by
``--help``: keep it free of heavy imports (no torch, numpy, onnx, coremltools).
"""

from __future__ import annotations

import enum


class OnnxScheme(str, enum.Enum):
    """``convert --quantize`` / ``quantize --scheme``: onnxruntime's quantizers (``quantize/onnx.py``)."""

    fp16 = "fp16"
    int8_dynamic = "int8-dynamic"
    int8_static = "int8-static"


class QuantEngine(str, enum.Enum):
    """``convert --engine``: onnxruntime's quantizer, or Intel Neural Compressor (int8-static only)."""

    ort = "ort"
    inc = "inc"


ENGINE_NAMES = {QuantEngine.ort: "onnxruntime", QuantEngine.inc: "Intel Neural Compressor"}


class CoreMLCompression(str, enum.Enum):
    """``convert --target coreml --compress`` / ``eval --coreml-compress`` (``quantize/coreml.py``)."""

    palettize_4 = "palettize-4"
    palettize_6 = "palettize-6"
    palettize_8 = "palettize-8"
    int8 = "int8"
    prune_50 = "prune-50"
    prune_2_4 = "prune-2:4"
    prune_50_palettize_4 = "prune-50+palettize-4"
    mixed_bit = "mixed-bit"


class MinTarget(str, enum.Enum):
    """``convert --target coreml --min-target``: the oldest OS the packages run on."""

    iOS16 = "iOS16"
    iOS17 = "iOS17"
    iOS18 = "iOS18"
    macOS13 = "macOS13"
    macOS14 = "macOS14"
    macOS15 = "macOS15"


# the Core ML of each deployment target, as its iOS version: macOS13/14/15 run the Core ML of iOS16/17/18
MIN_TARGET_IOS = {MinTarget.iOS16: 16, MinTarget.iOS17: 17, MinTarget.iOS18: 18,
                  MinTarget.macOS13: 16, MinTarget.macOS14: 17, MinTarget.macOS15: 18}

# ONNX components a scheme can be applied to (``--quantize-component``), and those it applies to unless
# told otherwise: the VAE decoder stays fp32 (fp16 overflows there; int8 costs its image quality most),
# the fused generator stays fp32 (it contains the decoder). ``unet_velocity`` follows ``unet``.
QUANTIZABLE_COMPONENTS = ("text_encoder", "unet", "vae_decoder")
DEFAULT_COMPONENTS = ("text_encoder", "unet", "unet_velocity")


def listing(cls: type[enum.Enum], sep: str = " | ") -> str:
    """The values of ``cls`` for help texts: ``fp16 | int8-dynamic | int8-static``."""
    return sep.join(m.value for m in cls)
