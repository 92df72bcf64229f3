"""``instaflow-edge bench MODEL [EXPORT ...] -o FILE.json``: one-step latency of the torch reference and
every export (interleaved rounds, paired ratios, median/p90, peak RSS, % of the measured matmul peak)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ..bench.latency import BenchDevice


def bench_command(
    model: str = typer.Argument(..., help="The pipeline folder the exports were made from (the torch reference)."),
    exports: Optional[List[str]] = typer.Argument(None, help="Export folders (ONNX, OpenVINO, ExecuTorch or Core ML), each optionally LABEL=DIR."),
    output: Path = typer.Option(..., "-o", "--output", help="The JSON result to write."),
    threads: int = typer.Option(1, "--threads", help="Intra-op threads for torch, onnxruntime, OpenVINO and ExecuTorch."),
    device: BenchDevice = typer.Option(BenchDevice.cpu, "--device", help="cpu, or cuda: the GPU reference (torch fp16 eager and torch.compile; exports through ORT's CUDA provider)."),
    repeats: int = typer.Option(5, "--repeats", help="Timed rounds (each runs every runtime once)."),
    warmup: int = typer.Option(1, "--warmup", help="Untimed rounds first."),
    sequential: bool = typer.Option(False, "--sequential", help="Load and time one runtime at a time (less memory; ratios of medians instead of paired per-round ratios)."),
    note: Optional[str] = typer.Option(None, "--note", help="Free text stored in the JSON (e.g. what else the machine was running)."),
    force: bool = typer.Option(False, "--force", help="Overwrite OUTPUT if it exists."),
) -> None:
    """Time the one-step image through PyTorch and every export: per stage and end to end."""
    from ..bench.latency import BenchConfig, bench
    from ..bench.tables import table

    cfg = BenchConfig(model=model, exports=list(exports or []), output=str(output), threads=threads, device=device,
                      warmup=warmup, repeats=repeats, sequential=sequential, note=note, force=force)
    result = bench(cfg)
    typer.echo(table(result))
    typer.echo(f"wrote {output}")
