"""What the digits-eval studies share: their arguments, the scoring of images, the markdown table and
the result file."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

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


def digits_eval_args(doc: str, variants: dict, work: str, json_path: str, argv: list[str] | None) -> argparse.Namespace:
    """The arguments every digits-eval study takes (model, --work, --json, --variants, --num-images,
    --calibration-prompts), checked."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("model", help="a one-step digits pipeline (e.g. the demo's instaflow student)")
    ap.add_argument("--work", default=work, help="folder for the exports (reused when present)")
    ap.add_argument("--json", default=json_path)
    ap.add_argument("--variants", default=",".join(variants), help=f"comma-separated, from: {', '.join(variants)}")
    ap.add_argument("--num-images", type=int, default=1000)
    ap.add_argument("--calibration-prompts", help="prompts file for the calibrated int8 schemes, or 'digits': the sample "
                    "of the digits prompts a model trained on them keeps in its manifest (default: the model's "
                    "manifest prompts, else the generic set)")
    args = ap.parse_args(argv)
    unknown = set(args.variants.split(",")) - set(variants)
    if unknown:
        ap.error(f"unknown --variants {', '.join(sorted(unknown))}: choose from {', '.join(variants)}")
    args.calibration_label = args.calibration_prompts
    if args.calibration_prompts == "digits":
        from instaflow_edge.artifacts import atomic_write_text, prompt_sample
        from instaflow_edge.data import PROMPT_TEMPLATES, digit_prompt

        every = [digit_prompt(d, k) for d in range(10) for k in range(len(PROMPT_TEMPLATES))]
        path = Path(args.work) / "digits-prompts.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, "\n".join(prompt_sample(every)) + "\n")
        args.calibration_prompts = str(path)
    return args


class DigitsScorer:
    """The judge, the real-digit ceiling of ``num_images`` images, and one row per scored image set
    (accuracy, FID, PSNR vs the PyTorch fp32 images; FID relative to the first row once it is scored)."""

    def __init__(self, num_images: int):
        from instaflow_edge.digits.evaluate import real_ceiling
        from instaflow_edge.digits.judge import JudgeConfig, load_judge

        self.judge = load_judge(JudgeConfig())
        self.real, self.ref_stats = real_ceiling(self.judge, num_images)
        self.fid_fp32: float | None = None

    def score(self, label: str, images, labels, reference, seconds: float, extra: dict | None = None) -> dict:
        from instaflow_edge.digits.evaluate import score_images
        from instaflow_edge.parity import psnr

        s = score_images(self.judge, images, labels, self.ref_stats)
        f = self.fid_fp32
        row = {"variant": label, **{k: v for k, v in s.items() if k != "per_digit"},
               "psnr_vs_torch_fp32_db": None if reference is None else round(psnr(reference, images), 2),
               "fid_vs_torch_fp32": None if f is None else round(s["fid"] / f, 4),
               "fid_within_10pct": None if f is None else abs(s["fid"] / f - 1) <= 0.10,
               "seconds": round(seconds, 1), **(extra or {})}
        if f is None:
            self.fid_fp32 = s["fid"]
        p = row["psnr_vs_torch_fp32_db"]
        print(f"{label:24s} accuracy {row['accuracy']:.3f}  FID {row['fid']:7.2f}  PSNR vs torch fp32 "
              f"{'-' if p is None else f'{p:.1f}'}", flush=True)
        return row

    def score_export(self, label: str, folder: str | os.PathLike, fmt: str, labels, reference, extra: dict | None = None) -> dict:
        """Score an export folder as ``eval --backend FMT`` does: its own runtime generates the fixed prompt
        set and seeds (the same as the PyTorch reference's ``labels``), then one row as ``score``."""
        import time

        from instaflow_edge.digits.evaluate import EvalConfig, generate_eval_images_export
        from instaflow_edge.runtime import open_export

        t0 = time.perf_counter()
        exp = open_export(folder, expect=fmt, steps=1)
        cfg = EvalConfig(model=str(folder), steps=1, num_images=len(labels), backend=fmt)
        images, labels_o, info = generate_eval_images_export(exp, cfg, progress=False)
        if labels_o != labels:
            raise RuntimeError(f"{folder}: the export's prompt labels differ from the reference's")
        return self.score(label, images, labels_o, reference, time.perf_counter() - t0,
                          {"folder": str(folder), "export_precision": info["export_precision"], **(extra or {})})
