"""``instaflow-edge env``."""

from __future__ import annotations

import json

import typer


def env_command(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a list.")) -> None:
    """Print versions and hardware (paste this into bug reports)."""
    from ..envinfo import collect, format_text

    info = collect()
    typer.echo(json.dumps(info, indent=2) if as_json else format_text(info))
