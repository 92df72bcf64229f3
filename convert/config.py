"""``convert``'s config: the fields every target shares, one options dataclass per target, and the
target registry.

Each target registers its export verb with ``@target(Target.x)``; ``export(config)`` dispatches on the
options' type (``OPTIONS``). A config is checked and normalized once, when it is made
(``__post_init__``: choices become enums, numbers and option combinations are checked), so a made config
is valid and nothing changes it later. Options of another target cannot be expressed in Python (they are
not fields of the target's options); ``ConvertConfig.of`` refuses them by name for the command line.
This module is imported by ``--help``: keep it light.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import re
from typing import Callable, ClassVar

from ..errors import InputError
from ..runtime import BUILTIN
from ..quantize import coreml as cq
from ..quantize.schemes import (
    QUANTIZABLE_COMPONENTS,
    CoreMLCompression,
    MinTarget,
    OnnxScheme,
    OvScheme,
    QuantEngine,
    get_scheme,
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


# the built-in targets, named in the format registry's one table (runtime.BUILTIN); web is a static page
# running the ONNX export with onnxruntime-web (convert/web.py)
Target = enum.Enum("Target", {n: n for n in BUILTIN}, type=str)
Target.__doc__ = "``convert TARGET``: the built-in export targets."


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


def opt(default=None, help: str = "", flag: str | None = None):
    """An options field with its command-line help (and spelling, when not ``--field-name``): the
    ``convert`` subcommands are built from these fields (``cli/convert.py``)."""
    return dataclasses.field(default=default, metadata={"help": help, **({"flag": flag} if flag else {})})


_QC_HELP = ("A component to quantize (repeatable: " + ", ".join(QUANTIZABLE_COMPONENTS)
            + "; default: the scheme's, text_encoder and unet — the VAE decoder stays float unless named).")
_QP_HELP = "A parameter of the scheme, NAME=VALUE (repeatable), e.g. group_size=32 for OpenVINO int4-weights."
_CAL_HELP = "A text file, one prompt per line, for calibrated schemes (default: the model's prompt set)."


def _components(name: str, comps) -> list[str] | None:
    if comps is None:
        return None
    comps = list(comps)
    bad = [c for c in comps if c not in QUANTIZABLE_COMPONENTS]
    if bad:
        raise InputError(f"unknown --quantize-component {bad[0]!r}", f"choose from: {', '.join(QUANTIZABLE_COMPONENTS)}")
    return comps


def _params(v) -> dict | None:
    if v is None:
        return None
    if not isinstance(v, dict) or not all(isinstance(k, str) for k in v):
        raise InputError(f"--quantize-param: expected NAME=VALUE pairs, got {v!r}", "pass e.g. --quantize-param group_size=32")
    return dict(v)


@dataclasses.dataclass
class OnnxOptions:
    """ONNX Runtime: optimum's folder layout (text_encoder/, unet/, vae_decoder/ model.onnx).

    The graphs (opset, ONNX Runtime optimization) and an optional scheme of ``quantize/schemes.py``
    (``quantize_params``: its parameters, ``quantize_components``: where it applies)."""

    target: ClassVar[str] = "onnx"
    module: ClassVar[str] = "instaflow_edge.convert.onnx"
    opset: int = opt(18, "ONNX opset version.")
    optimize: Optimize = opt(Optimize.cpu, "ONNX Runtime graph optimization for this provider.")
    quantize: OnnxScheme | None = opt(None, "A quantization scheme (quantize/schemes.py).")
    engine: QuantEngine = opt(QuantEngine.ort, "Quantization engine: ort (onnxruntime) or inc (Intel Neural Compressor).")
    calibration_prompts: str | None = opt(None, _CAL_HELP)
    quantize_components: list[str] | None = opt(None, _QC_HELP, "--quantize-component")  # None: the scheme's defaults
    quantize_params: dict | None = opt(None, _QP_HELP, "--quantize-param")

    def __post_init__(self) -> None:
        self.opset = integer("opset", self.opset, 1)
        self.optimize = choice("optimize", self.optimize, Optimize)
        self.quantize = optional_choice("quantize", self.quantize, OnnxScheme)
        self.engine = choice("engine", self.engine, QuantEngine)
        self.quantize_components = _components("quantize_components", self.quantize_components)
        self.quantize_params = _params(self.quantize_params)
        if not (MIN_OPSET <= self.opset <= MAX_OPSET):
            raise InputError(f"--opset {self.opset} is not supported", f"use an opset from {MIN_OPSET} to {MAX_OPSET} (default 18)")
        if self.engine is QuantEngine.inc:
            if self.quantize is not OnnxScheme.int8_static:
                raise InputError("--engine inc does int8-static only", "add --quantize int8-static, or use --engine ort")
            if self.opset < INC_MIN_OPSET:
                raise InputError(f"--engine inc exports with the dynamo exporter, which needs --opset ≥ {INC_MIN_OPSET}",
                                 f"pass --opset {INC_MIN_OPSET}")
        if self.quantize_components and (self.quantize is None or self.engine is QuantEngine.inc):
            raise InputError("--quantize-component needs --quantize (and --engine ort)",
                             "add --quantize int8-static, or drop --quantize-component")
        if self.quantize_params and self.quantize is None:
            raise InputError("--quantize-param needs --quantize", "add --quantize SCHEME, or drop --quantize-param")
        if self.quantize is not None:
            get_scheme("onnx", self.quantize).make_params(self.quantize_params)  # a bad parameter fails now
        if self.calibration_prompts and self.quantize is not OnnxScheme.int8_static:
            raise InputError("--calibration-prompts applies only to --quantize int8-static", "drop it or add --quantize int8-static")

    def check(self, cfg: "ConvertConfig") -> None:
        """Checks that need the whole config (none for ONNX)."""


@dataclasses.dataclass
class WebOptions(OnnxOptions):
    """A static page running the one-step generator with onnxruntime-web (WebGPU or WASM).

    The page runs the ONNX export; MODEL is a pipeline (exported here with these ONNX options) or an ONNX
    export folder (copied as it is)."""

    target: ClassVar[str] = "web"
    module: ClassVar[str] = "instaflow_edge.convert.web"
    after: ClassVar[str] = "open it: instaflow-edge serve {output}"

    def check(self, cfg: "ConvertConfig") -> None:
        if cfg.fused:
            raise InputError("--fused does not apply to --target web: the page runs the three components to time each",
                             "drop --fused")


@dataclasses.dataclass
class CoreMLOptions:
    """Core ML packages for Apple's Swift StableDiffusion pipeline (or our own one-step chain).

    Which program the packages are for, the deployment target, compute precision, attention
    implementation, an optional compression and the enumerated image sizes."""

    target: ClassVar[str] = "coreml"
    module: ClassVar[str] = "instaflow_edge.convert.coreml"
    own_report: ClassVar[bool] = True  # the CLI prints its per-package report (stderr), not the parity table
    layout: CoreMLLayout = opt(CoreMLLayout.apple, "Which program the packages are for: apple (Apple's Swift "
                               "StableDiffusion pipeline, --scheduler dpmpp --step-count 1) or native (our one-step chain).")
    min_target: MinTarget = opt(MinTarget.iOS17, "Minimum deployment target.")
    precision: Precision = opt(Precision.fp16, "Compute precision.")
    attention: CoreMLAttention = opt(CoreMLAttention.original, "original (GPU) or split-einsum (Neural Engine).")
    compress: CoreMLCompression | None = opt(None, "A weight compression (quantize/coreml.py).")
    target_bits: float | None = opt(None, "mixed-bit: average bits per weight to reach.")
    sizes: str | None = opt(None, "More image sizes the models accept (enumerated shapes), e.g. 512x512,768x512.")
    parity_size: int | None = opt(None, "Image side of the PyTorch parity chain (default: the conversion size; 128 for "
                                  "fp16 packages of a full-size UNet, as PyTorch's CPU float16 is slow).")

    def __post_init__(self) -> None:
        self.layout = choice("layout", self.layout, CoreMLLayout)
        self.min_target = choice("min_target", self.min_target, MinTarget)
        self.precision = choice("precision", self.precision, Precision)
        self.attention = choice("attention", self.attention, CoreMLAttention)
        self.compress = optional_choice("compress", self.compress, CoreMLCompression)
        if self.target_bits is not None:
            self.target_bits = number("target_bits", self.target_bits)
        self.parity_size = image_side("parity_size", self.parity_size)
        cq.validate(self.compress, self.min_target, self.target_bits)
        if self.sizes is not None:
            parse_sizes(self.sizes)

    def check(self, cfg: "ConvertConfig") -> None:
        if self.layout is CoreMLLayout.apple and cfg.fused:
            raise InputError("--fused adds Generator.mlpackage, which Apple's Swift pipeline never loads (it runs "
                             "TextEncoder, Unet and VAEDecoder); --layout apple does not take it",
                             "drop --fused, or pass --layout native --fused for the fused generator")


@dataclasses.dataclass
class OpenVINOOptions:
    """OpenVINO IR (model.xml + model.bin per component), static shapes, for the CPU.

    The CPU plugin's inference precision and an optional NNCF scheme of ``quantize/schemes.py``
    (calibrated ones take ``calibration_prompts``)."""

    target: ClassVar[str] = "openvino"
    module: ClassVar[str] = "instaflow_edge.convert.openvino"
    precision: OvPrecision = opt(OvPrecision.auto, "The CPU plugin's inference precision (auto: the CPU's default, "
                                 "bf16 where it has bf16 units).")
    quantize: OvScheme | None = opt(None, "An NNCF scheme (quantize/schemes.py).")
    calibration_prompts: str | None = opt(None, _CAL_HELP)
    quantize_components: list[str] | None = opt(None, _QC_HELP, "--quantize-component")
    quantize_params: dict | None = opt(None, _QP_HELP, "--quantize-param")

    def __post_init__(self) -> None:
        self.precision = choice("precision", self.precision, OvPrecision)
        self.quantize = optional_choice("quantize", self.quantize, OvScheme)
        self.quantize_components = _components("quantize_components", self.quantize_components)
        self.quantize_params = _params(self.quantize_params)
        if self.calibration_prompts and self.quantize not in (OvScheme.int8, OvScheme.int8_hybrid):
            raise InputError("--calibration-prompts applies only to --quantize int8 or int8-hybrid",
                             "drop it or add --quantize int8")
        if self.quantize_components and self.quantize is None:
            raise InputError("--quantize-component needs --quantize", "add --quantize int8, or drop --quantize-component")
        if self.quantize_params and self.quantize is None:
            raise InputError("--quantize-param needs --quantize", "add --quantize int4-weights, or drop --quantize-param")
        if self.quantize is not None:
            get_scheme("openvino", self.quantize).make_params(self.quantize_params)  # a bad parameter fails now

    def check(self, cfg: "ConvertConfig") -> None:
        if cfg.fused:
            raise InputError("--fused does not apply to --target openvino", "drop --fused")


TargetOptions = OnnxOptions | WebOptions | CoreMLOptions | OpenVINOOptions
# target name -> its options class, as loaded: the built-in ones by name from runtime.BUILTIN on first use,
# a plug-in's from register_target
OPTIONS: dict[str, type] = {}


def _key(name) -> str:
    return name.value if isinstance(name, enum.Enum) else name


def target_names() -> list[str]:
    return sorted(set(BUILTIN) | set(OPTIONS))


def options_class(name) -> type:
    """The options dataclass of target ``name`` (loaded on first use); unknown names list the known."""
    name = _key(target_name(name))
    if name not in OPTIONS:
        module, _, cls = BUILTIN[name][3].partition(":")
        OPTIONS[name] = getattr(importlib.import_module(module), cls)
    return OPTIONS[name]


def target_name(name) -> Target | str:
    """A built-in target as its enum member, a registered one as its name; unknown names list the known."""
    name = name.value if isinstance(name, enum.Enum) else name
    if name not in BUILTIN and name not in OPTIONS:
        raise InputError(f"unknown --target {name!r}", f"choose one of: {', '.join(target_names())}")
    return Target(name) if name in BUILTIN else name


@dataclasses.dataclass
class ConvertConfig:
    """Options of ``instaflow-edge convert``: what every target shares, and one options object whose type
    is the target (``OnnxOptions``, ``CoreMLOptions``, ``OpenVINOOptions``, ``WebOptions``). Options of
    another target cannot be expressed; :meth:`of` builds a config from flat command-line names and
    refuses, in one line, an option the target does not take."""

    model: str
    output: str
    options: TargetOptions = dataclasses.field(default_factory=OnnxOptions)
    force: bool = False
    fused: bool = False
    height: int | None = None
    width: int | None = None
    min_psnr: float | None = None  # None: the scheme's default gate, written into the manifest
    allow_pickle: bool = False
    target: Target = dataclasses.field(init=False)  # the options' target (recorded in the manifest)

    def __post_init__(self) -> None:
        name = getattr(type(self.options), "target", None)
        if not isinstance(name, str) or name not in target_names() or options_class(name) is not type(self.options):
            raise InputError(f"options of type {type(self.options).__name__} are not a convert target's",
                             f"pass the options of one of: {', '.join(target_names())}")
        self.target = target_name(name)
        for name in ("force", "fused", "allow_pickle"):
            setattr(self, name, boolean(name, getattr(self, name)))
        for name in ("height", "width"):
            setattr(self, name, image_side(name, getattr(self, name)))
        if self.min_psnr is not None:  # a negative gate would switch every gate off
            self.min_psnr = number("min_psnr", self.min_psnr, low=0.0)
        self.options.check(self)

    @property
    def calibration_prompts(self) -> str | None:
        """The calibration prompts file, where the target takes one (an input: --force never replaces it)."""
        return getattr(self.options, "calibration_prompts", None)

    @classmethod
    def of(cls, target: Target | str, model: str, output: str, **flat) -> "ConvertConfig":
        """A config from flat option names (the command line's): the shared ones go to the config, the
        rest to ``target``'s options; one the target does not take (at a non-default value) is refused."""
        target = _key(target_name(target))
        opts_cls = options_class(target)
        shared = {f.name for f in dataclasses.fields(cls) if f.init} - {"model", "output", "options"}
        own = {f.name: f for f in dataclasses.fields(opts_cls)}
        common, mine = {}, {}
        for k, v in flat.items():
            if k in shared:
                common[k] = v
            elif k in own:
                mine[k] = v
            elif v is not None and v is not False and v != []:
                raise InputError(f"{flag(k)} does not apply to --target {target}", "drop the option or change --target")
        return cls(model=model, output=output, options=opts_cls(**mine), **common)


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
TARGETS: dict[str, ExportFn] = {}


def target(name: Target | str):
    """Register ``fn(config) -> manifest`` as the exporter of target ``name`` (configs whose options are
    ``OPTIONS[name]``)."""

    def deco(fn: ExportFn) -> ExportFn:
        TARGETS[target_name(name)] = fn
        return fn

    return deco


def register_target(options: type, exporter: ExportFn) -> None:
    """Add a target that is not built in: its options dataclass (``target``, ``module`` class variables,
    fields made with :func:`opt`, a ``check(config)`` method) and its exporter. ``convert NAME`` then
    exists on the command line, and ``ConvertConfig(options=options(...))`` dispatches to it."""
    OPTIONS[options.target] = options
    TARGETS[options.target] = exporter


def unregister_target(name: str) -> None:
    if name not in BUILTIN:
        OPTIONS.pop(name, None)
        TARGETS.pop(name, None)
