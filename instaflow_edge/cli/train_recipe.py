"""``instaflow-edge train reflow-data | reflow | distill``: InstaFlow's recipe after the teacher.

``train reflow`` and ``train distill`` take the training engine's options (``--max-steps``,
``--batch-size``, ``--resume``, …): each command lists them, with the defaults and help of
cli/train.py's ``EngineOptions``, and ``resolve_config`` turns them into the stage config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import typer

from ..options import Device, DType
from ..train.config import AttentionKernel, LRSchedule, MixedPrecision, field_default
from ..train.reflow import DistillConfig, ReflowConfig
from .train import EngineOptions, _is_main, resolve_config


def reflow_data_command(
    teacher: str = typer.Argument(..., help="Teacher pipeline: a rectified flow (Euler) or an epsilon/v-prediction SD model (its scheduler)."),
    output: Path = typer.Option(..., "-o", "--output", help="Output folder of shards (re-running it resumes)."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="Text file, one prompt per line."),
    data: Optional[str] = typer.Option(None, "--data", help="Prompts of a dataset: 'digits' or an image folder with captions."),
    captions: Optional[Path] = typer.Option(None, "--captions", help="Captions file of a data folder."),
    num_pairs: int = typer.Option(4000, "--num-pairs", help="Number of (noise, latent) pairs."),
    shard_size: int = typer.Option(500, "--shard-size", help="Pairs per shard."),
    steps: int = typer.Option(32, "--steps", help="Teacher sampler steps."),
    guidance: float = typer.Option(1.0, "--guidance", help="Teacher classifier-free guidance (≤ 1: none)."),
    negative_prompt: str = typer.Option("", "--negative-prompt", help="Unconditional prompt for guidance."),
    scheduler: str = typer.Option("model", "--scheduler", help="Diffusion teachers: model | dpm-solver | euler | ddim."),
    seed: int = typer.Option(0, "--seed", help="Global seed; pair i's noise seed derives from (seed, i)."),
    batch_size: int = typer.Option(64, "--batch-size", help="Teacher batch size."),
    height: Optional[int] = typer.Option(None, "--height", help="Image height (default: the model's)."),
    width: Optional[int] = typer.Option(None, "--width", help="Image width (default: the model's)."),
    device: Device = typer.Option(Device.auto, "--device", help="Device (under accelerate launch: each process's own)."),
    dtype: DType = typer.Option(DType.float32, "--dtype", help="Teacher precision."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow pickle (.bin) weights; only for sources you trust."),
    force: bool = typer.Option(False, "--force", help="Delete OUTPUT's shards and start over."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar."),
    threads: Optional[str] = typer.Option(None, "--threads", help="On the CPU: CPU threads: 'auto' follows the cores other programs leave free (re-checked every second), N fixes the count (default: torch's count, fixed)."),
) -> None:
    """Make reflow pairs: noise z → the teacher's ODE → latent x1, in verified, resumable shards."""
    from ..train.reflow_data import ReflowDataConfig, make_reflow_data

    cfg = ReflowDataConfig(
        teacher=teacher, output=str(output), prompts=str(prompts) if prompts else None, data=data,
        captions=str(captions) if captions else None, num_pairs=num_pairs, shard_size=shard_size, steps=steps,
        guidance=guidance, negative_prompt=negative_prompt, scheduler=scheduler, seed=seed, batch_size=batch_size,
        height=height, width=width, device=device, dtype=dtype, allow_pickle=allow_pickle, force=force, threads=threads,
    )
    m = make_reflow_data(cfg, progress=progress)
    if _is_main():
        rate = f", {m['pairs_per_second']} pairs/s" if m["pairs_per_second"] else ""
        typer.echo(f"{output}: {m['num_pairs']} pairs in {len(m['shards'])} shards "
                   f"({m['generated_pairs']} made now{rate})")


def reflow_command(
    ctx: typer.Context,
    model: str = typer.Argument(..., help="The teacher (rectified flow) whose pairs these are; the 2-RF starts from it."),
    pairs: Path = typer.Option(..., "--pairs", help="Reflow-data folder from `train reflow-data`."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Output pipeline folder."),
    cfg_dropout: float = typer.Option(field_default(ReflowConfig, "cfg_dropout"), "--cfg-dropout", help="Share of prompts replaced by '' (for guidance with the 2-RF)."),
    default_steps: int = typer.Option(field_default(ReflowConfig, "default_steps"), "--default-steps", help="Euler steps that generate/eval use by default for the 2-RF."),
    max_pairs: Optional[int] = typer.Option(None, "--max-pairs", help="Train on the first N pairs only (default: all)."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow pickle (.bin) weights in MODEL."),
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
    """Train a 2-rectified flow on fixed teacher pairs (straightens the flow)."""
    from ..train.reflow import train_reflow

    _train(ctx, ReflowConfig, train_reflow, config, "")


def distill_command(
    ctx: typer.Context,
    model: str = typer.Argument(..., help="Model to distil and start from (InstaFlow: the 2-RF)."),
    pairs: Path = typer.Option(..., "--pairs", help="Reflow-data folder from `train reflow-data`."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Output one-step pipeline folder."),
    loss: str = typer.Option(field_default(DistillConfig, "loss").value, "--loss", help="l2 | pseudo-huber | lpips (image space, needs --lpips-weights)."),
    lpips_weights: Optional[Path] = typer.Option(None, "--lpips-weights", help="File with lpips.LPIPS(net='vgg').state_dict() (safetensors)."),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="Recovery of a pruned MODEL: the unpruned one-step model (adds the loss to its one-step output)."),
    feature_weight: float = typer.Option(field_default(DistillConfig, "feature_weight"), "--feature-weight", help="BK-SDM's feature loss at the block outputs both UNets have (needs --teacher; 0: off)."),
    max_pairs: Optional[int] = typer.Option(None, "--max-pairs", help="Train on the first N pairs only (default: all)."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow pickle weights (MODEL, LPIPS)."),
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
    """Distil a one-step generator: loss between z + v(z, τ=1000) and the teacher's x1."""
    from ..train.reflow import train_distill

    _train(ctx, DistillConfig, train_distill, config, "one-step ")


def _train(ctx: typer.Context, cls: type, verb: Callable, config_file: Optional[Path], what: str) -> None:
    """Options (defaults ← --config file ← flags) → config → the stage's verb; report the time."""
    import time

    cfg = resolve_config(ctx, cls, config_file)
    t0 = time.perf_counter()
    out = verb(cfg)
    if _is_main():
        typer.echo(f"wrote {what}{out} ({cfg.max_steps} steps) in {time.perf_counter() - t0:.1f} s")


def decoder_command(
    model: str = typer.Argument(..., help="Pipeline whose AutoencoderKL to distil (e.g. the one-step student)."),
    output: Path = typer.Option(..., "-o", "--output", help="Output pipeline folder (MODEL with the tiny VAE)."),
    data: str = typer.Option("digits", "--data", help="'digits' or a folder of images (their latents are training inputs)."),
    captions: Optional[Path] = typer.Option(None, "--captions", help="Captions file of a data folder (its prompts drive the one-step latents)."),
    channels: Optional[str] = typer.Option(None, "--channels", help="Tiny decoder width per stage, e.g. 64,64,64,64 (TAESD, the default)."),
    blocks: Optional[str] = typer.Option(None, "--blocks", help="Tiny decoder blocks per stage, e.g. 3,3,3,1 (TAESD, the default)."),
    one_step_latents: int = typer.Option(512, "--one-step-latents", help="MODEL's own one-step outputs added to the training latents."),
    max_steps: int = typer.Option(2000, "--max-steps", help="Optimizer steps."),
    batch_size: int = typer.Option(32, "--batch-size", help="Latents per step."),
    learning_rate: float = typer.Option(1e-3, "--learning-rate", "--lr", help="Adam peak learning rate (warm-up, cosine)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the init, the one-step noise and the batches."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow pickle (.bin) weights in MODEL."),
    force: bool = typer.Option(False, "--force", help="Overwrite OUTPUT if it exists."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar."),
    threads: str = typer.Option("auto", "--threads", help="CPU threads: 'auto' follows the cores other programs leave free (re-checked every second), N fixes the count."),
) -> None:
    """Distil a tiny VAE (AutoencoderTiny, TAESD's architecture) from MODEL's VAE; write MODEL with it."""
    from ..train.decoder import DecoderConfig, train_decoder

    cfg = DecoderConfig(model=model, output=str(output), data=data, captions=str(captions) if captions else None,
                        channels=channels, blocks=blocks, one_step_latents=one_step_latents, max_steps=max_steps,
                        batch_size=batch_size, learning_rate=learning_rate, seed=seed, allow_pickle=allow_pickle,
                        force=force, progress=progress, threads=threads)
    d = train_decoder(cfg)["decoder"]
    typer.echo(f"wrote {output}: decoder {d['before']['macs_per_image'] / 1e6:,.1f} → {d['after']['macs_per_image'] / 1e6:,.2f} "
               f"M MACs/image ({d['macs_ratio']:g}× fewer), held-out PSNR vs the full decoder {d['held_out_psnr_db']:.1f} dB, "
               f"{d['steps']} steps in {d['seconds']:.0f} s")


def register(train_app: typer.Typer) -> None:
    train_app.command("reflow-data")(reflow_data_command)
    train_app.command("reflow")(reflow_command)
    train_app.command("distill")(distill_command)
    train_app.command("decoder")(decoder_command)
