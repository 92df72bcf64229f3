"""Every quantization scheme of every backend, as one record, and the names of the choices as ``str`` enums.

A :class:`Scheme` is what a backend's quantizer registers with ``@scheme(backend, name, ...)``: its
default gate (dB vs the PyTorch fp32 reference), whether it is calibrated, the components it applies to
unless told otherwise, the graph marks that show it was applied (``marks``: op types, or ``"<type>
weights"`` for a weight element type), its parameters (a dataclass, or None) and the function that
applies it. ``get_scheme(backend, name)`` loads the backend's module on first use; ``all_schemes()``
lists every record (the scheme contract test is parametrized over it). The enums are what the CLI
offers; a test checks they and the registry agree. This module is imported by ``--help``: keep it free
of heavy imports (no torch, numpy, onnx, coremltools).
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
from typing import Callable

from ..errors import InputError


class OnnxScheme(str, enum.Enum):
    """``convert --quantize`` / ``quantize --scheme``: onnxruntime's quantizers (``quantize/onnx.py``)."""

    fp16 = "fp16"
    int8_dynamic = "int8-dynamic"
    int8_static = "int8-static"


class OvScheme(str, enum.Enum):
    """``convert --target openvino --quantize``: NNCF's schemes (``quantize/openvino.py``)."""

    int8 = "int8"
    int8_hybrid = "int8-hybrid"
    int8_weights = "int8-weights"
    int4_weights = "int4-weights"


class EtScheme(str, enum.Enum):
    """``convert --target executorch --quantize``: PT2E with XNNPACK's quantizer (``quantize/executorch.py``)."""

    int8 = "int8"


class QnnScheme(str, enum.Enum):
    """``convert --target qnn --quantize``: QDQ for Qualcomm's HTP (``quantize/qnn.py``)."""

    w8a16 = "w8a16"
    w8a8 = "w8a8"


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


# the modules that register each backend's schemes
BACKEND_MODULES = {"onnx": "instaflow_edge.quantize.onnx", "openvino": "instaflow_edge.quantize.openvino",
                   "coreml": "instaflow_edge.quantize.coreml", "executorch": "instaflow_edge.quantize.executorch",
                   "qnn": "instaflow_edge.quantize.qnn"}
CHOICES: dict[str, type[enum.Enum]] = {"onnx": OnnxScheme, "openvino": OvScheme, "coreml": CoreMLCompression,
                                       "executorch": EtScheme, "qnn": QnnScheme}


@dataclasses.dataclass(frozen=True)
class Scheme:
    """One quantization scheme of one backend (see the module docstring)."""

    backend: str
    name: str
    gate_db: float
    apply: Callable
    calibrated: bool = False
    default_components: tuple[str, ...] = DEFAULT_COMPONENTS
    marks: tuple[str, ...] = ()
    params: type | None = None
    description: str = ""

    def make_params(self, values: dict | None):
        """The scheme's parameters from ``{name: value}`` (strings are converted to the field's type); a
        parameter the scheme does not take, or a bad value, is a one-line error naming it."""
        values = dict(values or {})
        if self.params is None:
            if values:
                raise InputError(f"--quantize {self.name} takes no parameters (got {', '.join(values)})",
                                 "drop --quantize-param")
            return None
        fields = {f.name: f for f in dataclasses.fields(self.params)}
        bad = [k for k in values if k not in fields]
        if bad:
            raise InputError(f"--quantize {self.name} has no parameter {bad[0]!r}",
                             f"its parameters: {', '.join(fields) or 'none'}")
        typed = {}
        for k, v in values.items():
            kind = fields[k].type if isinstance(fields[k].type, type) else {"int": int, "float": float}.get(str(fields[k].type), str)
            try:
                typed[k] = kind(v)
            except (TypeError, ValueError):
                raise InputError(f"--quantize-param {k}={v}: not a {kind.__name__}", f"pass {k}=<{kind.__name__}>") from None
        return self.params(**typed)  # the params dataclass checks its values in __post_init__


SCHEMES: dict[tuple[str, str], Scheme] = {}


def scheme(backend: str, name, *, gate_db: float, calibrated: bool = False,
           default_components: tuple[str, ...] = DEFAULT_COMPONENTS, marks: tuple[str, ...] = (),
           params: type | None = None, description: str = ""):
    """Register ``fn`` as the scheme ``name`` of ``backend`` (a member of that backend's enum)."""

    def deco(fn: Callable) -> Callable:
        value = CHOICES[backend](name).value
        SCHEMES[(backend, value)] = Scheme(backend, value, float(gate_db), fn, calibrated, tuple(default_components),
                                           tuple(marks), params, description)
        return fn

    return deco


def get_scheme(backend: str, name) -> Scheme:
    """The record of scheme ``name`` of ``backend`` (its module loaded on first use); an unknown name is a
    one-line error listing the backend's schemes."""
    if backend not in BACKEND_MODULES:
        raise InputError(f"no quantization schemes for {backend!r}", f"choose one of: {', '.join(BACKEND_MODULES)}")
    value = name.value if isinstance(name, enum.Enum) else str(name)
    if (backend, value) not in SCHEMES:
        importlib.import_module(BACKEND_MODULES[backend])
    if (backend, value) not in SCHEMES:
        known = [n for b, n in SCHEMES if b == backend]
        raise InputError(f"unknown {backend} scheme {value!r}", f"choose one of: {', '.join(known)}")
    return SCHEMES[(backend, value)]


def all_schemes(backends=tuple(BACKEND_MODULES)) -> list[Scheme]:
    """Every registered scheme of ``backends`` (their modules loaded)."""
    for b in backends:
        importlib.import_module(BACKEND_MODULES[b])
    return [s for (b, _), s in SCHEMES.items() if b in backends]
