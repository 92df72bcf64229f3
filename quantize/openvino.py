"""NNCF quantization of OpenVINO models: ``convert --target openvino --quantize SCHEME``.

- ``int8``: post-training static quantization (``nncf.quantize``, FakeQuantize on activations and
  weights of convolutions and matmuls), calibrated on the inputs our fp32 pipeline gives each component
  for the calibration prompts (``quantize/calibration.py: Calibration.feeds``, the same set the ONNX int8-static
  export uses). ``ModelType.TRANSFORMER`` for the text encoder and UNet keeps softmax/attention scores
  float, as NNCF recommends for transformer blocks.
- ``int8-hybrid``: what optimum-intel does for diffusion UNets: convolutions fully quantized (static,
  calibrated), every other weight int8 weight-only (``compress_weights``); matmul activations stay float.
- ``int8-weights`` / ``int4-weights``: weight-only compression (``nncf.compress_weights``), no
  calibration; int4 is asymmetric per group of 64 (adjusted where a layer's width is not a multiple) with the first/last
  layers kept int8 (NNCF's default).

Import-light: nncf loads inside the functions. The records (gates, calibration, marks, parameters) are
``quantize/schemes.py``'s, registered here with ``@scheme("openvino", ...)``.
"""

from __future__ import annotations

import dataclasses

from ..errors import InputError, MissingDependencyError, quiet_loggers
from .schemes import OvScheme, get_scheme, scheme  # noqa: F401  (OvScheme: re-exported)

INT8_GATE_DB = 25.0
# components a scheme applies to unless told otherwise: the decoder stays float (int8 costs its image
# quality most, as with ONNX int8-static: 28 dB on sd15). The gates: docs/openvino.md has the figures.


@dataclasses.dataclass(frozen=True)
class Int4Params:
    """``--quantize int4-weights --quantize-param group_size=N``: weights per int4 scale (a layer whose
    width is not a multiple takes the nearest group size that fits)."""

    group_size: int = 64

    def __post_init__(self) -> None:
        if not (isinstance(self.group_size, int) and self.group_size in (16, 32, 64, 128, 256)):
            raise InputError(f"--quantize-param group_size={self.group_size}: not one of 16, 32, 64, 128, 256",
                             "pass group_size=64 (the default) or another power of two from 16 to 256")


def require_nncf():
    try:
        import nncf
    except ImportError as e:
        raise MissingDependencyError("NNCF is not installed", "pip install -c constraints.txt -e '.[openvino]'") from e
    return nncf


def quantize_model(model, scheme_name: OvScheme | str, component: str, feeds: list[dict] | None, params=None):
    """``model`` (an ``ov.Model``) quantized with scheme ``scheme_name``; ``feeds`` are the calibration
    inputs (one dict of numpy arrays per sample, keyed by input name) for the calibrated schemes.
    Returns a new model."""
    record = get_scheme("openvino", scheme_name)
    if record.calibrated and not feeds:
        raise InputError(f"NNCF {record.name} of {component} needs calibration inputs, none were given",
                         "pass calibration prompts (the scheme is calibrated)")
    nncf = require_nncf()
    with quiet_loggers("nncf"):  # NNCF logs every step at INFO; our progress lines say it; restored after
        return record.apply(nncf, model, component, feeds, params)


def _kw(component: str, feeds: list[dict]) -> dict:
    import nncf

    transformer = component in ("text_encoder", "unet", "unet_velocity")
    return {"subset_size": len(feeds), "model_type": nncf.ModelType.TRANSFORMER if transformer else None}


@scheme("openvino", OvScheme.int8, gate_db=INT8_GATE_DB, calibrated=True, marks=("FakeQuantize",),
        description="NNCF post-training static int8 (activations and weights of convolutions and matmuls)")
def _int8(nncf, model, component, feeds, params):
    return nncf.quantize(model, nncf.Dataset(feeds), **_kw(component, feeds))


@scheme("openvino", OvScheme.int8_hybrid, gate_db=INT8_GATE_DB, calibrated=True, marks=("FakeQuantize", "u8 weights"),
        description="optimum-intel's UNet recipe: convolutions static int8, every other weight int8 weight-only")
def _int8_hybrid(nncf, model, component, feeds, params):
    matmuls = [op.get_friendly_name() for op in model.get_ops() if op.get_type_name() == "MatMul"]
    q = nncf.quantize(model, nncf.Dataset(feeds), ignored_scope=nncf.IgnoredScope(names=matmuls, validate=False),
                      **_kw(component, feeds))
    return nncf.compress_weights(q, mode=nncf.CompressWeightsMode.INT8_ASYM)


@scheme("openvino", OvScheme.int8_weights, gate_db=30.0, marks=("u8 weights",),
        description="int8 weight-only compression (asymmetric), compute in the plugin's precision")
def _int8_weights(nncf, model, component, feeds, params):
    return nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)


@scheme("openvino", OvScheme.int4_weights, gate_db=15.0, marks=("u4 weights",), params=Int4Params,
        description="int4 weight-only compression, asymmetric per group; first/last layers int8 (NNCF's default)")
def _int4_weights(nncf, model, component, feeds, params):
    p = params or Int4Params()
    return nncf.compress_weights(
        model, mode=nncf.CompressWeightsMode.INT4_ASYM, group_size=p.group_size, ratio=1.0,
        advanced_parameters=nncf.AdvancedCompressionParameters(group_size_fallback_mode=nncf.GroupSizeFallbackMode.ADJUST))
