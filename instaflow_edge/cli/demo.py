"""``instaflow-edge demo``."""

from __future__ import annotations

from pathlib import Path

import typer


def demo_command(
    output: Path = typer.Option(Path("runs/demo"), "-o", "--output", help="Folder for every stage's model and the results."),
    quick: bool = typer.Option(False, "--quick", help="Small numbers everywhere (≈ 3 min; CI): shows the plumbing, not the claim."),
    seed: int = typer.Option(0, "--seed", help="Seed of every stage."),
    force: bool = typer.Option(False, "--force", help="Delete OUTPUT and start over (default: resume, reusing finished stages)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """The InstaFlow recipe on the bundled digits, end to end: init → teacher → reflow → distill → eval table.

    Compares, with the same eval (prompt accuracy, digits-FID, fixed seeds): the 1-RF teacher at 1 and many
    steps, the 2-RF at 1 and many steps, a student distilled from the 1-RF directly, and the InstaFlow
    student (2-RF + distill). Writes OUTPUT/results.json and results.md. Rerunning resumes.
    """
    from ..digits.demo import DemoConfig, run_demo

    run_demo(DemoConfig(output=str(output), quick=quick, seed=seed, force=force, progress=progress), log=typer.echo)
