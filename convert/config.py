"""``convert``'s config: one dataclass for every target, and the target registry.

Each target registers its export verb with ``@target("name")``; ``export(config)`` dispatches. Options
that belong to another target are refused (a Core ML ``--compress`` on an ONNX export is a mistake,
not something to ignore). This module is imported by ``--help``: keep it light.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Callable

from ..errors import InputError


class Target(str, enum.Enum):
    onnx = "onnx"
    coreml = "coreml"


class Optimize(str, enum.Enum):
    cpu = "cpu"
    cuda = "cuda"
    none = "none"


class Precision(str, enum.Enum):
    fp16 = "fp16"
    fp32 = "fp32"


class Attention(str, enum.Enum):
    original = "original"
    split_einsum = "split-einsum"


@dataclasses.dataclass
class ConvertConfig:
    """Options of ``instaflow-edge convert``. ONNX-only: opset, optimize, quantize, engine,
    calibration_prompts. Core ML-only: min_target, precision, attention, compress, target_bits, sizes."""

    model: str
    output: str
    target: Target = Target.onnx
    force: bool = False
    fused: bool = False
    height: int | None = None
    width: int | None = None
    min_psnr: float | None = None  # None: the scheme's default gate, written into the manifest
    allow_pickle: bool = False
    # ONNX
    opset: int = 18
    optimize: Optimize = Optimize.cpu
    quantize: str | None = None  # fp16 | int8-dynamic | int8-static
    engine: str = "ort"  # ort | inc
    calibration_prompts: str | None = None
    quantize_components: list[str] | None = None  # None: the scheme's defaults (text encoder and UNet)
    # Core ML
    min_target: str = "iOS17"
    precision: Precision = Precision.fp16
    attention: Attention = Attention.original
    compress: str | None = None
    target_bits: float | None = None
    sizes: str | None = None  # Core ML: extra enumerated image sizes, "HxW,HxW"

    _ONNX_ONLY = {"opset": 18, "optimize": Optimize.cpu, "quantize": None, "engine": "ort", "calibration_prompts": None,
                  "quantize_components": None}
    _COREML_ONLY = {"min_target": "iOS17", "precision": Precision.fp16, "attention": Attention.original,
                    "compress": None, "target_bits": None, "sizes": None}

    def validate(self) -> None:
        try:
            self.target = Target(self.target)
        except ValueError:
            raise InputError(f"unknown target {self.target!r}", f"choose one of: {', '.join(t.value for t in Target)}") from None
        foreign = self._COREML_ONLY if self.target is Target.onnx else self._ONNX_ONLY
        for name, default in foreign.items():
            value = getattr(self, name)
            if (value.value if isinstance(value, enum.Enum) else value) != (default.value if isinstance(default, enum.Enum) else default):
                raise InputError(f"--{name.replace('_', '-')} does not apply to --target {self.target.value}",
                                 "drop the option or change --target")
        if self.min_psnr is not None and not (self.min_psnr == self.min_psnr):
            raise InputError("--min-psnr is NaN", "pass a number of dB, e.g. 35")


ExportFn = Callable[[ConvertConfig], dict]
TARGETS: dict[str, ExportFn] = {}


def target(name: str):
    """Register ``fn(config) -> manifest`` as the exporter of target ``name``."""

    def deco(fn: ExportFn) -> ExportFn:
        TARGETS[name] = fn
        return fn

    return deco
