"""``instaflow-edge convert MODEL --target onnx|coreml|openvino|web -o OUT``."""

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
from ..quantize.openvino import OvScheme
from ..quantize.schemes import (
    ENGINE_NAMES,
    QUANTIZABLE_COMPONENTS,
    CoreMLCompression,
    MinTarget,
    OnnxScheme,
    QuantEngine,
    listing,
)
from ..runtime.openvino import OvPrecision

_ENGINES = " or ".join(f"{e.value} ({ENGINE_NAMES[e]})" for e in QuantEngine)
_ATTENTIONS = " or ".join(f"{a.value} ({ATTENTION_FOR[a]})" for a in CoreMLAttention)
_LAYOUTS = "; ".join(f"{a.value}: {LAYOUT_FOR[a]}" for a in CoreMLLayout)


def convert_command(
    model: str = typer.Argument(..., help="Pipeline folder (diffusers layout) or hub id."),
    target: Target = typer.Option(Target.onnx, "--target", "-t", help="Export format."),
    output: Path = typer.Option(..., "-o", "--output", help="Output folder."),
    force: bool = typer.Option(False, "--force", help="Overwrite OUTPUT if it exists."),
    fused: bool = typer.Option(False, "--fused", help="Also export the whole one-step generator (token ids + noise → image) as one model."),
    height: Optional[int] = typer.Option(None, "--height", help="Image height (default: the model's)."),
    width: Optional[int] = typer.Option(None, "--width", help="Image width (default: the model's)."),
    min_psnr: Optional[float] = typer.Option(None, "--min-psnr", help="Parity gate in dB vs the PyTorch fp32 reference (default: the scheme's, see the manifest)."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow pickle (.bin) weights; only for sources you trust."),
    opset: int = typer.Option(18, "--opset", help="ONNX: opset version."),
    optimize: Optimize = typer.Option(Optimize.cpu, "--optimize", help="ONNX: ONNX Runtime graph optimization for this provider."),
    quantize: Optional[str] = typer.Option(None, "--quantize", help=f"ONNX: {listing(OnnxScheme)}; OpenVINO: {listing(OvScheme)}."),
    quantize_components: Optional[List[str]] = typer.Option(None, "--quantize-component", help=f"ONNX, OpenVINO: a component to quantize (repeatable: {', '.join(QUANTIZABLE_COMPONENTS)}; default: text_encoder and unet — the VAE decoder stays float unless named)."),
    engine: str = typer.Option(QuantEngine.ort.value, "--engine", help=f"ONNX: quantization engine, {_ENGINES}."),
    calibration_prompts: Optional[Path] = typer.Option(None, "--calibration-prompts", help="ONNX int8-static, OpenVINO int8/int8-hybrid: a text file, one prompt per line (default: the model's prompt set)."),
    layout: str = typer.Option(CoreMLLayout.apple.value, "--layout", help=f"Core ML: which program the packages are for ({_LAYOUTS})."),
    min_target: str = typer.Option(MinTarget.iOS17.value, "--min-target", help=f"Core ML: minimum deployment target ({listing(MinTarget, ', ')})."),
    precision: Optional[str] = typer.Option(None, "--precision", help=f"Core ML: compute precision, {listing(Precision)} (default fp16); OpenVINO: {listing(OvPrecision)} (default auto: the CPU's default, bf16 where it has bf16 units)."),
    attention: CoreMLAttention = typer.Option(CoreMLAttention.original, "--attention", help=f"Core ML: {_ATTENTIONS}."),
    compress: Optional[str] = typer.Option(None, "--compress", help=f"Core ML: {listing(CoreMLCompression, '|')}."),
    target_bits: Optional[float] = typer.Option(None, "--target-bits", help="Core ML mixed-bit: average bits per weight to reach."),
    sizes: Optional[str] = typer.Option(None, "--sizes", help="Core ML: more image sizes the models accept (enumerated shapes), e.g. 512x512,768x512."),
    parity_size: Optional[int] = typer.Option(None, "--parity-size", help="Core ML: image side of the PyTorch parity chain (default: the conversion size; 128 for fp16 packages of a full-size UNet, as PyTorch's CPU float16 is slow)."),
) -> None:
    """Export the one-step generator (text encoder, UNet+Euler step, VAE decoder) with parity gates."""
    from ..convert import ConvertConfig, export
    from ..parity import PsnrError, format_table

    cfg = ConvertConfig(
        model=model, output=str(output), target=target, force=force, fused=fused, height=height, width=width,
        min_psnr=min_psnr, allow_pickle=allow_pickle, opset=opset, optimize=optimize,
        quantize=None if target is Target.openvino else quantize, ov_quantize=quantize if target is Target.openvino else None,
        quantize_components=list(quantize_components) if quantize_components else None,
        engine=engine, calibration_prompts=str(calibration_prompts) if calibration_prompts else None,
        layout=layout, min_target=min_target, attention=attention,
        precision=Precision.fp16 if precision is None or target is Target.openvino else precision,
        ov_precision=(precision or OvPrecision.auto) if target is Target.openvino else OvPrecision.auto, compress=compress, target_bits=target_bits, sizes=sizes,
        parity_size=parity_size,
    )
    try:
        manifest = export(cfg)
    except PsnrError as e:
        if cfg.target in (Target.onnx, Target.openvino, Target.web) and e.rows:  # the whole table, then the one-line error naming every miss
            typer.echo(format_table(e.rows, e.gates))
        raise
    if cfg.target in (Target.onnx, Target.openvino, Target.web):
        typer.echo(format_table(manifest["parity"], manifest["gates"]))
        if cfg.target is Target.web:
            typer.echo(f"open it: instaflow-edge serve {output}", err=True)
    else:
        from ..convert.coreml_check import format_report

        typer.echo(format_report(manifest["report"], manifest["gate"]["min_psnr"]), err=True)
