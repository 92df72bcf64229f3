"""``instaflow-edge generate MODEL PROMPT... -o OUTDIR``."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ..options import Device, DType
from ..runtime import Backend


def generate_command(
    model: str = typer.Argument(..., help="Pipeline folder (diffusers layout) or hub id."),
    prompts: List[str] = typer.Argument(..., help="One or more prompts."),
    output: Path = typer.Option(..., "-o", "--output", help="Output folder for PNGs and manifest.json."),
    seed: int = typer.Option(0, "--seed", help="Seed of the first image; image k of each prompt uses seed+k."),
    num_images: int = typer.Option(1, "--num-images", "-n", help="Images per prompt."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Sampling steps (default: the model's; 1 for one-step models)."),
    guidance: float = typer.Option(1.0, "--guidance", help="Classifier-free guidance scale; ≤ 1 means none (one-step models use none)."),
    negative_prompt: str = typer.Option("", "--negative-prompt", help="Unconditional prompt used with --guidance > 1."),
    height: Optional[int] = typer.Option(None, "--height", help="Image height (default: the model's)."),
    width: Optional[int] = typer.Option(None, "--width", help="Image width (default: the model's)."),
    device: Device = typer.Option(Device.auto, "--device", help="auto picks cuda, then mps, then cpu."),
    dtype: DType = typer.Option(DType.auto, "--dtype", help="auto: float16 on GPUs, float32 on CPU."),
    backend: Backend = typer.Option(Backend.torch, "--backend", help="Runtime that runs the model: torch on a pipeline folder, or an export's own runtime (MODEL is that export)."),
    image: Optional[str] = typer.Option(None, "--image", help="Image-to-image: edit this image (resized to the "
                                        "output size). Rectified flows; --backend torch, onnx, openvino or executorch (exports with vae_encoder/)."),
    strength: Optional[float] = typer.Option(None, "--strength", help="With --image: start at s0 = 1 − STRENGTH on the "
                                             "straight path from the seed's noise to the image (1: ignore the image). [default: 0.8]"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow pickle (.bin) weights; only for sources you trust."),
    force: bool = typer.Option(False, "--force", help="Overwrite OUTPUT if it exists."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar (for logs and scripts)."),
) -> None:
    """Generate images: one Euler step for one-step models (x = z + v(z, 1000)), N steps otherwise."""
    from ..generate import GenerateConfig, generate

    cfg = GenerateConfig(
        model=model, prompts=list(prompts), output=str(output), seed=seed, num_images=num_images, steps=steps,
        guidance=guidance, negative_prompt=negative_prompt, height=height, width=width, device=device,
        dtype=dtype, backend=backend, image=image, strength=strength, allow_pickle=allow_pickle, force=force,
    )
    manifest = generate(cfg, progress=not no_progress)
    n = len(manifest["images"])
    s = manifest["sampling"]
    typer.echo(
        f"wrote {n} image{'s' * (n != 1)} to {output} ({s['width']}×{s['height']}, {s['steps']} step"
        f"{'s' * (s['steps'] != 1)}, {s['device']} {s['dtype']}): {manifest['seconds_per_image']:.3f} s/image"
    )
