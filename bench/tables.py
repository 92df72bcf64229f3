"""The README's headline tables, printed as markdown from saved results (no figure typed by hand).

    python -m instaflow_edge.bench.tables FILE.json [FILE.json ...]

Each file is a ``report.json`` (``instaflow-edge report``) or a bench result (``instaflow-edge bench``):
a report gives the summary table (one row per runtime: size, bits per weight, end-to-end parity against
its gate, digits accuracy/FID where measured, CPU/GPU latency where bench results were given, the
verdict); a bench result gives the per-stage latency table (``bench_markdown``). ``table`` is the plain
text the command prints.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _refs(res: dict) -> tuple[str, str | None]:
    base = next(iter(res))
    first_ort = next((k for k in res if k.startswith("ort ") and not k.endswith("fused")), None)
    return base, first_ort


def table(report: dict) -> str:
    """The result as a plain-text table (what the command prints)."""
    res = report["results"]
    base, first_ort = _refs(res)
    head = (f"{'runtime':<24} {'stage':<13} {'median s':>10} {'p90 s':>10} {'% peak':>7} "
            f"{'× ' + base[:12]:>16} {'× ' + (first_ort or '')[:12]:>16}")
    gpu = report.get("gpu") or {}
    lines = [f"{report['model']}  {report['device']}{' ' + gpu['name'] if gpu else ''}  threads={report['threads']}  "
             f"fp32 matmul peak {report.get('matmul_peak_gflops')} GFLOP/s", head, "-" * len(head)]
    for k, r in res.items():
        for stage, st in r.items():
            if "median_s" not in st:
                continue
            sb = st.get("speedup_vs_" + base.replace(" ", "_"))
            so = st.get("speedup_vs_" + first_ort.replace(" ", "_")) if first_ort else None
            sr = st.get("speedup_vs_" + first_ort.replace(" ", "_") + "_range") if first_ort else None
            lines.append(f"{k:<24} {stage:<13} {st['median_s']:>10.4f} {st['p90_s']:>10.4f} {st.get('pct_of_peak') or 0:>7.1f} "
                         f"{(f'{sb:.2f}×' if sb else '-'):>16} {(f'{so:.2f}×' if so else '-'):>16}"
                         + (f"  ({sr[0]:.2f}–{sr[1]:.2f})" if sr and k != first_ort else ""))
    mem = report.get("memory") or {}
    if mem:
        lines.append("peak RSS (MiB, load + one run): " + ", ".join(
            f"{k} {m['peak_rss_mib']:.0f}" for k, m in mem.items() if m.get("peak_rss_mib") is not None))
    for k, why in (report.get("skipped") or {}).items():
        lines.append(f"{k}: not timed — {why}")
    return "\n".join(lines)


def bench_markdown(report: dict) -> str:
    """The result as the README's table: one row per runtime, stages in columns, speed-ups of the UNet
    and end to end vs torch and vs the first ORT export (paired per-round min–max where interleaved)."""
    res = report["results"]
    base, first_ort = _refs(res)
    unit, scale = ("ms", 1e3) if res[base]["end_to_end"]["median_s"] < 1 else ("s", 1.0)
    mem = report.get("memory") or {}

    def t(st):
        return f"{st['median_s'] * scale:.3g} {unit}"

    def x(st, ref):
        if not ref:
            return "–"
        v, r = st.get("speedup_vs_" + ref.replace(" ", "_")), st.get("speedup_vs_" + ref.replace(" ", "_") + "_range")
        if v is None:
            return "–"
        return f"{v:.2f}" + (f" ({r[0]:.2f}–{r[1]:.2f})" if r and r[0] != r[1] else "")

    def m(k):
        v = (mem.get(k) or {}).get("peak_rss_mib")
        return "–" if v is None else f"{v:.0f}"

    with_mem = bool(mem)
    lines = [f"| runtime | text encoder | UNet (% of peak) | VAE decoder | end to end (median / p90) | "
             f"UNet × {base} | end to end × {base} | UNet × {first_ort or '–'} | end to end × {first_ort or '–'} |"
             + (" peak RSS MiB |" if with_mem else ""),
             "|---|---|---|---|---|---|---|---|---|" + ("---|" if with_mem else "")]
    for k, r in res.items():
        tail = f" {m(k)} |" if with_mem else ""
        if "generator" in r:
            g = r["generator"]
            lines.append(f"| {k} | | | | {t(g)} / {g['p90_s'] * scale:.3g} {unit} | | {x(g, base)} | | {x(g, first_ort)} |" + tail)
            continue
        e = r["end_to_end"]
        lines.append(f"| {k} | {t(r['text_encoder'])} | {t(r['unet'])} ({r['unet']['pct_of_peak']:.0f}%) | "
                     f"{t(r['vae_decoder'])} | {t(e)} / {e['p90_s'] * scale:.3g} {unit} | {x(r['unet'], base)} | "
                     f"{x(e, base)} | {x(r['unet'], first_ort)} | {x(e, first_ort)} |" + tail)
    return "\n".join(lines)


markdown = bench_markdown  # the old name


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
