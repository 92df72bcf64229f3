"""The README's headline tables, printed as markdown from saved results (no figure typed by hand).

    python -m instaflow_edge.bench.tables FILE.json [FILE.json ...]

Each file is a ``report.json`` (``instaflow-edge report``) or a bench result (``instaflow-edge bench``):
a report gives the summary table (one row per runtime: size, bits per weight, end-to-end parity against
its gate, digits accuracy/FID where measured, CPU/GPU latency where bench results were given, the
verdict); a bench result gives the per-stage latency table (``latency.markdown``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .latency import markdown as bench_markdown


def _bench_row_for(label: str, rows: list[dict], device: str) -> dict | None:
    """The latency row of report runtime ``label`` on ``device``: the torch reference matches the bench's
    first torch row, an export its bench label."""
    for r in rows:
        if r["device"] != device:
            continue
        if label.startswith("torch") and r["runtime"].startswith("torch"):
            return r
        if r["runtime"] == label:
            return r
    return None


def summary(report: dict) -> str:
    """One row per runtime of a ``report.json``."""
    lat = (report.get("latency") or {}).get("rows") or []
    digits = (report.get("digits") or {}).get("runtimes") or {}
    devices = sorted({r["device"] for r in lat})
    head = ["runtime", "size MB", "bits / weight (UNet)", "end-to-end PSNR dB (gate)"]
    if digits:
        head += ["digits accuracy", "digits-FID"]
    head += [f"{d.upper()} ms (× torch)" for d in devices] + ["verdict"]
    if lat and "cuda" not in devices:
        head.insert(-1, "GPU ms")
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, rt in report["runtimes"].items():
        par = (report["parity"].get(label) or {}).get("end_to_end")
        e2e = "reference" if par is None else "error" if par.get("error") else (
            f"{'inf' if par['psnr'] is None else format(par['psnr'], '.1f')} ({'–' if par['gate'] is None else format(par['gate'], 'g')})")
        size = f"{rt['total_bytes'] / 1e6:.3g}" if rt.get("total_bytes") else "–"
        bpw = (rt["sizes"].get("unet") or {}).get("bits_per_weight")
        row = [label, size, "–" if bpw is None else f"{bpw:.2f}", e2e]
        if digits:
            d = digits.get(label)
            row += [f"{d['accuracy']:.3f}" if d else "–", f"{d['fid']:.2f}" if d else "–"]
        for dev in devices:
            r = _bench_row_for(label, lat, dev)
            if r and r["end_to_end_s"]:
                x = r.get("speedup_vs_first")
                row.append(f"{r['end_to_end_s'] * 1e3:.3g}" + (f" ({x:.2f}×)" if x else ""))
            else:
                row.append("–")
        if lat and "cuda" not in devices:
            row.append("missing")
        v = (report.get("verdicts") or {}).get(label)
        row.append("reference" if v is None else ("–" if v["pass"] is None else ("pass" if v["pass"] else "FAIL")))
        out.append("| " + " | ".join(row) + " |")
    if digits and report["digits"].get("real"):
        real = report["digits"]["real"]
        cells = ["real digits (ceiling)", "", "", "", f"{real['accuracy']:.3f}", f"{real['fid']:.2f}"]
        cells += [""] * (len(head) - len(cells))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def tables(data: dict) -> str:
    """The markdown of one saved result (a report or a bench result)."""
    if data.get("kind") == "report":
        return summary(data)
    if isinstance(data.get("results"), dict):
        return bench_markdown(data)
    raise ValueError("neither a report.json nor a bench result")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m instaflow_edge.bench.tables", description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="+", type=Path, help="report.json or bench JSON files")
    a = ap.parse_args(argv)
    for f in a.files:
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
            text = tables(data)
        except (OSError, ValueError) as e:
            ap.error(f"{f}: {e}")
        print(f"<!-- {f} -->\n{text}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
