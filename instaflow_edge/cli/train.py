"""``instaflow-edge train ...``: the training stages, on accelerate (`accelerate launch` for many GPUs).

The engine's options (:class:`EngineOptions`) are shared by every stage's command; each command turns
``--config FILE`` + its flags into the stage's config dataclass (:func:`resolve_config`: flags given on
the command line override the file, the file overrides the defaults) and calls the stage's verb.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from ..train.config import (
    AttentionKernel,
    LRSchedule,
    MixedPrecision,
    TrainConfig,
    field_default,
    merge_config,
    read_config_file,
)
from ..train.teacher import TeacherConfig

train_app = typer.Typer(
    help="Train: the 1-rectified-flow teacher (on accelerate; use `accelerate launch` for several processes).",
    no_args_is_help=True,
)

_D = lambda name: field_default(TrainConfig, name)  # noqa: E731  the library's defaults, shown in --help


class EngineOptions:
    """Typer options of the training engine, reused by every `train` command."""

    config = typer.Option(None, "--config", help="TOML or YAML file whose keys are these option names (flags override it).")
    work_dir = typer.Option(None, "--work-dir", help="Checkpoints and metrics.jsonl (default: OUTPUT.train).")
    max_steps = typer.Option(_D("max_steps"), "--max-steps", help="Optimizer steps in total.")
    batch_size = typer.Option(_D("batch_size"), "--batch-size", help="GLOBAL batch per optimizer step (all processes × accumulation).")
    gradient_accumulation_steps = typer.Option(_D("gradient_accumulation_steps"), "--gradient-accumulation-steps", help="Micro-steps per optimizer step.")
    learning_rate = typer.Option(_D("learning_rate"), "--learning-rate", "--lr", help="AdamW peak learning rate.")
    lr_schedule = typer.Option(_D("lr_schedule"), "--lr-schedule", help="After warm-up: constant, or cosine to 0 at --max-steps.")
    warmup_steps = typer.Option(_D("warmup_steps"), "--warmup-steps", help="Linear LR warm-up steps.")
    weight_decay = typer.Option(_D("weight_decay"), "--weight-decay", help="AdamW weight decay.")
    max_grad_norm = typer.Option(_D("max_grad_norm"), "--max-grad-norm", help="Gradient clipping norm (0: off).")
    ema_decay = typer.Option(_D("ema_decay"), "--ema-decay", help="EMA decay of the saved weights (0: no EMA, save raw weights).")
    mixed_precision = typer.Option(_D("mixed_precision"), "--mixed-precision", help="Autocast precision of forward/backward (weights stay fp32); bf16/fp16 pay off on GPUs.")
    gradient_checkpointing = typer.Option(_D("gradient_checkpointing"), "--gradient-checkpointing/--no-gradient-checkpointing", help="Recompute activations in backward (big UNets).")
    attention = typer.Option(_D("attention"), "--attention", help="UNet attention: sdpa (torch scaled_dot_product_attention) or eager.")
    checkpoint_every = typer.Option(_D("checkpoint_every"), "--checkpoint-every", help="Checkpoint every N steps and at the end (0: never).")
    keep_checkpoints = typer.Option(_D("keep_checkpoints"), "--keep-checkpoints", help="How many recent checkpoints to keep.")
    resume = typer.Option(None, "--resume", help="'latest' (newest checkpoint in the work dir) or a checkpoint folder.")
    seed = typer.Option(_D("seed"), "--seed", help="Seed of data order, noise, times and prompt dropout.")
    log_every = typer.Option(_D("log_every"), "--log-every", help="Write metrics every N steps.")
    cpu = typer.Option(False, "--cpu", help="Train on the CPU even when a GPU is visible.")
    threads = typer.Option(str(_D("threads")), "--threads", envvar="INSTAFLOW_EDGE_THREADS", help="CPU threads: 'auto' uses the cores other programs leave free (re-checked every second), N fixes the count (for bit-identical reruns and resumes).")
    force = typer.Option(False, "--force", help="Overwrite OUTPUT, and start over in a work dir that has checkpoints.")
    progress = typer.Option(True, "--progress/--no-progress", help="Show the progress bar.")


# the names of click's ParameterSource members for "not given by the user": compared by name so the CLI
# does not import click's internals (typer vendors its own click in some versions)
_DEFAULT_SOURCES = ("DEFAULT", "DEFAULT_MAP")


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether option ``name`` came from the user (command line, environment or prompt), not its default."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name not in _DEFAULT_SOURCES


def resolve_config(ctx: typer.Context, cls: type, config_file: Optional[Path]) -> Any:
    """The stage config from defaults ← ``--config`` file ← flags given on the command line."""
    params = {k: v for k, v in ctx.params.items() if k != "config"}
    explicit = {k: v for k, v in params.items() if _given(ctx, k)}
    file_values = read_config_file(config_file, cls) if config_file is not None else {}
    defaults = {k: v for k, v in params.items() if k not in explicit}
    cfg = merge_config(cls, defaults, file_values, explicit)
    if config_file is not None:  # the config file is an input too: --force must never replace it
        from ..artifacts import check_overlap

        check_overlap(cfg.output, (config_file,))
        check_overlap(cfg.work_path, (config_file,), what="work dir")
    return cfg


@train_app.command("teacher")
def teacher_command(
    ctx: typer.Context,
    model: str = typer.Argument(..., help="Base pipeline folder (diffusers layout) or hub id; its UNet is the init."),
    data: str = typer.Option(field_default(TeacherConfig, "data"), "--data", help="'digits' (the bundled handwritten digits) or a folder of images."),
    captions: Optional[Path] = typer.Option(None, "--captions", help="Captions file of a data folder (JSONL file/text or CSV file,text)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Output pipeline folder."),
    cfg_dropout: float = typer.Option(field_default(TeacherConfig, "cfg_dropout"), "--cfg-dropout", help="Share of prompts replaced by '' (for classifier-free guidance)."),
    default_steps: int = typer.Option(field_default(TeacherConfig, "default_steps"), "--default-steps", help="Euler steps that generate/eval use by default for the result."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow pickle (.bin) weights in MODEL; only for sources you trust."),
    config: Optional[Path] = EngineOptions.config,
    work_dir: Optional[Path] = EngineOptions.work_dir,
    max_steps: int = EngineOptions.max_steps,
    batch_size: int = EngineOptions.batch_size,
    gradient_accumulation_steps: int = EngineOptions.gradient_accumulation_steps,
    learning_rate: float = EngineOptions.learning_rate,
    lr_schedule: LRSchedule = EngineOptions.lr_schedule,
    warmup_steps: int = EngineOptions.warmup_steps,
    weight_decay: float = EngineOptions.weight_decay,
    max_grad_norm: float = EngineOptions.max_grad_norm,
    ema_decay: float = EngineOptions.ema_decay,
    mixed_precision: MixedPrecision = EngineOptions.mixed_precision,
    gradient_checkpointing: bool = EngineOptions.gradient_checkpointing,
    attention: AttentionKernel = EngineOptions.attention,
    checkpoint_every: int = EngineOptions.checkpoint_every,
    keep_checkpoints: int = EngineOptions.keep_checkpoints,
    resume: Optional[str] = EngineOptions.resume,
    seed: int = EngineOptions.seed,
    log_every: int = EngineOptions.log_every,
    cpu: bool = EngineOptions.cpu,
    threads: str = EngineOptions.threads,
    force: bool = EngineOptions.force,
    progress: bool = EngineOptions.progress,
) -> None:
    """Train a 1-rectified-flow teacher (frozen VAE + text encoder, cached latents, RF loss, EMA)."""
    import time

    from ..train.teacher import train_teacher

    cfg = resolve_config(ctx, TeacherConfig, config)
    t0 = time.perf_counter()
    out = train_teacher(cfg)
    if _is_main():
        typer.echo(f"wrote {out} ({cfg.max_steps} steps) in {time.perf_counter() - t0:.1f} s")


def _is_main() -> bool:
    import os

    return int(os.environ.get("RANK", "0")) == 0
