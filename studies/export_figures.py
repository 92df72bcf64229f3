"""Conversion figures of a set of exports, from their manifests and ``/usr/bin/time -v`` files.

    python -m studies.export_figures runs/ov-helper/sd15 NAME... [--json studies/results/X.json]

For each ``FOLDER/NAME`` (an export written by ``convert``) with ``FOLDER/NAME.time`` beside it (the
``/usr/bin/time -v -o`` output of that convert run, made with no other heavy job running): wall time, peak RSS,
the size on disk, the target/precision/scheme and the parity table (PSNR per component and end to end).
Saves JSON and prints a markdown table built from it.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path


def _time_file(path: Path) -> dict:
    out = {}
    if not path.is_file():
        return out
    text = path.read_text()
    m = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text)
    if m:
        parts = [float(x) for x in m.group(1).split(":")]
        out["wall_s"] = round(sum(p * 60 ** i for i, p in enumerate(reversed(parts))), 1)
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    if m:
        out["peak_rss_gib"] = round(int(m.group(1)) / 2**20, 2)
    return out


def figures(folder: Path, name: str) -> dict:
    export = folder / name
    m = json.loads((export / "manifest.json").read_text())
    cfg = m.get("config") or {}
    size = sum(p.stat().st_size for p in export.rglob("*") if p.is_file())
    row = {"name": name, "kind": m.get("kind"), "target": cfg.get("target"),
           "precision": (m.get("openvino") or {}).get("precision"), "ran_in": m.get("parity_ran_in"),
           "quantize": (m.get("quantize") or {}).get("scheme"), "quantized": (m.get("quantize") or {}).get("components"),
           "size_gib": round(size / 2**30, 2), "psnr_db": {r["component"]: r["psnr"] for r in m.get("parity", [])},
           "gates": m.get("gates"), **_time_file(folder / f"{name}.time")}
    return row


def markdown(rows: list[dict]) -> str:
    lines = ["| export | target | precision (ran in) | quantized | wall | peak RSS | size | PSNR text enc. / UNet / decoder / end to end |",
             "|---|---|---|---|---:|---:|---:|---|"]
    for r in rows:
        ran = sorted(set((r["ran_in"] or {}).values()))
        prec = f"{r['precision']} ({'/'.join(ran)})" if r["precision"] else "fp32"
        q = f"{r['quantize']}: {', '.join(r['quantized'])}" if r["quantize"] else "—"
        p = r["psnr_db"]
        ps = " / ".join("—" if p.get(c) is None else f"{p[c]:.1f}" for c in ("text_encoder", "unet", "vae_decoder", "end_to_end"))
        wall = f"{r['wall_s'] / 60:.1f} min" if "wall_s" in r else "—"
        rss = f"{r['peak_rss_gib']:.1f} GiB" if "peak_rss_gib" in r else "—"
        lines.append(f"| {r['name']} | {r['target']} | {prec} | {q} | {wall} | {rss} | {r['size_gib']:.2f} GiB | {ps} dB |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from instaflow_edge.bench.common import machine, save_result

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder")
    ap.add_argument("names", nargs="+")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    rows = [figures(Path(a.folder), n) for n in a.names]
    if a.json:
        save_result(a.json, "export_figures", {"machine": {**machine(), "note": "2-core VM shared with other jobs; "
                                                           "no other heavy job ran during each convert"},
                                               "folder": a.folder, "rows": rows})
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
