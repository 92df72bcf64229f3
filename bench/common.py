"""What every benchmark script shares: the machine description and writing its JSON result."""

from __future__ import annotations

import json
import os
from pathlib import Path

MACHINE_KEYS = ("cpu", "memory_gib", "torch_threads", "platform")


def machine() -> dict:
    """The short machine description a bench result carries (``instaflow-edge env`` has the rest)."""
    from ..envinfo import collect

    return {k: v for k, v in collect().items() if k in MACHINE_KEYS}


def save_json(path: str | os.PathLike, obj: dict) -> Path:
    """Write ``obj`` as indented JSON, atomically, creating the folder; returns the path."""
    from ..artifacts import atomic_write_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")
    return path


def save_result(path: str | os.PathLike, name: str, result: dict) -> Path:
    """A bench result wrapped in the project's manifest header (kind ``bench``, versions, time)."""
    from ..artifacts import make_manifest

    return save_json(path, make_manifest("bench", None, name=name, **result))


def digits_table(rows: list[dict], name_key: str, psnr_key: str, psnr_label: str, real: dict) -> str:
    """A markdown table of digits-eval rows: name, prompt accuracy, digits-FID, image PSNR, then the
    real-digit ceiling."""
    out = [f"| {name_key} | prompt accuracy | digits-FID | {psnr_label} |", "|---|---:|---:|---:|"]
    for r in rows:
        p = "–" if r[psnr_key] is None else f"{r[psnr_key]:.1f}"
        out.append(f"| {r[name_key]} | {r['accuracy']:.3f} | {r['fid']:.2f} | {p} |")
    out.append(f"| real digits (ceiling) | {real['accuracy']:.3f} | {real['fid']:.2f} | |")
    return "\n".join(out)


def save_digits_eval(path: str | os.PathLike, name: str, model: str, num_images: int, rows: list[dict], real: dict,
                     name_key: str, psnr_key: str, psnr_label: str) -> dict:
    """Save a one-step digits-eval bench (rows + the real ceiling) as ``name`` and print its table."""
    result = {"machine": machine(), "model": model, "num_images": num_images, "steps": 1, "rows": rows,
              "ceiling": {"accuracy": real["accuracy"], "fid": real["fid"]}}
    save_result(path, name, result)
    print(digits_table(rows, name_key, psnr_key, psnr_label, real))
    return result
