"""``instaflow-edge quantize ONNX_DIR --scheme fp16|int8-dynamic|int8-static -o OUT``."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ..quantize.schemes import OnnxScheme, listing


def quantize_command(
    source: Path = typer.Argument(..., help="An fp32 ONNX export folder (instaflow-edge convert --target onnx)."),
    scheme: str = typer.Option(..., "--scheme", "-s", help=f"{listing(OnnxScheme)}."),
    output: Path = typer.Option(..., "-o", "--output", help="Output folder."),
    components: Optional[List[str]] = typer.Option(None, "--component", "-c", help="Component to quantize (repeatable; default: text_encoder and unet)."),
    calibration_prompts: Optional[Path] = typer.Option(None, "--calibration-prompts", help="int8-static: a text file, one prompt per line."),
    min_psnr: Optional[float] = typer.Option(None, "--min-psnr", help="Parity gate in dB vs the fp32 source (default: the scheme's)."),
    force: bool = typer.Option(False, "--force", help="Overwrite OUTPUT if it exists."),
) -> None:
    """Quantize an ONNX export with onnxruntime's quantizer, gated against the fp32 export."""
    from ..parity import PsnrError, format_table
    from ..quantize.onnx_folder import QuantizeConfig, quantize

    cfg = QuantizeConfig(source=str(source), output=str(output), scheme=scheme, components=list(components) if components else None,
                         calibration_prompts=str(calibration_prompts) if calibration_prompts else None,
                         min_psnr=min_psnr, force=force)
    try:
        manifest = quantize(cfg)
    except PsnrError as e:
        if e.rows:  # the whole table, then the one-line error naming every miss
            typer.echo(format_table(e.rows, e.gates))
        raise
    typer.echo(format_table(manifest["parity"], manifest["gates"], manifest.get("conditioning")))
    typer.echo(f"wrote {output} ({cfg.scheme.value}: {', '.join(manifest['quantize']['components'])})")
