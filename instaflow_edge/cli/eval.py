"""``instaflow-edge eval MODEL``: prompt accuracy and digits-FID against the real-image ceiling."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import InputError
from ..options import Device, DType
from ..runtime import Backend as EvalBackend
from ..quantize.schemes import CoreMLCompression, listing


def eval_command(
    model: Optional[str] = typer.Argument(None, help="Pipeline folder (diffusers layout), or an export folder with --backend FORMAT; omit with --real."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Sampling steps (default: the model's)."),
    guidance: float = typer.Option(1.0, "--guidance", help="Classifier-free guidance scale; ≤ 1 means none."),
    num_images: int = typer.Option(1000, "--num-images", "-n", help="Images in all (a multiple of 10: that / 10 per digit)."),
    seed: int = typer.Option(0, "--seed", help="Image j starts from the noise of seed+j."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the figures (and the settings) to this JSON file."),
    real: bool = typer.Option(False, "--real", help="Only the real-image ceiling (no model)."),
    batch_size: int = typer.Option(250, "--batch-size", help="Images generated per batch."),
    device: Device = typer.Option(Device.auto, "--device", help="auto picks cuda, then mps, then cpu."),
    dtype: DType = typer.Option(DType.float32, "--dtype", help="Model dtype."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow pickle (.bin) weights; only for sources you trust."),
    coreml_compress: Optional[str] = typer.Option(None, "--coreml-compress", help=f"Score a one-step model with a Core ML compression scheme applied in PyTorch, exactly as `convert --target coreml --compress` ships it ({listing(CoreMLCompression, '|')})."),
    target_bits: Optional[float] = typer.Option(None, "--target-bits", help="With --coreml-compress mixed-bit: average bits per weight."),
    backend: EvalBackend = typer.Option(EvalBackend.torch, "--backend", help="torch: MODEL is a pipeline folder; any other: MODEL is an export of that format (convert / quantize), run by its own runtime, e.g. onnx to score an int8 export."),
) -> None:
    """Generate the fixed digit prompt set with fixed seeds and score it with the digits judge."""
    from ..digits.evaluate import EvalConfig, evaluate

    transform = None
    if coreml_compress is not None or target_bits is not None:
        from ..quantize.coreml import PyTorchCompression

        if real:
            raise InputError("--coreml-compress needs a model, but --real was given", "drop one of them")
        transform = PyTorchCompression(coreml_compress, target_bits)
    cfg = EvalConfig(model=model, steps=steps, guidance=guidance, num_images=num_images, seed=seed,
                     batch_size=batch_size, real_only=real, json=str(json_path) if json_path else None,
                     device=device, dtype=dtype, allow_pickle=allow_pickle, backend=backend)
    result = evaluate(cfg, transform=transform)
    print_table(result)
    if json_path:
        typer.echo(f"wrote {json_path}")


def print_table(result: dict) -> None:
    """The figures as a table (rich; plain text when the output is not a terminal)."""
    from rich.console import Console
    from rich.table import Table

    rows = []
    if "generated" in result:
        s = result["sampling"]
        comp = result.get("coreml_compression")
        tag = f", Core ML {comp['scheme']}" if comp else ""
        if s.get("backend") not in (None, "torch"):
            tag += f", {s.get('runtime') or s['backend']} {s['export_precision']}"
        rows.append((f"{result['model']} ({s['steps']} step{'s' * (s['steps'] != 1)}, guidance {s['guidance']:g}{tag})",
                     result["generated"], result["generated"]["n"]))
    real = result["real"]
    rows.append(("real digits (ceiling)", real, real["fid_n"]))
    table = Table(title=f"digits eval: {result['num_images']} images, FID vs {result['reference']['n']} real "
                        f"validation digits in the judge's features")
    for col in ("images", "N (FID)", "prompt accuracy", "digits-FID", *[str(d) for d in range(10)]):
        table.add_column(col, justify="left" if col == "images" else "right")
    for name, r, n in rows:
        table.add_row(name, str(n), f"{r['accuracy']:.3f}", f"{r['fid']:.2f}",
                      *["-" if a is None else f"{a:.2f}" for a in r["per_digit"]])
    console = Console(width=max(140, Console().width))
    console.print(table)
    comp = result.get("coreml_compression")
    if comp:
        bits = f" at {comp['target_bits']:g} bits/weight" if comp.get("target_bits") else ""
        layers = ", ".join(f"{k} {v['layers']}" for k, v in comp["components"].items())
        console.print(f"Core ML {comp['scheme']}{bits}, applied in PyTorch as `convert --target coreml` ships it "
                      f"(compressed layers: {layers}).", soft_wrap=True)
    console.print(f"ceiling: accuracy on the {real['n']} held-out validation digits; FID of {real['fid_n']} real "
                  f"train-split digits vs the validation set (two validation halves: {real['fid_val_halves']:.2f}). "
                  f"Judge validation accuracy {result['judge']['val_accuracy']:.3f}. "
                  f"{result['seconds']['total']:.1f} s.", soft_wrap=True)
