"""``report.json`` → ``report.html`` (self-contained, readable on a phone) and ``report.md``.

Every string from an input (labels, paths, bench fields, options) is escaped: HTML-escaped on the page;
in the markdown, ``&<>`` become entities (no raw HTML reaches a renderer), table pipes, link brackets,
emphasis and backquotes are backslash-escaped and newlines folded. Every figure on the page comes from ``report.json``; each table cell that shows one carries its place
in the JSON (``data-path``), so a test can check that the page says what the JSON says.
"""

from __future__ import annotations

import base64
import html as _html
import json
import re
from pathlib import Path

COMPONENTS = ("text_encoder", "unet", "vae_decoder", "end_to_end")
EDIT_ROWS = ("vae_encoder", "image_to_image")  # exports that edit images (see report.json's image_to_image)


_MD_META = re.compile(r"([\\`*\[\]|~])")


def _md(v) -> str:
    """``v`` as inert markdown text on one line."""
    s = " ".join(str(v).split())
    s = s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _MD_META.sub(r"\\\1", s)


def _psnr(v):
    return "inf" if v is None else f"{v:.2f}"


def _g(v, spec=".3g"):
    return "–" if v is None else format(v, spec)


def _ms(v):
    return "–" if v is None else f"{v * 1e3:.4g}"


def _pass(v):
    return "–" if v is None else ("pass" if v else "FAIL")


def _summary(report: dict):
    """One row per runtime: size, the UNet's bits per weight, end-to-end parity and its gate, digits
    accuracy/FID where measured, the verdict."""
    d = (report.get("digits") or {}).get("runtimes") or {}
    head = ["runtime", "size MB", "UNet bits / weight", "end-to-end PSNR dB", "gate dB"]
    head += ["digits accuracy", "digits-FID"] if d else []
    head.append("verdict")
    rows = []
    for label, rt in report["runtimes"].items():
        par = (report["parity"].get(label) or {}).get("end_to_end")
        u = rt["sizes"].get("unet") or {}
        row = [(label, None), (_g(rt["total_bytes"] / 1e6 if rt.get("total_bytes") else None, ".4g"), None),
               (_g(u.get("bits_per_weight"), ".2f"), ["runtimes", label, "sizes", "unet", "bits_per_weight"])]
        if par is None:
            row += [("reference", None), ("–", None)]
        elif par.get("error"):
            row += [("error", None), (_g(par["gate"], "g"), ["parity", label, "end_to_end", "gate"])]
        else:
            row += [(_psnr(par["psnr"]), ["parity", label, "end_to_end", "psnr"]), (_g(par["gate"], "g"), ["parity", label, "end_to_end", "gate"])]
        if d:
            r = d.get(label)
            row += [(f"{r['accuracy']:.3f}", ["digits", "runtimes", label, "accuracy"]) if r else ("–", None),
                    (f"{r['fid']:.2f}", ["digits", "runtimes", label, "fid"]) if r else ("–", None)]
        v = report["verdicts"].get(label)
        row.append(("reference" if v is None else _pass(v["pass"]), None))
        rows.append(row)
    return ("summary", "Summary", head, rows)


def _rows(report: dict):
    """The tables as (title, header, rows); a row is a list of (text, json path or None[, scale])."""
    tables = [_summary(report)]
    rows = []
    for label, comps in report["parity"].items():
        for c in [c for c in (*COMPONENTS, *EDIT_ROWS) if c in comps]:
            r = comps[c]
            p = ["parity", label, c]
            if r.get("error"):
                rows.append([(label, None), (c, None), ("error", None), (r["error"], None), ("–", None),
                             (_g(r["gate"], "g"), p + ["gate"]), (_pass(r["pass"]), None)])
                continue
            rows.append([(label, None), (c, None), (_psnr(r["psnr"]), p + ["psnr"]), (_g(r["max_abs"]), p + ["max_abs"]),
                         (f"{r['cosine']:.6f}", p + ["cosine"]), (_g(r["gate"], "g"), p + ["gate"]),
                         (_pass(r["pass"]), None)])
    tables.append(("parity", "Parity vs the PyTorch fp32 reference (same prompts and seeds)",
                   ["export", "component", "PSNR dB", "max abs", "cosine", "gate dB", ""], rows))
    rows = []
    for label, rt in report["runtimes"].items():
        for c, s in rt["sizes"].items():
            p = ["runtimes", label, "sizes", c]
            rows.append([(label, None), (c, None), (_g(s["bytes"] / 1e6 if s["bytes"] else None, ".4g"), None),
                         (_g(s["params"], ","), p + ["params"]), (_g(s["bits_per_weight"], ".2f"), p + ["bits_per_weight"])])
    tables.append(("sizes", "Sizes", ["runtime", "component", "MB", "parameters", "bits / weight"], rows))
    d = report.get("digits")
    if d:
        rows = [[(label, None), (f"{r['accuracy']:.3f}", ["digits", "runtimes", label, "accuracy"]),
                 (f"{r['fid']:.2f}", ["digits", "runtimes", label, "fid"])] for label, r in d["runtimes"].items()]
        rows.append([("real digits (ceiling)", None), (f"{d['real']['accuracy']:.3f}", ["digits", "real", "accuracy"]),
                     (f"{d['real']['fid']:.2f}", ["digits", "real", "fid"])])
        tables.append(("digits", f"Digits judge: prompt accuracy and digits-FID ({d['num_images']} images per runtime)",
                       ["runtime", "prompt accuracy", "digits-FID"], rows))
    lat = report.get("latency") or {}
    if lat.get("rows") or lat.get("missing"):
        rows = []
        for i, r in enumerate(lat["rows"]):
            p = ["latency", "rows", i]
            rows.append([(r["runtime"], None), (r["device"], None), (r["hardware"], None), (_g(r["threads"], "d"), None),
                         (_ms(r["text_encoder_s"]), p + ["text_encoder_s"], 1e3), (_ms(r["unet_s"]), p + ["unet_s"], 1e3),
                         (_ms(r["vae_decoder_s"]), p + ["vae_decoder_s"], 1e3), (_ms(r["end_to_end_s"]), p + ["end_to_end_s"], 1e3),
                         (_ms(r["end_to_end_p90_s"]), p + ["end_to_end_p90_s"], 1e3),
                         (_g(r["unet_pct_of_peak"], ".1f"), p + ["unet_pct_of_peak"]),
                         (_g(r["speedup_vs_first"], ".2f"), p + ["speedup_vs_first"]),
                         (_g(r["peak_rss_mib"], ".0f"), p + ["peak_rss_mib"])])
        for m in lat["missing"] + lat["skipped"]:
            rows.append([(m["runtime"], None), (m["device"], None), (f"missing: {m['why']}", None)] + [("–", None)] * 9)
        tables.append(("latency", "Latency, one image (ms; from the bench results given)",
                       ["runtime", "device", "hardware", "threads", "text encoder", "UNet", "VAE decoder",
                        "end to end (median)", "p90", "UNet % of peak", "× first row", "peak RSS MiB"], rows))
    return tables


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{_html.escape(alt)}">'


CSS = """
body{font:15px/1.45 -apple-system,system-ui,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1100px;padding:12px;color:#222}
h1{font-size:1.4em;margin:.2em 0}h2{font-size:1.15em;margin:1.2em 0 .4em;border-bottom:1px solid #ddd}
.scroll{overflow-x:auto;-webkit-overflow-scrolling:touch}
table{border-collapse:collapse;font-size:13px;white-space:nowrap}
th,td{border:1px solid #ddd;padding:3px 7px;text-align:right}th{background:#f4f4f4}
td:first-child,td:nth-child(2),th:first-child{text-align:left}
img{max-width:100%;height:auto;image-rendering:pixelated}
.pass{color:#176b2c;font-weight:600}.fail{color:#b00020;font-weight:600}.na{color:#777}
.meta{color:#555;font-size:13px}li{margin:.25em 0}
"""


def _table(key: str, title: str, head: list, rows: list) -> str:
    e = _html.escape
    out = [f"<h2>{e(title)}</h2>"] if title else []
    out.append(f"<div class=scroll><table id='{key}'><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr></thead><tbody>")
    for row in rows:
        cells = []
        for text, path, *scale in row:
            cls = " class=pass" if text == "pass" else (" class=fail" if text == "FAIL" else "")
            attr = f" data-path='{e(json.dumps(path))}'" if path else ""
            attr += f" data-scale='{scale[0]:g}'" if scale else ""
            cells.append(f"<td{cls}{attr}>{e(str(text))}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table></div>")
    return "\n".join(out)


def html(report: dict, folder: Path) -> str:
    """The page, every image inline (data URIs), no script, no network."""
    e = _html.escape
    out = ["<!doctype html><html lang=en><head><meta charset=utf-8>",
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>instaflow-edge report: {e(report['model'])}</title><style>{CSS}</style></head><body>",
           f"<h1>Parity report: {e(report['model'])}</h1>",
           f"<p class=meta>{e(report['created'])} · {len(report['prompts'])} prompts, seeds "
           f"{e(str(report['seeds'][0]))}–{e(str(report['seeds'][-1]))} · image {e(str(report['image_size'][0]))}×{e(str(report['image_size'][1]))} · "
           f"instaflow-edge {e(str(report['versions'].get('instaflow-edge')))}, torch {e(str(report['versions'].get('torch')))}, "
           f"onnxruntime {e(str(report['versions'].get('onnxruntime')))}</p>",
           "<h2>Verdicts</h2><ul>"]
    for label, v in report["verdicts"].items():
        cls = "na" if v["pass"] is None else ("pass" if v["pass"] else "fail")
        out.append(f"<li class={cls} data-verdict='{e(label)}'>{e(v['line'])}</li>")
    if not report["verdicts"]:
        out.append("<li class=na>no exports given: the reference alone</li>")
    out.append("</ul>")
    tables = _rows(report)
    out.append(_table(*tables[0]))
    out.append("<h2>How each runtime ran</h2><ul>")
    for label, rt in report["runtimes"].items():
        out.append(f"<li><b>{e(label)}</b>: {e(rt['how'])}" + (f" <span class=meta>({e(rt['folder'])})</span>" if rt["folder"] else "") + "</li>")
    out.append("</ul>")
    files = report["files"]
    out.append("<h2>Images</h2><p class=meta>Rows: prompts; columns: the reference, then each export.</p>")
    out.append(_img(folder / files["grid"], "image grid"))
    for key, title, head, rows in tables:
        if key == "summary":
            continue
        out.append(f"<h2>{e(title)}</h2>")
        if key == "latency" and files.get("chart"):
            out.append(_img(folder / files["chart"], "latency chart"))
        out.append(_table(key, "", head, rows))
        if key == "parity" and files.get("heatmaps"):
            out.append("<h2>Difference heat maps</h2>")
            for label, name in files["heatmaps"].items():
                out.append(_img(folder / name, f"difference heat map of {label}"))
    d = report.get("digits")
    if d:
        out.append(f"<p class=meta>Judge validation accuracy {d['judge_val_accuracy']:.3f}; the ceiling is real digits "
                   f"(FID of {d['real']['fid_n']} real images vs the validation set, the same N).</p>")
    lat = report.get("latency") or {}
    for src in lat.get("sources", []):
        out.append(f"<p class=meta>Bench result {e(str(src['bench']))} ({e(str(src['device']))}, {e(str(src['created']))}, "
                   f"{e(str(src['threads']))} thread(s), {e(str(src['repeats']))} rounds, {'interleaved' if src['interleaved'] else 'sequential'})"
                   + (f": {e(str(src['note']))}" if src.get("note") else "") + "</p>")
    if lat.get("gpu_missing"):
        out.append("<p class=meta>GPU rows are missing: no <code>instaflow-edge bench --device cuda</code> result was given.</p>")
    out.append(f"<p class=meta>Made by <code>{e(' '.join(report['command']))}</code> in {e(str(report['seconds']))} s.</p></body></html>\n")
    return "\n".join(out)


def markdown(report: dict) -> str:
    """The report for a pull request or a model card (images referenced as the folder's files)."""
    m = _md
    out = [f"# Parity report: {m(report['model'])}", "",
           f"{len(report['prompts'])} prompts, seeds {m(report['seeds'][0])}–{m(report['seeds'][-1])}, "
           f"image {m(report['image_size'][0])}×{m(report['image_size'][1])}; {m(report['created'])}.", "", "## Verdicts", ""]
    out += [f"- {m(v['line'])}" for v in report["verdicts"].values()] or ["- no exports given"]
    out += ["", "## How each runtime ran", ""]
    out += [f"- **{m(k)}**: {m(rt['how'])}" for k, rt in report["runtimes"].items()]
    out += ["", "## Images", "", f"![image grid]({report['files']['grid']})", ""]
    for key, title, head, rows in _rows(report):
        if key == "latency" and report["files"].get("chart"):
            out += [f"## {m(title)}", "", f"![latency]({report['files']['chart']})", ""]
        else:
            out += [f"## {m(title)}", ""]
        out.append("| " + " | ".join(m(h) for h in head) + " |")
        out.append("|" + "---|" * len(head))
        out += ["| " + " | ".join(m(cell[0]) for cell in row) + " |" for row in rows]
        out.append("")
        if key == "parity":
            for label, name in report["files"].get("heatmaps", {}).items():
                out += [f"![{m(label)} difference]({name})", ""]
        if key == "latency":
            out += [f"- bench result {m(s['bench'])} ({m(s['device'])}, {m(s['created'])}, {m(s['threads'])} thread(s), "
                    f"{m(s['repeats'])} rounds)" + (f": {m(s['note'])}" if s.get("note") else "")
                    for s in report["latency"].get("sources", [])] + [""]
    return "\n".join(out)
