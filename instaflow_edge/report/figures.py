"""The report's pictures: the image grid, a difference heat map per export, the latency chart; and the
latency rows read from ``instaflow-edge bench`` results.

matplotlib is used through its object API (``Figure`` + the Agg canvas): no pyplot, no global backend
switch, nothing left behind in the process.
"""

from __future__ import annotations

from pathlib import Path

GPU_ROWS = ("torch fp16 eager", "torch fp16 compile")


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizes
        return ImageFont.load_default()


def grid(images: dict[str, list], prompts: list[str], path: Path, cell: int = 160) -> None:
    """Rows: prompts; columns: the reference, then each export. ``images[label]``: HWC float arrays in [0, 1]."""
    import numpy as np
    from PIL import Image, ImageDraw

    labels = list(images)
    head, side = 48, 210
    W, H = side + cell * len(labels), head + cell * len(prompts)
    out = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(out)
    f = _font(16)
    for j, lab in enumerate(labels):
        words, lines = lab.split(), [""]
        for w in words:  # wrap the column label on two lines
            if len(lines[-1]) + len(w) > 16 and lines[-1]:
                lines.append("")
            lines[-1] = (lines[-1] + " " + w).strip()
        d.multiline_text((side + j * cell + 4, 3), "\n".join(lines[:2]), fill="black", font=f)
    for i, p in enumerate(prompts):
        words, lines = p.split(), [""]
        for w in words:  # the prompt on up to three lines
            if len(lines[-1]) + len(w) > 22 and lines[-1]:
                lines.append("")
            lines[-1] = (lines[-1] + " " + w).strip()
        d.multiline_text((4, head + i * cell + cell // 2 - 20), "\n".join(lines[:3]), fill="black", font=f)
        for j, lab in enumerate(labels):
            arr = (np.asarray(images[lab][i]) * 255).round().clip(0, 255).astype("uint8")
            im = Image.fromarray(arr).resize((cell - 6, cell - 6), Image.NEAREST)
            out.paste(im, (side + j * cell + 3, head + i * cell + 3))
    out.save(path)


def heatmap(ref: list, imgs: list, prompts: list[str], label: str, path: Path) -> float:
    """|export − reference| per pixel (max over RGB, in [0, 1] pixel units), one panel per prompt, one
    colour scale for the figure; returns its top (the largest difference)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    diffs = [np.abs(np.asarray(a) - np.asarray(b)).max(axis=2) for a, b in zip(imgs, ref)]
    top = max(float(d.max()) for d in diffs) or 1e-6
    n = len(diffs)
    fig = Figure(figsize=(2.2 * n + 0.8, 2.6), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, n, squeeze=False)[0]
    im = None
    for ax, dmap, p in zip(axes, diffs, prompts):
        im = ax.imshow(dmap, cmap="inferno", vmin=0, vmax=top, interpolation="nearest")
        ax.set_title(p if len(p) <= 22 else p[:21] + "…", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=list(axes), fraction=0.03, pad=0.02).ax.tick_params(labelsize=7)
    fig.suptitle(f"|{label} − reference| (pixels in [0, 1]; max {top:.3g})", fontsize=9)
    fig.savefig(path)
    return top


def latency_rows(benches: list[dict], report_labels: list[str]) -> dict:
    """The rows of the latency table from ``instaflow-edge bench`` results: one per (result, runtime),
    CPU and GPU side by side; when no GPU result was given, the GPU rows a ``--device cuda`` run would
    have (torch fp16 eager and compile, each ONNX export through ORT's CUDA provider) are listed as
    missing."""
    rows, skipped = [], []
    devices = set()
    onnx_rows: list[str] = []
    for i, b in enumerate(benches):
        dev = b.get("device", "cpu")
        devices.add(dev)
        gpu = (b.get("gpu") or {}).get("name")
        res = b.get("results") or {}
        mem = b.get("memory") or {}
        base = next(iter(res), None)
        for k, r in res.items():
            e = r.get("end_to_end") or r.get("generator") or {}
            row = {"runtime": k, "device": dev, "hardware": gpu or _cpu_name(b), "threads": b.get("threads"),
                   "bench": i, "end_to_end_s": e.get("median_s"), "end_to_end_p90_s": e.get("p90_s"),
                   "speedup_vs_first": e.get("speedup_vs_" + base.replace(" ", "_")) if base else None,
                   "peak_rss_mib": (mem.get(k) or {}).get("peak_rss_mib")}
            for s in ("text_encoder", "unet", "vae_decoder"):
                row[f"{s}_s"] = (r.get(s) or {}).get("median_s")
            row["unet_pct_of_peak"] = (r.get("unet") or {}).get("pct_of_peak")
            rows.append(row)
            if k.startswith("ort ") and k not in onnx_rows:
                onnx_rows.append(k)
        skipped += [{"runtime": k, "device": dev, "why": why} for k, why in (b.get("skipped") or {}).items()]
    missing = []
    if rows and "cuda" not in devices:
        for k in (*GPU_ROWS, *[f"{k} (CUDA provider)" for k in onnx_rows]):
            missing.append({"runtime": k, "device": "cuda", "why": "no GPU result given (instaflow-edge bench --device cuda)"})
    sources = [{"bench": i, "device": b.get("device", "cpu"), "created": b.get("created"), "threads": b.get("threads"),
                "repeats": b.get("repeats"), "interleaved": b.get("interleaved"), "note": b.get("note")}
               for i, b in enumerate(benches)]
    return {"rows": rows, "missing": missing, "skipped": skipped, "gpu_missing": bool(rows) and "cuda" not in devices,
            "sources": sources}


def _cpu_name(b: dict) -> str:
    m = b.get("machine") or {}
    cpu = m.get("cpu") or {}
    return f"CPU ({cpu.get('logical_cores') or b.get('cpu_cores') or '?'} cores)"


def chart(latency: dict, path: Path) -> None:
    """End-to-end median (bar) and p90 (whisker) per runtime, CPU and GPU side by side; GPU rows that are
    missing are drawn as labelled gaps."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [r for r in latency["rows"] if r["end_to_end_s"]]
    names = [f"{r['runtime']} [{r['device']}]" for r in rows] + [f"{m['runtime']} [cuda]" for m in latency["missing"]]
    fig = Figure(figsize=(7, 0.45 * len(names) + 1.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ys = list(range(len(names)))[::-1]
    vals = [r["end_to_end_s"] * 1e3 for r in rows]
    errs = [max(0.0, (r["end_to_end_p90_s"] - r["end_to_end_s"]) * 1e3) for r in rows]
    colors = ["#3b7dd8" if r["device"] == "cpu" else "#2ca25f" for r in rows]
    ax.barh(ys[:len(rows)], vals, xerr=[[0.0] * len(errs), errs], color=colors, capsize=3)  # whisker: up to p90
    for y, v, err in zip(ys, vals, errs):
        ax.text(v + err, y, f"  {v:.3g} ms", va="center", fontsize=8)
    for y in ys[len(rows):]:
        ax.text(0, y, " missing: no GPU result", va="center", fontsize=8, color="#a33")
    ax.set_yticks(ys)
    ax.set_yticklabels(names, fontsize=8)
    ax.set_xlabel("one image, end to end (ms): median, whisker to p90")
    ax.set_xscale("log" if vals and max(vals) / max(min(vals), 1e-9) > 30 else "linear")
    ax.margins(x=0.25)
    fig.tight_layout()
    fig.savefig(path)
