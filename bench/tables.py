"""The README's headline tables, printed as markdown from saved results (no figure typed by hand).

    python -m instaflow_edge.bench.tables FILE.json [FILE.json ...]
    python -m instaflow_edge.bench.tables --readme README.md [--readme docs/X.md ...] [--check]

Each file is a ``report.json`` (``instaflow-edge report``), a bench result (``instaflow-edge bench``),
a ``cpu_paths`` result (``python -m studies.cpu_paths``) or a demo's ``results.json``:
a report gives the summary table (one row per runtime: size, bits per weight, end-to-end parity against
its gate, digits accuracy/FID where measured, CPU/GPU latency where bench results were given, the
verdict); a bench result gives the per-stage latency table (``bench_markdown``); a cpu_paths result its
per-thread-count tables; a demo its results table. ``table`` is the plain text the command prints.

``--readme FILE`` regenerates, in place, every block of FILE written as::

    <!-- table: path/to/result.json -->
    ...
    <!-- /table -->

(the path relative to FILE's folder); ``--check`` changes nothing and exits 1 when a block differs from
its JSON, naming it (the tests run it on the README).
"""

from __future__ import annotations

import argparse
import json
import re
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


def _n(x: float) -> str:
    """3 significant figures, without an exponent for large values (40,300 rather than 4.03e+04)."""
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.3g}"


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
        size = _n(rt["total_bytes"] / 1e6) if rt.get("total_bytes") else "–"
        bpw = (rt["sizes"].get("unet") or {}).get("bits_per_weight")
        row = [label, size, "–" if bpw is None else f"{bpw:.2f}", e2e]
        if digits:
            d = digits.get(label)
            row += [f"{d['accuracy']:.3f}" if d else "–", f"{d['fid']:.2f}" if d else "–"]
        for dev in devices:
            r = _bench_row_for(label, lat, dev)
            if r and r["end_to_end_s"]:
                x = r.get("speedup_vs_first")
                row.append(_n(r["end_to_end_s"] * 1e3) + (f" ({x:.2f}×)" if x else ""))
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
    """The markdown of one saved result (a report, a bench result, a cpu_paths result or a demo's results)."""
    if data.get("kind") == "report":
        return summary(data)
    if data.get("kind") == "demo-results":
        from ..digits.demo import format_markdown

        return format_markdown(data)
    if data.get("name") in ("openvino_digits_eval", "onnx_digits_eval", "executorch_digits_eval"):
        return digits_eval_markdown(data)
    if data.get("name") == "img2img_digits":
        return img2img_markdown(data)
    if data.get("name") == "web_latency":
        return web_markdown(data)
    if data.get("name") == "cpu_paths":
        return cpu_paths_markdown(data).rstrip("\n")
    if isinstance(data.get("results"), dict):
        return bench_markdown(data)
    raise ValueError("neither a report.json, a bench result, a cpu_paths result nor a demo's results.json")


def digits_eval_markdown(data: dict) -> str:
    """A digits-eval study's rows (``studies/openvino_digits_eval.py``, ``onnx_digits_eval.py``): accuracy,
    FID (and its ratio to PyTorch fp32's), the images' PSNR vs PyTorch fp32, then the real-digit ceiling."""
    lines = ["| variant | ran in | prompt accuracy | digits-FID | FID × fp32 | image PSNR vs torch fp32 (dB) |",
             "|---|---|---:|---:|---:|---:|"]
    base = data["rows"][0]["fid"]
    for r in data["rows"]:
        p = r.get("psnr_vs_torch_fp32_db")
        lines.append(f"| {r['variant']} | {r.get('ran_in') or r.get('export_precision') or 'fp32'} | {r['accuracy']:.3f} | "
                     f"{r['fid']:.2f} | {r['fid'] / base:.3f} | {'–' if p is None else f'{p:.1f}'} |")
    c = data["ceiling"]
    lines.append(f"| real digits (ceiling) | | {c['accuracy']:.3f} | {c['fid']:.2f} | | |")
    return "\n".join(lines)


def img2img_markdown(data: dict) -> str:
    """``studies/img2img_digits.py``'s rows: per model and strength, how often the edit shows the prompt's
    digit and the source's, its digits-FID and the mean pixel change; then the real-digit ceiling."""
    lines = ["| model | steps | strength | follows the prompt | keeps the source digit | digits-FID | mean pixel change |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in data["rows"]:
        lines.append(f"| {r['model']} | {r['steps']} | {r['strength']:.1f} | {r['accuracy']:.3f} | {r['source_kept']:.3f} | "
                     f"{r['fid']:.2f} | {r['mean_abs_change']:.3f} |")
    c = data["ceiling"]
    lines.append(f"| real digits (ceiling) | | | {c['accuracy']:.3f} | | {c['fid']:.2f} | |")
    return "\n".join(lines)


def web_markdown(data: dict) -> str:
    """``studies/web_latency.py``'s result: per site and step, the page's median (p90) ms beside
    onnxruntime Python's on the same export, their ratio; then model load and the page-vs-Python PSNR."""
    lines = ["| export | step | browser ms, median (p90) | onnxruntime Python ms, median (p90) | browser ÷ Python |",
             "|---|---|---|---|---|"]
    for r in data["rows"]:
        b, py = r.get("browser") or {}, r.get("python") or {}
        if "page_ms" not in b:
            lines.append(f"| {r['scheme']} | did not run in the browser | {b.get('error', '–')} | | |")
            continue
        ratio = r.get("browser_over_python") or {}
        for step in ("text_encoder", "unet", "vae_decoder"):
            pb, pp = b["page_ms"][step], py["ms"][step]
            lines.append(f"| {r['scheme']} | {step} | {_n(pb['median_ms'])} ({_n(pb['p90_ms'])}) | "
                         f"{_n(pp['median_ms'])} ({_n(pp['p90_ms'])}) | {ratio.get(step, 0):.1f}× |")
        t, tp = b["page_ms"]["total"], py["ms"]["total"]
        lines.append(f"| {r['scheme']} | one click (page: tokenizer, noise, 3 models, canvas) / the 3 models | "
                     f"{_n(t['median_ms'])} ({_n(t['p90_ms'])}) | {_n(tp['median_ms'])} ({_n(tp['p90_ms'])}) | "
                     f"{ratio.get('generate_total_vs_sum', 0):.1f}× |")
        psnr = r.get("page_vs_python_psnr_db")
        lines.append(f"| {r['scheme']} | model load; page image vs Python | {b['load_ms'] / 1e3:.2f} s | {py['load_s']:.2f} s | "
                     f"{'identical' if psnr in (None, float('inf')) else f'{psnr:.1f} dB'} |")
    return "\n".join(lines)


BLOCK = re.compile(r"(<!-- table: (?P<path>[^ ]+) -->\n)(?P<body>.*?)(<!-- /table -->)", re.DOTALL)


def render_readme(text: str, root: Path) -> tuple[str, list[str]]:
    """``text`` with every table block regenerated from its JSON (paths relative to ``root``), and the
    paths of the blocks that changed."""
    changed: list[str] = []

    def one(m: re.Match) -> str:
        path = root / m["path"]
        try:
            body = tables(json.loads(path.read_text(encoding="utf-8"))) + "\n"
        except (OSError, ValueError) as e:
            raise ValueError(f"{m['path']}: {e}") from e
        if body != m["body"]:
            changed.append(m["path"])
        return m.group(1) + body + m.group(4)

    return BLOCK.sub(one, text), changed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m instaflow_edge.bench.tables", description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="*", type=Path, help="report.json, bench, cpu_paths or demo results JSON files")
    ap.add_argument("--readme", type=Path, action="append", metavar="FILE",
                    help="regenerate this markdown file's table blocks in place (repeatable)")
    ap.add_argument("--check", action="store_true", help="with --readme: change nothing, exit 1 if a block is stale")
    a = ap.parse_args(argv)
    if a.readme:
        stale = 0
        for readme in a.readme:
            try:
                new, changed = render_readme(readme.read_text(encoding="utf-8"), readme.resolve().parent)
            except (OSError, ValueError) as e:
                ap.error(f"{readme}: {e}")
            stale += len(changed)
            if a.check:
                for c in changed:
                    print(f"{readme}: the table from {c} is stale: run python -m instaflow_edge.bench.tables --readme {readme}")
                continue
            if changed:
                from ..artifacts import atomic_write_text

                atomic_write_text(readme, new)
            print(f"{readme}: {len(changed)} table(s) regenerated")
        return 1 if a.check and stale else 0
    if not a.files:
        ap.error("give result files, or --readme FILE")
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


# ---------------------------------------------------------------------------------------------------
# studies/cpu_paths.py results

CPU_PATHS_PEER = "OpenVINO default, plain export (peer)"


def cpu_paths_markdown(report: dict) -> str:
    """A ``studies/cpu_paths.py`` result: per thread count, UNet / decoder / end to end, the verdict, the profiles."""
    lines = []
    for threads, block in report["by_threads"].items():
        lines.append(f"**{threads} thread{'s' * (threads != '1')}**, {report['image'][0]}×{report['image'][1]}, "
                     f"median of {report['rounds']} interleaved rounds; ×: paired speed-up (min–max)\n")
        lines.append("| runtime | UNet s | × ORT fp32 | × peer | PSNR | % peak | decoder s | × ORT fp32 | × peer | PSNR | "
                     "% peak | end to end s | × ORT fp32 | × peer | PSNR e2e |")
        lines.append("|---|" + "---:|" * 14)
        for r, x in block["results"].items():
            cells = []
            for c in ("unet", "vae_decoder", "end_to_end"):
                y = x[c]
                cells += [f"{y['median_s']:.3g}", _ratio(y["vs_ort_fp32"]), _ratio(y["vs_peer"]),
                          "—" if y["psnr_db"] is None else f"{y['psnr_db']:.1f} dB"]
                if c != "end_to_end":
                    cells.append("—" if y.get("pct_of_peak") is None else f"{y['pct_of_peak']:.0f}% {y['precision']}")
            lines.append(f"| {r} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += _verdict_lines(report)
    for comp, rows in {k: v for k, v in report.get("profiles", {}).items() if k != "threads"}.items():
        lines.append(f"**OpenVINO profile, {comp}, {report['profiles']['threads']} thread(s)** (one call; time by op [kernel])\n")
        for r, p in rows.items():
            top = "; ".join(f"{t['op']} {t['s']:.2f} s ({100 * t['share']:.0f}%)" for t in p["top"][:5])
            lines.append(f"- {r}, ran {p['ran_in']}, {p['total_s']:.2f} s: {top}")
        lines.append("")
    return "\n".join(lines)


TARGET_RATIO, TARGET_PSNR = 1.2, 40.0


def cpu_paths_verdict(report: dict) -> dict:
    """The CPU-path target per thread count: among our rows with an end-to-end PSNR ≥ 40 dB, the best
    paired speed-up over the peer per component and end to end, and whether each reaches 1.2×."""
    out = {}
    for threads, block in report["by_threads"].items():
        ours = {r: x for r, x in block["results"].items() if r != CPU_PATHS_PEER and not r.startswith("OpenVINO ")
                and (x["end_to_end"]["psnr_db"] is None or x["end_to_end"]["psnr_db"] >= TARGET_PSNR)}
        v = {}
        for c in ("unet", "vae_decoder", "end_to_end"):
            best = max(ours, key=lambda r: ours[r][c]["vs_peer"]["median"]) if ours else None
            ratio = ours[best][c]["vs_peer"]["median"] if best else None
            v[c] = {"row": best, "vs_peer": ratio, "met": bool(ratio and ratio >= TARGET_RATIO)}
        out[threads] = v
    return out


def _verdict_lines(report: dict) -> list[str]:
    lines = []
    for threads, v in cpu_paths_verdict(report).items():
        parts = [f"{c}: {x['row']} {x['vs_peer']:.2f}× ({'met' if x['met'] else 'NOT met'})" if x["row"] else f"{c}: no row"
                 for c, x in v.items()]
        lines.append(f"- {threads} thread(s), fastest of ours at ≥ {TARGET_PSNR:.0f} dB end to end vs the peer "
                     f"(target ≥ {TARGET_RATIO}×): " + "; ".join(parts))
    return lines + [""]


def _ratio(p: dict) -> str:
    return f"{p['median']:.2f} ({p['min']:.2f}–{p['max']:.2f})"
