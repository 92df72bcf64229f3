"""``instaflow-edge merge MODEL -o OUT [--lora FILE[:SCALE]]... [--delta FINETUNE --base BASE [--alpha A]]``."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def merge_command(
    model: str = typer.Argument(..., help="The pipeline to personalize (e.g. the one-step student)."),
    output: Path = typer.Option(..., "-o", "--output", help="Output pipeline folder (MODEL with the weights fused)."),
    lora: Optional[List[str]] = typer.Option(None, "--lora", help="A LoRA file, diffusers/peft or kohya (civitai) "
                                             "layout, optionally FILE:SCALE (default 1); repeatable, fused in order."),
    delta: Optional[str] = typer.Option(None, "--delta", help="A fine-tune of BASE: adds ALPHA·(FINETUNE − BASE) to the "
                                        "UNet and text encoder (InstaFlow's way to carry a fine-tune of SD1.5 over)."),
    base: Optional[str] = typer.Option(None, "--base", help="The model --delta was fine-tuned from (MODEL's architecture)."),
    alpha: float = typer.Option(1.0, "--alpha", help="Weight of the --delta."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow pickle (.bin) weights and LoRA files (plain "
                                      "tensors only); only for sources you trust."),
    force: bool = typer.Option(False, "--force", help="Overwrite OUTPUT if it exists."),
) -> None:
    """Fuse LoRAs and fine-tune deltas into MODEL's weights: an ordinary pipeline every target exports."""
    from ..merge import MergeConfig, merge

    cfg = MergeConfig(model=model, output=str(output), loras=list(lora or []), delta=delta, base=base, alpha=alpha,
                      allow_pickle=allow_pickle, force=force)
    m = merge(cfg)
    parts = []
    for r in m["merge"]:
        if "lora" in r:
            layers = ", ".join(f"{n} {c}" for c, n in r["layers_fused"].items() if n)
            parts.append(f"{r['lora']} ×{r['scale']:g} ({r['layout']}: {layers} layers)")
        else:
            parts.append(f"{r['alpha']:g}·({r['delta']} − {r['base']}) ({sum(r['tensors_changed'].values())} tensors)")
    typer.echo(f"wrote {output}: merged " + "; ".join(parts))
