"""``instaflow-edge convert onnx|coreml|openvino|web MODEL -o OUT``: one subcommand per target, each
option typed by its own enum. ``convert MODEL --target T ...`` (the older spelling) still works: the
entry point rewrites it to ``convert T MODEL ...`` (:func:`legacy_argv`), and an option of another
target is refused in one line."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ..convert.config import (
    ATTENTION_FOR,
    LAYOUT_FOR,
    CoreMLAttention,
    CoreMLLayout,
    Optimize,
    Precision,
    Target,
)
from ..quantize.schemes import (
    ENGINE_NAMES,
    QUANTIZABLE_COMPONENTS,
    CoreMLCompression,
    MinTarget,
    OnnxScheme,
    OvScheme,
    QuantEngine,
)
from ..runtime.openvino import OvPrecision

_ENGINES = " or ".join(f"{e.value} ({ENGINE_NAMES[e]})" for e in QuantEngine)
_ATTENTIONS = " or ".join(f"{a.value} ({ATTENTION_FOR[a]})" for a in CoreMLAttention)
_LAYOUTS = "; ".join(f"{a.value}: {LAYOUT_FOR[a]}" for a in CoreMLLayout)

convert_app = typer.Typer(
    help="Export the one-step generator (text encoder, UNet+Euler step, VAE decoder) with parity gates: "
         "`convert TARGET MODEL -o OUT` (or `convert MODEL --target TARGET -o OUT`).",
    no_args_is_help=True)

# the options every target takes, as Typer parameters (each subcommand lists them)
MODEL = typer.Argument(..., help="Pipeline folder (diffusers layout) or hub id.")
OUTPUT = typer.Option(..., "-o", "--output", help="Output folder.")
FORCE = typer.Option(False, "--force", help="Overwrite OUTPUT if it exists.")
HEIGHT = typer.Option(None, "--height", help="Image height (default: the model's).")
WIDTH = typer.Option(None, "--width", help="Image width (default: the model's).")
MIN_PSNR = typer.Option(None, "--min-psnr", help="Parity gate in dB vs the PyTorch fp32 reference (default: the scheme's, see the manifest).")
ALLOW_PICKLE = typer.Option(False, "--allow-pickle", help="Allow pickle (.bin) weights; only for sources you trust.")
QUANTIZE_COMPONENTS = typer.Option(None, "--quantize-component", help=f"A component to quantize (repeatable: {', '.join(QUANTIZABLE_COMPONENTS)}; default: text_encoder and unet — the VAE decoder stays float unless named).")
QUANTIZE_PARAMS = typer.Option(None, "--quantize-param", help="A parameter of the scheme, NAME=VALUE (repeatable), e.g. group_size=32 for OpenVINO int4-weights.")
CALIBRATION = typer.Option(None, "--calibration-prompts", help="A text file, one prompt per line, for calibrated schemes (default: the model's prompt set).")


def _params(items: Optional[List[str]]) -> dict | None:
    from ..errors import InputError

    if not items:
        return None
    out = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise InputError(f"--quantize-param {item!r} is not NAME=VALUE", "pass e.g. --quantize-param group_size=32")
        out[k.strip()] = v.strip()
    return out


def _run(target: Target, model: str, output: Path, **flat) -> None:
    """Build the config, export, print the parity table (stdout) and notes (stderr)."""
    from ..convert import ConvertConfig, export
    from ..parity import PsnrError, format_table

    cfg = ConvertConfig.of(target, model, str(output), **flat)
    try:
        manifest = export(cfg)
    except PsnrError as e:
        if target is not Target.coreml and e.rows:  # the whole table, then the one-line error naming every miss
            typer.echo(format_table(e.rows, e.gates))
        raise
    if target is Target.coreml:
        from ..convert.coreml_check import format_report

        typer.echo(format_report(manifest["report"], manifest["gate"]["min_psnr"]), err=True)
        return
    typer.echo(format_table(manifest["parity"], manifest["gates"]))
    if target is Target.web:
        typer.echo(f"open it: instaflow-edge serve {output}", err=True)


@convert_app.command("onnx")
def onnx_command(
    model: str = MODEL, output: Path = OUTPUT, force: bool = FORCE,
    fused: bool = typer.Option(False, "--fused", help="Also export the whole one-step generator (token ids + noise → image) as one model."),
    height: Optional[int] = HEIGHT, width: Optional[int] = WIDTH, min_psnr: Optional[float] = MIN_PSNR,
    allow_pickle: bool = ALLOW_PICKLE,
    opset: int = typer.Option(18, "--opset", help="ONNX opset version."),
    optimize: Optimize = typer.Option(Optimize.cpu, "--optimize", help="ONNX Runtime graph optimization for this provider."),
    quantize: Optional[OnnxScheme] = typer.Option(None, "--quantize", help="A quantization scheme (quantize/schemes.py)."),
    quantize_components: Optional[List[str]] = QUANTIZE_COMPONENTS,
    quantize_params: Optional[List[str]] = QUANTIZE_PARAMS,
    engine: QuantEngine = typer.Option(QuantEngine.ort, "--engine", help=f"Quantization engine, {_ENGINES}."),
    calibration_prompts: Optional[Path] = CALIBRATION,
) -> None:
    """ONNX Runtime: optimum's folder layout (text_encoder/, unet/, vae_decoder/ model.onnx)."""
    _run(Target.onnx, model, output, force=force, fused=fused, height=height, width=width, min_psnr=min_psnr,
         allow_pickle=allow_pickle, opset=opset, optimize=optimize, quantize=quantize,
         quantize_components=list(quantize_components) if quantize_components else None,
         quantize_params=_params(quantize_params), engine=engine,
         calibration_prompts=str(calibration_prompts) if calibration_prompts else None)


@convert_app.command("web")
def web_command(
    model: str = typer.Argument(..., help="Pipeline folder (exported to ONNX here) or an ONNX export folder (copied as it is)."),
    output: Path = OUTPUT, force: bool = FORCE,
    height: Optional[int] = HEIGHT, width: Optional[int] = WIDTH, min_psnr: Optional[float] = MIN_PSNR,
    allow_pickle: bool = ALLOW_PICKLE,
    opset: int = typer.Option(18, "--opset", help="ONNX opset version."),
    optimize: Optimize = typer.Option(Optimize.cpu, "--optimize", help="ONNX Runtime graph optimization."),
    quantize: Optional[OnnxScheme] = typer.Option(None, "--quantize", help="A quantization scheme of the ONNX export."),
    quantize_components: Optional[List[str]] = QUANTIZE_COMPONENTS,
    quantize_params: Optional[List[str]] = QUANTIZE_PARAMS,
    engine: QuantEngine = typer.Option(QuantEngine.ort, "--engine", help=f"Quantization engine, {_ENGINES}."),
    calibration_prompts: Optional[Path] = CALIBRATION,
) -> None:
    """A static page running the one-step generator with onnxruntime-web (WebGPU or WASM)."""
    _run(Target.web, model, output, force=force, height=height, width=width, min_psnr=min_psnr,
         allow_pickle=allow_pickle, opset=opset, optimize=optimize, quantize=quantize,
         quantize_components=list(quantize_components) if quantize_components else None,
         quantize_params=_params(quantize_params), engine=engine,
         calibration_prompts=str(calibration_prompts) if calibration_prompts else None)


@convert_app.command("openvino")
def openvino_command(
    model: str = MODEL, output: Path = OUTPUT, force: bool = FORCE,
    height: Optional[int] = HEIGHT, width: Optional[int] = WIDTH, min_psnr: Optional[float] = MIN_PSNR,
    allow_pickle: bool = ALLOW_PICKLE,
    precision: OvPrecision = typer.Option(OvPrecision.auto, "--precision", help="The CPU plugin's inference precision (auto: the CPU's default, bf16 where it has bf16 units)."),
    quantize: Optional[OvScheme] = typer.Option(None, "--quantize", help="An NNCF scheme (quantize/schemes.py)."),
    quantize_components: Optional[List[str]] = QUANTIZE_COMPONENTS,
    quantize_params: Optional[List[str]] = QUANTIZE_PARAMS,
    calibration_prompts: Optional[Path] = CALIBRATION,
) -> None:
    """OpenVINO IR (model.xml + model.bin per component), static shapes, for the CPU."""
    _run(Target.openvino, model, output, force=force, height=height, width=width, min_psnr=min_psnr,
         allow_pickle=allow_pickle, precision=precision, quantize=quantize,
         quantize_components=list(quantize_components) if quantize_components else None,
         quantize_params=_params(quantize_params),
         calibration_prompts=str(calibration_prompts) if calibration_prompts else None)


@convert_app.command("coreml")
def coreml_command(
    model: str = MODEL, output: Path = OUTPUT, force: bool = FORCE,
    fused: bool = typer.Option(False, "--fused", help="Also export the whole one-step generator as one package (--layout native)."),
    height: Optional[int] = HEIGHT, width: Optional[int] = WIDTH, min_psnr: Optional[float] = MIN_PSNR,
    allow_pickle: bool = ALLOW_PICKLE,
    layout: CoreMLLayout = typer.Option(CoreMLLayout.apple, "--layout", help=f"Which program the packages are for ({_LAYOUTS})."),
    min_target: MinTarget = typer.Option(MinTarget.iOS17, "--min-target", help="Minimum deployment target."),
    precision: Precision = typer.Option(Precision.fp16, "--precision", help="Compute precision."),
    attention: CoreMLAttention = typer.Option(CoreMLAttention.original, "--attention", help=f"{_ATTENTIONS}."),
    compress: Optional[CoreMLCompression] = typer.Option(None, "--compress", help="A weight compression (quantize/coreml.py)."),
    target_bits: Optional[float] = typer.Option(None, "--target-bits", help="mixed-bit: average bits per weight to reach."),
    sizes: Optional[str] = typer.Option(None, "--sizes", help="More image sizes the models accept (enumerated shapes), e.g. 512x512,768x512."),
    parity_size: Optional[int] = typer.Option(None, "--parity-size", help="Image side of the PyTorch parity chain (default: the conversion size; 128 for fp16 packages of a full-size UNet, as PyTorch's CPU float16 is slow)."),
) -> None:
    """Core ML packages for Apple's Swift StableDiffusion pipeline (or our own one-step chain)."""
    _run(Target.coreml, model, output, force=force, fused=fused, height=height, width=width, min_psnr=min_psnr,
         allow_pickle=allow_pickle, layout=layout, min_target=min_target, precision=precision, attention=attention,
         compress=compress, target_bits=target_bits, sizes=sizes, parity_size=parity_size)


COMMANDS = {Target.onnx: onnx_command, Target.web: web_command, Target.openvino: openvino_command,
            Target.coreml: coreml_command}


def _flags(command) -> set[str]:
    """The option spellings a subcommand takes (from its Typer parameters)."""
    import inspect

    out = set()
    for p in inspect.signature(command).parameters.values():
        info = p.default
        for decl in getattr(info, "param_decls", None) or ():
            if decl.startswith("-"):
                out.add(decl)
    return out


def legacy_argv(argv: list[str]) -> list[str]:
    """``convert MODEL [--target T] ...`` → ``convert T MODEL ...`` (T defaults to onnx); other argv
    unchanged. An option that another target takes but T does not is a one-line error."""
    from ..errors import InputError

    names = {t.value for t in Target}
    if len(argv) < 2 or argv[0] != "convert" or argv[1] in names or argv[1].startswith("-") and argv[1] in ("-h", "--help"):
        return argv
    rest, target = [], "onnx"
    i = 1
    while i < len(argv):
        a = argv[i]
        if a in ("--target", "-t") and i + 1 < len(argv):
            target = argv[i + 1]
            i += 2
            continue
        if a.startswith("--target="):
            target = a.split("=", 1)[1]
            i += 1
            continue
        rest.append(a)
        i += 1
    if target not in names:
        raise InputError(f"unknown --target {target!r}", f"choose one of: {', '.join(sorted(names))}")
    own = _flags(COMMANDS[Target(target)]) | {"--help", "-h"}
    others = set().union(*(_flags(c) for t, c in COMMANDS.items() if t.value != target))
    for a in rest:
        f = a.split("=", 1)[0]
        if f.startswith("-") and f not in own and f in others:
            raise InputError(f"{f} does not apply to --target {target}", "drop the option or change --target")
    return ["convert", target, *rest]
