"""``instaflow-edge init PRESET OUT``."""

from __future__ import annotations

from pathlib import Path

import typer

from ..presets import PRESETS


def init_command(
    preset: str = typer.Argument(..., help="Preset to build: " + ", ".join(sorted(PRESETS)) + "."),
    output: Path = typer.Argument(..., help="Output pipeline folder (diffusers layout)."),
    seed: int = typer.Option(0, "--seed", help="Weight seed: the same seed gives identical weights."),
    force: bool = typer.Option(False, "--force", help="Overwrite OUTPUT if it exists."),
) -> None:
    """Write a random-weight preset pipeline (for tests and conversion at real scale).

    Presets: tiny (seconds, for tests), sd15 (the full SD1.5/InstaFlow-0.9B architecture at 512×512,
    ~1.07 B parameters, ~4.3 GB in fp32).
    """
    import time

    from ..presets import InitConfig, get_preset, init

    cfg = InitConfig(preset=preset, output=str(output), seed=seed, force=force)
    cfg.validate()
    typer.echo(f"building preset {preset!r}: {get_preset(preset).description}")
    t0 = time.perf_counter()
    init(cfg)
    typer.echo(f"wrote {output} in {time.perf_counter() - t0:.1f} s")
