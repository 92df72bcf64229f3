"""``convert``'s config: one dataclass for every target, and the target registry.

Each target registers its export verb with ``@target(Target.x)``; ``export(config)`` dispatches. A
config is checked and normalized once, when it is made (``__post_init__``: choices become enums,
numbers and option combinations are checked), so a made config is valid and nothing changes it later.
Options that belong to another target are refused (a Core ML ``--compress`` on an ONNX export is a
mistake, not something to ignore). This module is imported by ``--help``: keep it light.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from typing import Callable, ClassVar

from ..errors import InputError
from ..quantize import coreml as cq
from ..quantize.openvino import OvScheme
from ..quantize.schemes import (
    QUANTIZABLE_COMPONENTS,
    CoreMLCompression,
    MinTarget,
    OnnxScheme,
    QuantEngine,
)
from ..validators import (
    MAX_IMAGE_SIDE,
    boolean,
    choice,
    flag,
    image_side,
    integer,
    number,
    optional_choice,
)
from ..runtime.openvino import OvPrecision

MIN_OPSET, MAX_OPSET = 14, 20  # 14: the attention ops; 20: the TorchScript exporter's last opset
INC_MIN_OPSET = 18  # --engine inc exports with the dynamo exporter, whose floor this is
_SIZE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")


class Target(str, enum.Enum):
    onnx = "onnx"
    coreml = "coreml"
    openvino = "openvino"
    web = "web"  # a static page running the ONNX export with onnxruntime-web (convert/web.py)


class Optimize(str, enum.Enum):
    cpu = "cpu"
    cuda = "cuda"
    none = "none"


class Precision(str, enum.Enum):
    fp16 = "fp16"
    fp32 = "fp32"


class CoreMLAttention(str, enum.Enum):
    """How the Core ML UNet computes attention: as exported (GPU), or Apple's split-einsum (Neural Engine)."""

    original = "original"
    split_einsum = "split-einsum"


ATTENTION_FOR = {CoreMLAttention.original: "GPU", CoreMLAttention.split_einsum: "Neural Engine"}


class CoreMLLayout(str, enum.Enum):
    """Which program the Core ML packages are for: Apple's Swift ``StableDiffusionPipeline`` (its names,
    shapes and dtypes; the Unet answers its DPM-Solver++ with ε) or our own one-step chain."""

    apple = "apple"
    native = "native"


LAYOUT_FOR = {CoreMLLayout.apple: "Apple's Swift StableDiffusion pipeline, --scheduler dpmpp --step-count 1",
              CoreMLLayout.native: "our one-step chain: Unet output is the final latent; generate --backend coreml"}


@dataclasses.dataclass
class ConvertConfig:
    """Options of ``instaflow-edge convert``. ONNX-only: opset, optimize, quantize, engine,
    calibration_prompts, quantize_components. Core ML-only: layout, min_target, precision, attention,
    compress, target_bits, sizes."""

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
    quantize: OnnxScheme | None = None
    engine: QuantEngine = QuantEngine.ort
    calibration_prompts: str | None = None
    quantize_components: list[str] | None = None  # None: the scheme's defaults (text encoder and UNet)
    # Core ML
    layout: CoreMLLayout = CoreMLLayout.apple
    min_target: MinTarget = MinTarget.iOS17
    precision: Precision = Precision.fp16
    attention: CoreMLAttention = CoreMLAttention.original
    compress: CoreMLCompression | None = None
    target_bits: float | None = None
    sizes: str | None = None  # Core ML: extra enumerated image sizes, "HxW,HxW"
    parity_size: int | None = None  # Core ML: image side of the PyTorch quality chain (None: coreml.quality_size)
    # OpenVINO (the CLI's --precision and --quantize; calibration_prompts is shared with ONNX int8-static)
    ov_precision: OvPrecision = OvPrecision.auto
    ov_quantize: OvScheme | None = None

    _ONNX_ONLY: ClassVar[dict] = {"opset": 18, "optimize": Optimize.cpu, "quantize": None, "engine": QuantEngine.ort,
                                  "calibration_prompts": None, "quantize_components": None}
    _COREML_ONLY: ClassVar[dict] = {"layout": CoreMLLayout.apple, "min_target": MinTarget.iOS17, "precision": Precision.fp16,
                                    "attention": CoreMLAttention.original, "compress": None, "target_bits": None,
                                    "sizes": None, "parity_size": None}
    _OPENVINO_ONLY: ClassVar[dict] = {"ov_precision": OvPrecision.auto, "ov_quantize": None}

    def __post_init__(self) -> None:
        self.target = choice("target", self.target, Target)
        for name in ("force", "fused", "allow_pickle"):
            setattr(self, name, boolean(name, getattr(self, name)))
        for name in ("height", "width", "parity_size"):
            setattr(self, name, image_side(name, getattr(self, name)))
        if self.min_psnr is not None:  # a negative gate would switch every gate off
            self.min_psnr = number("min_psnr", self.min_psnr, low=0.0)
        self.opset = integer("opset", self.opset, 1)
        self.optimize = choice("optimize", self.optimize, Optimize)
        self.quantize = optional_choice("quantize", self.quantize, OnnxScheme)
        self.engine = choice("engine", self.engine, QuantEngine)
        if self.quantize_components is not None:
            self.quantize_components = list(self.quantize_components)
        self.layout = choice("layout", self.layout, CoreMLLayout)
        self.min_target = choice("min_target", self.min_target, MinTarget)
        self.precision = choice("precision", self.precision, Precision)
        self.attention = choice("attention", self.attention, CoreMLAttention)
        self.compress = optional_choice("compress", self.compress, CoreMLCompression)
        if self.target_bits is not None:
            self.target_bits = number("target_bits", self.target_bits)
        self.ov_precision = choice("precision", self.ov_precision, OvPrecision)
        self.ov_quantize = optional_choice("quantize", self.ov_quantize, OvScheme)
        foreign = {Target.onnx: {**self._COREML_ONLY, **self._OPENVINO_ONLY},
                   Target.coreml: {**self._ONNX_ONLY, **self._OPENVINO_ONLY},
                   Target.openvino: {**{k: v for k, v in self._ONNX_ONLY.items() if k not in ("calibration_prompts", "quantize_components")},
                                     **self._COREML_ONLY},
                   Target.web: {**self._COREML_ONLY, **self._OPENVINO_ONLY}}[self.target]
        for name, default in foreign.items():
            if getattr(self, name) != default:
                raise InputError(f"{flag(name)} does not apply to --target {self.target.value}",
                                 "drop the option or change --target")
        if self.target is Target.web and self.fused:
            raise InputError("--fused does not apply to --target web: the page runs the three components to time each",
                             "drop --fused")
        if self.target in (Target.onnx, Target.web):
            self._check_onnx()
        elif self.target is Target.coreml:
            self._check_coreml()
        else:
            self._check_openvino()

    def _check_onnx(self) -> None:
        if not (MIN_OPSET <= self.opset <= MAX_OPSET):
            raise InputError(f"--opset {self.opset} is not supported", f"use an opset from {MIN_OPSET} to {MAX_OPSET} (default 18)")
        if self.engine is QuantEngine.inc:
            if self.quantize is not OnnxScheme.int8_static:
                raise InputError("--engine inc does int8-static only", "add --quantize int8-static, or use --engine ort")
            if self.opset < INC_MIN_OPSET:
                raise InputError(f"--engine inc exports with the dynamo exporter, which needs --opset ≥ {INC_MIN_OPSET}",
                                 f"pass --opset {INC_MIN_OPSET}")
        if self.quantize_components:
            if self.quantize is None or self.engine is QuantEngine.inc:
                raise InputError("--quantize-component needs --quantize (and --engine ort)",
                                 "add --quantize int8-static, or drop --quantize-component")
            bad = [c for c in self.quantize_components if c not in QUANTIZABLE_COMPONENTS]
            if bad:
                raise InputError(f"unknown --quantize-component {bad[0]!r}", f"choose from: {', '.join(QUANTIZABLE_COMPONENTS)}")
        if self.calibration_prompts and self.quantize is not OnnxScheme.int8_static:
            raise InputError("--calibration-prompts applies only to --quantize int8-static", "drop it or add --quantize int8-static")

    def _check_openvino(self) -> None:
        if self.fused:
            raise InputError("--fused does not apply to --target openvino", "drop --fused")
        if self.calibration_prompts and self.ov_quantize not in (OvScheme.int8, OvScheme.int8_hybrid):
            raise InputError("--calibration-prompts applies only to --quantize int8 or int8-hybrid",
                             "drop it or add --quantize int8")
        if self.quantize_components:
            if self.ov_quantize is None:
                raise InputError("--quantize-component needs --quantize", "add --quantize int8, or drop --quantize-component")
            bad = [c for c in self.quantize_components if c not in QUANTIZABLE_COMPONENTS]
            if bad:
                raise InputError(f"unknown --quantize-component {bad[0]!r}", f"choose from: {', '.join(QUANTIZABLE_COMPONENTS)}")

    def _check_coreml(self) -> None:
        if self.layout is CoreMLLayout.apple and self.fused:
            raise InputError("--fused adds Generator.mlpackage, which Apple's Swift pipeline never loads (it runs "
                             "TextEncoder, Unet and VAEDecoder); --layout apple does not take it",
                             "drop --fused, or pass --layout native --fused for the fused generator")
        cq.validate(self.compress, self.min_target, self.target_bits)
        if self.sizes is not None:
            parse_sizes(self.sizes)


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """``--sizes "512x512,768x512"`` → ``[(512, 512), (768, 512)]`` (height, width)."""
    out = []
    for part in str(text).split(","):
        m = _SIZE.match(part)
        if not m:
            raise InputError(f"--sizes: {part.strip()!r} is not HEIGHTxWIDTH", "pass e.g. --sizes 512x512,768x512")
        h, w = int(m.group(1)), int(m.group(2))
        if not (0 < h <= MAX_IMAGE_SIDE and 0 < w <= MAX_IMAGE_SIDE):
            raise InputError(f"--sizes: {part.strip()!r} is not 1 to {MAX_IMAGE_SIDE} pixels a side", "pass e.g. --sizes 512x512,768x512")
        out.append((h, w))
    return out


ExportFn = Callable[[ConvertConfig], dict]
TARGETS: dict[Target, ExportFn] = {}


def target(name: Target):
    """Register ``fn(config) -> manifest`` as the exporter of target ``name``."""

    def deco(fn: ExportFn) -> ExportFn:
        TARGETS[Target(name)] = fn
        return fn

    return deco
