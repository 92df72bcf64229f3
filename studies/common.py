"""What the digits-eval studies share: their markdown table and result file."""

from __future__ import annotations

import os

from instaflow_edge.bench.common import machine, save_result


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
