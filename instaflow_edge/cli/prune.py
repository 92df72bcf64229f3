"""``instaflow-edge prune MODEL --method blocks|channels [--variant V] [--ratio R] -o OUT``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..train.prune import DEFAULT_RATIO, BlockVariant, PruneMethod


def prune_command(
    model: str = typer.Argument(..., help="A pipeline folder whose UNet is a UNet2DConditionModel (e.g. a one-step student)."),
    output: Path = typer.Option(..., "-o", "--output", help="Output pipeline folder (the pruned UNet, the rest copied)."),
    method: PruneMethod = typer.Option(PruneMethod.blocks, "--method", help="blocks: BK-SDM block removal; channels: narrow every stage by importance."),
    variant: BlockVariant = typer.Option(BlockVariant.small, "--variant", help="blocks: small (mid-block + second pair per stage), base (pairs), mid (mid-block only)."),
    ratio: Optional[float] = typer.Option(None, "--ratio", help=f"channels: share of each stage's channels removed, in (0, 1) (default {DEFAULT_RATIO})."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow pickle (.bin) weights in MODEL; only for sources you trust."),
    force: bool = typer.Option(False, "--force", help="Overwrite OUTPUT if it exists."),
    threads: str = typer.Option("auto", "--threads", help="CPU threads: 'auto' follows the cores other programs leave free (re-checked every second), N fixes the count."),
) -> None:
    """Prune the UNet into a smaller diffusers config (recover it with `train distill`)."""
    from ..train.prune import PruneConfig, prune

    cfg = PruneConfig(model=model, output=str(output), method=method, variant=variant, ratio=ratio,
                      allow_pickle=allow_pickle, force=force, threads=threads)
    p = prune(cfg)["prune"]
    b, a = p["before"], p["after"]
    typer.echo(f"wrote {output}: UNet {b['params']:,} → {a['params']:,} params, {b['macs_per_image'] / 1e6:,.1f} → "
               f"{a['macs_per_image'] / 1e6:,.1f} M MACs/image ({100 * p['macs_reduction']:.1f}% fewer); "
               f"recover it with `instaflow-edge train distill {output} --pairs PAIRS --teacher {model}`")
