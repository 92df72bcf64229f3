"""``instaflow-edge init PRESET OUT``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..presets import preset_names


def init_command(
    preset: str = typer.Argument(..., help="Preset to build: " + ", ".join(preset_names()) + "."),
    output: Path = typer.Argument(..., help="Output pipeline folder (diffusers layout)."),
    seed: int = typer.Option(0, "--seed", help="Weight seed: the same seed gives identical weights."),
    force: bool = typer.Option(False, "--force", help="Overwrite OUTPUT if it exists."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars for builds that train (digits)."),
    threads: Optional[str] = typer.Option(None, "--threads", help="Presets that train (digits): CPU threads: 'auto' follows the cores other programs leave free (re-checked every second), N fixes the count (default: every core, fixed, so the same seed gives the same weights)."),
) -> None:
    """Write a preset base pipeline.

    Presets: tiny (seconds, random weights, for tests); sd15 (the full SD1.5/InstaFlow-0.9B architecture
    at 512×512, ~1.07 B random parameters, ~4.3 GB in fp32); digits (the digits demo's base: text tower
    and VAE trained here on the bundled digits, random UNet; about 2 minutes on a CPU).
    """
    import time

    from ..presets import InitConfig, get_preset, init

    cfg = InitConfig(preset=preset, output=str(output), seed=seed, force=force, progress=progress,
                     options={"threads": threads} if threads is not None else {})
    typer.echo(f"building preset {preset!r}: {get_preset(preset).description}")
    t0 = time.perf_counter()
    init(cfg)
    typer.echo(f"wrote {output} in {time.perf_counter() - t0:.1f} s")
