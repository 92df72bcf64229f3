"""``instaflow-edge report MODEL [EXPORT ...] -o REPORT/``: images, parity, sizes, quality and latency of
every export on one page."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def report_command(
    model: str = typer.Argument(..., help="The pipeline folder the exports were made from (the PyTorch reference)."),
    exports: Optional[List[str]] = typer.Argument(None, help="Export folders of any format (each run by its own runtime), each optionally LABEL=DIR."),
    output: Path = typer.Option(..., "-o", "--output", help="The report folder to write (report.html, report.md, report.json, PNGs)."),
    bench: Optional[List[Path]] = typer.Option(None, "--bench", help="A JSON result of `instaflow-edge bench` for the latency table (repeatable: CPU and GPU)."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="A text file, one prompt per line (default: four fixed prompts)."),
    seed: int = typer.Option(0, "--seed", help="Prompt i starts from the noise of seed+i."),
    digits_images: int = typer.Option(500, "--digits-images", help="Digits models: images per runtime for the judge's accuracy and FID (0: skip)."),
    force: bool = typer.Option(False, "--force", help="Overwrite OUTPUT if it exists."),
) -> None:
    """Write a parity report: image grid, heat maps, parity vs gates, sizes, latency, a verdict per export."""
    from ..report.build import ReportConfig, make_report

    cfg = ReportConfig(model=model, output=str(output), exports=list(exports or []), bench=[str(b) for b in bench or []],
                       prompts=str(prompts) if prompts else None, seed=seed, digits_images=digits_images, force=force)
    report = make_report(cfg)
    for v in report["verdicts"].values():
        typer.echo(v["line"])
    typer.echo(f"wrote {output}/report.html, report.md, report.json")
