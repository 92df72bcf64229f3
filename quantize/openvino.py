"""NNCF quantization of OpenVINO models: ``convert --target openvino --quantize SCHEME``.

- ``int8``: post-training static quantization (``nncf.quantize``, FakeQuantize on activations and
  weights of convolutions and matmuls), calibrated on the inputs our fp32 pipeline gives each component
  for the calibration prompts (``quantize/onnx.py: calibration_feeds``, the same set the ONNX int8-static
  export uses). ``ModelType.TRANSFORMER`` for the text encoder and UNet keeps softmax/attention scores
  float, as NNCF recommends for transformer blocks.
- ``int8-hybrid``: what optimum-intel does for diffusion UNets: convolutions fully quantized (static,
  calibrated), every other weight int8 weight-only (``compress_weights``); matmul activations stay float.
- ``int8-weights`` / ``int4-weights``: weight-only compression (``nncf.compress_weights``), no
  calibration; int4 is asymmetric per group of 64 (adjusted where a layer's width is not a multiple) with the first/last
  layers kept int8 (NNCF's default).

Import-light: this module is read by ``--help`` (the enum); nncf loads inside the functions.
"""

from __future__ import annotations

import enum

from ..errors import InputError, MissingDependencyError, quiet_loggers

# the default gates (dB vs the PyTorch fp32 reference) per scheme; see docs/openvino.md for the figures
SCHEME_MIN_PSNR = {"int8": 25.0, "int8-hybrid": 25.0, "int8-weights": 30.0, "int4-weights": 15.0}
# components a scheme applies to unless told otherwise: the decoder stays float (int8 costs its image
# quality most, as with ONNX int8-static: 28 dB on sd15)
DEFAULT_COMPONENTS = ("text_encoder", "unet", "unet_velocity")
CALIBRATED = ("int8", "int8-hybrid")


class OvScheme(str, enum.Enum):
    """``convert --target openvino --quantize``: NNCF's schemes."""

    int8 = "int8"
    int8_hybrid = "int8-hybrid"
    int8_weights = "int8-weights"
    int4_weights = "int4-weights"


def require_nncf():
    try:
        import nncf
    except ImportError as e:
        raise MissingDependencyError("NNCF is not installed", "pip install -c constraints.txt -e '.[openvino]'") from e
    return nncf


def quantize_model(model, scheme: OvScheme | str, component: str, feeds: list[dict] | None):
    """``model`` (an ``ov.Model``) quantized with ``scheme``; ``feeds`` are the calibration inputs (one
    dict of numpy arrays per sample, keyed by input name) for the calibrated schemes. Returns a new model."""
    scheme = OvScheme(scheme)
    nncf = require_nncf()
    with quiet_loggers("nncf"):  # NNCF logs every step at INFO; our progress lines say it; restored after
        return _quantize(nncf, model, scheme, component, feeds)


def _quantize(nncf, model, scheme: OvScheme, component: str, feeds: list[dict] | None):
    transformer = component in ("text_encoder", "unet", "unet_velocity")
    if scheme in (OvScheme.int8_weights, OvScheme.int4_weights):
        mode = nncf.CompressWeightsMode.INT8_ASYM if scheme is OvScheme.int8_weights else nncf.CompressWeightsMode.INT4_ASYM
        kw = {} if scheme is OvScheme.int8_weights else {
            "group_size": 64, "ratio": 1.0,  # a layer whose width is not a multiple of 64 takes the nearest group that fits
            "advanced_parameters": nncf.AdvancedCompressionParameters(group_size_fallback_mode=nncf.GroupSizeFallbackMode.ADJUST)}
        return nncf.compress_weights(model, mode=mode, **kw)
    if not feeds:
        raise InputError(f"NNCF {scheme.value} of {component} needs calibration inputs, none were given",
                         "pass calibration prompts (the scheme is calibrated)")
    dataset = nncf.Dataset(feeds)
    kw = {"subset_size": len(feeds), "model_type": nncf.ModelType.TRANSFORMER if transformer else None}
    if scheme is OvScheme.int8:
        return nncf.quantize(model, dataset, **kw)
    # int8-hybrid: activations quantized only at convolutions, then the remaining float weights int8
    matmuls = [op.get_friendly_name() for op in model.get_ops() if op.get_type_name() == "MatMul"]
    q = nncf.quantize(model, dataset, ignored_scope=nncf.IgnoredScope(names=matmuls, validate=False), **kw)
    return nncf.compress_weights(q, mode=nncf.CompressWeightsMode.INT8_ASYM)
