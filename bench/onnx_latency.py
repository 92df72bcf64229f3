"""One-step latency: torch eager fp32 vs ONNX Runtime exports (fp32 optimized, fp16, int8-static…).

    python -m instaflow_edge.bench.onnx_latency MODEL --export fp32=DIR --export int8-static=DIR \
        [--threads 1] [--warmup 1] [--repeats 5] [--device cpu|cuda] [--sequential] [-o NAME.json]

Each run is the whole one-step image (text encoder → one-step UNet → VAE decoder) with a clock
between the stages, so per-component and end-to-end figures come from the same runs; the fused
generator (``generator/model.onnx``, when exported) is timed as its own run. Warm-up runs are
discarded; median and p90 are reported; threads are pinned (torch and ORT intra-op) and stated.
Runtimes are interleaved: every round runs each once (order rotated), and a speed-up is the median
of the per-round ratios (with their min–max), so a slow phase of a shared machine hits both sides of
a ratio; ``--sequential`` times one runtime after another instead (less memory). Ratios are vs torch
eager and vs the first ONNX export given. The machine's fp32
matmul peak is measured in the same process, so each figure is also a % of peak (FLOPs counted with
torch's FlopCounterMode on the torch modules). With ``--device cuda`` torch runs fp16 eager and
``torch.compile`` and ORT uses its CUDA provider when installed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from .common import save_json

STAGES = ("text_encoder", "unet", "vae_decoder")


def _stats(xs: list[float]) -> dict:
    xs = sorted(xs)
    p90 = xs[min(len(xs) - 1, int(round(0.9 * (len(xs) - 1))))]
    return {"median_s": statistics.median(xs), "p90_s": p90, "n": len(xs)}


def matmul_peak(threads: int, device: str, n: int = 2048, reps: int = 5) -> float:
    """Best fp32 (fp16 on cuda) GEMM GFLOP/s of an n×n×n matmul."""
    import torch

    torch.set_num_threads(threads)
    dt = torch.float16 if device == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dt), torch.randn(n, n, device=device, dtype=dt)
    best = float("inf")
    for _ in range(reps + 1):
        _sync(device)
        t = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _time_runs(run_once, warmup: int, repeats: int) -> dict:
    """``run_once()`` returns {stage: seconds}; returns {stage: stats} plus end_to_end."""
    return _time_interleaved({"x": run_once}, warmup, repeats)["x"]


def _time_interleaved(runners: dict, warmup: int, repeats: int) -> dict:
    """Rounds of one run of every runner, the order rotated each round, so slow phases of a noisy
    machine hit every runner alike. Returns {label: {stage: stats}}; each stage's raw times are kept
    in ``times_s`` so ratios can be paired by round (``_paired``)."""
    labels = list(runners)
    for _ in range(warmup):
        for k in labels:
            runners[k]()
    per: dict[str, dict[str, list[float]]] = {k: {} for k in labels}
    for r in range(repeats):
        for k in labels[r % len(labels):] + labels[:r % len(labels)]:
            t = runners[k]()
            if len(t) > 1:
                t["end_to_end"] = sum(t.values())
            for stage, v in t.items():
                per[k].setdefault(stage, []).append(v)
    return {k: {stage: {**_stats(v), "times_s": [round(x, 6) for x in v]} for stage, v in st.items()}
            for k, st in per.items()}


def _paired(ref: list[float], other: list[float]) -> dict:
    """Speed-up of ``other`` over ``ref`` per round (ref ÷ other): median, min, max."""
    rs = sorted(a / b for a, b in zip(ref, other))
    return {"median": round(statistics.median(rs), 3), "min": round(rs[0], 3), "max": round(rs[-1], 3)}


def torch_runner(pipe, inputs: dict, device: str, dtype, compile_: bool = False):
    import torch

    from instaflow_edge.components import COMPONENTS

    mods = {n: COMPONENTS[n].module(pipe).to(device, dtype) for n in STAGES}
    if compile_:
        mods = {n: torch.compile(m) for n, m in mods.items()}
    ids = torch.from_numpy(inputs["input_ids"]).to(device)
    noise = torch.from_numpy(inputs["noise"]).to(device, dtype)

    @torch.no_grad()
    def once():
        t, out = {}, {}
        t0 = time.perf_counter()
        out["ehs"] = mods["text_encoder"](ids)
        _sync(device)
        t["text_encoder"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        lat = mods["unet"](noise, out["ehs"])
        _sync(device)
        t["unet"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        mods["vae_decoder"](lat / pipe.scaling_factor)
        _sync(device)
        t["vae_decoder"] = time.perf_counter() - t0
        return t

    return once


def ort_runner(folder: Path, inputs: dict, threads: int, providers: list[str]):
    from instaflow_edge.runtime import onnx_io
    from instaflow_edge.runtime.onnx import unet_feed

    s = {n: onnx_io.session(folder / n / onnx_io.MODEL_FILE, threads=threads, providers=providers) for n in STAGES}
    scale = json.loads((folder / "manifest.json").read_text())["onnx"]["scaling_factor"]

    def once():
        t = {}
        t0 = time.perf_counter()
        ehs = s["text_encoder"].run(None, {"input_ids": inputs["input_ids"]})[0]
        t["text_encoder"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        lat = s["unet"].run(None, unet_feed(s["unet"], inputs["noise"], ehs))[0]
        t["unet"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        s["vae_decoder"].run(None, {"latent_sample": lat / scale})
        t["vae_decoder"] = time.perf_counter() - t0
        return t

    return once


def ort_fused_runner(folder: Path, inputs: dict, threads: int, providers: list[str]):
    from instaflow_edge.runtime import onnx_io

    s = onnx_io.session(folder / "generator" / onnx_io.MODEL_FILE, threads=threads, providers=providers)

    def once():
        t0 = time.perf_counter()
        s.run(None, {"input_ids": inputs["input_ids"], "noise": inputs["noise"]})
        return {"generator": time.perf_counter() - t0}

    return once


def count_flops(pipe, inputs: dict) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from instaflow_edge.components import COMPONENTS

    ids, noise = torch.from_numpy(inputs["input_ids"]), torch.from_numpy(inputs["noise"])
    flops = {}
    with torch.no_grad():
        for n, args in (("text_encoder", (ids,)),):
            with FlopCounterMode(display=False) as fc:
                ehs = COMPONENTS[n].module(pipe)(*args)
            flops[n] = fc.get_total_flops()
        with FlopCounterMode(display=False) as fc:
            lat = COMPONENTS["unet"].module(pipe)(noise, ehs)
        flops["unet"] = fc.get_total_flops()
        with FlopCounterMode(display=False) as fc:
            COMPONENTS["vae_decoder"].module(pipe)(lat / pipe.scaling_factor)
        flops["vae_decoder"] = fc.get_total_flops()
    flops["end_to_end"] = sum(flops.values())
    flops["generator"] = flops["end_to_end"]
    return flops


def bench(model: str, exports: dict[str, Path], threads: int, warmup: int, repeats: int, device: str,
          interleave: bool = True) -> dict:
    """Time torch and every export. Interleaved (default): all runtimes stay loaded and each round runs
    each once, order rotated, and speed-ups are medians of per-round ratios (paired, so a slow phase of
    the machine cancels). ``interleave=False`` loads one runtime at a time (less memory: at SD1.5 the
    interleaved run holds torch + every export, ≈ 15 GiB) and compares medians."""
    import gc

    import torch

    from instaflow_edge.envinfo import collect
    from instaflow_edge.errors import DeviceError
    from instaflow_edge.generator import make_noise
    from instaflow_edge.pipeline import load_pipeline

    torch.set_num_threads(threads)
    pipe = load_pipeline(model, "cpu", "float32", local_files_only=True)
    from instaflow_edge.components import EXAMPLE_PROMPTS, Sizes

    sizes = Sizes.of(pipe)
    inputs = {"input_ids": pipe.tokenize(EXAMPLE_PROMPTS[:1]).numpy(),
              "noise": make_noise([0], (sizes.latent_channels, sizes.latent_height, sizes.latent_width)).numpy()}
    peak = matmul_peak(threads, device)
    flops = count_flops(pipe, inputs)
    makers: dict[str, object] = {}  # label -> () -> runner, built lazily so the sequential mode holds one
    providers = ["CPUExecutionProvider"]
    if device == "cuda":
        makers["torch fp16 eager"] = lambda: torch_runner(pipe, inputs, "cuda", torch.float16)
        makers["torch fp16 compile"] = lambda: torch_runner(pipe, inputs, "cuda", torch.float16, True)
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        import onnxruntime as ort

        if exports and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise DeviceError("ONNX exports were given with --device cuda, but onnxruntime has no CUDAExecutionProvider here",
                              "install onnxruntime-gpu, or drop the exports to time the torch rows only")
    else:
        makers["torch eager fp32"] = lambda: torch_runner(pipe, inputs, "cpu", torch.float32)
    for label, folder in exports.items():
        makers[f"ort {label}"] = lambda folder=folder: ort_runner(folder, inputs, threads, providers)
        q = json.loads((folder / "manifest.json").read_text()).get("quantize") or {}
        # the fused generator is timed where it carries the export's precision (schemes leave it fp32)
        if (folder / "generator" / "model.onnx").is_file() and (not q.get("scheme") or "generator" in q.get("components", [])):
            makers[f"ort {label} fused"] = lambda folder=folder: ort_fused_runner(folder, inputs, threads, providers)
    # torch.compile needs its own warm-up (compilation) beyond the others'
    extra = {k: 2 for k in makers if "compile" in k}
    if interleave:
        runners = {k: make() for k, make in makers.items()}
        for k, n in extra.items():
            for _ in range(n):
                runners[k]()
        results = _time_interleaved(runners, warmup, repeats)
        del runners
    else:
        results = {}
        torch_labels = [k for k in makers if k.startswith("torch")]
        for k, make in makers.items():
            results[k] = _time_runs(make(), warmup + extra.get(k, 0), repeats)
            if k == torch_labels[-1]:
                pipe = None  # every torch runtime timed: free the pipeline before ORT loads
            gc.collect()
    del pipe
    gc.collect()
    base = next(iter(results))
    first_ort = next((k for k in results if k.startswith("ort ") and not k.endswith("fused")), None)
    refs = [base] + ([first_ort] if first_ort else [])
    for k, r in results.items():
        for stage, st in r.items():
            st["pct_of_peak"] = round(100 * flops[stage] / st["median_s"] / 1e9 / peak, 2) if st["median_s"] else None
            ref_stage = "end_to_end" if stage == "generator" else stage
            for ref in refs:
                key = "speedup_vs_" + ref.replace(" ", "_")
                ref_st = results[ref][ref_stage]
                if interleave:
                    paired = _paired(ref_st["times_s"], st["times_s"])
                    st[key], st[key + "_range"] = paired["median"], [paired["min"], paired["max"]]
                else:
                    st[key] = round(ref_st["median_s"] / st["median_s"], 3)
    return {"model": model, "device": device, "threads": threads, "warmup": warmup, "repeats": repeats,
            "interleaved": interleave, "image": [sizes.height, sizes.width], "matmul_peak_gflops": round(peak, 1),
            "gflop": {k: round(v / 1e9, 3) for k, v in flops.items()}, "exports": {k: str(v) for k, v in exports.items()},
            "results": results, "machine": collect()}


def table(report: dict) -> str:
    res = report["results"]
    base = next(iter(res))
    first_ort = next((k for k in res if k.startswith("ort ") and not k.endswith("fused")), None)
    head = f"{'runtime':<24} {'stage':<13} {'median s':>10} {'p90 s':>10} {'% peak':>7} {'× ' + base[:12]:>16} {'× ' + (first_ort or '')[:12]:>16}"
    lines = [f"{report['model']}  {report['device']}  threads={report['threads']}  matmul peak {report['matmul_peak_gflops']} GFLOP/s",
             head, "-" * len(head)]
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
    return "\n".join(lines)


def markdown(report: dict) -> str:
    """The report as the README's table: one row per runtime, stages in columns, speed-ups of the UNet
    and end to end vs torch and vs the first ORT export (paired per-round min–max where interleaved)."""
    res = report["results"]
    base = next(iter(res))
    first_ort = next((k for k in res if k.startswith("ort ") and not k.endswith("fused")), None)
    unit, scale = ("ms", 1e3) if res[base]["end_to_end"]["median_s"] < 1 else ("s", 1.0)

    def t(st):
        return f"{st['median_s'] * scale:.3g} {unit}"

    def x(st, ref):
        if not ref:
            return "–"
        v, r = st.get("speedup_vs_" + ref.replace(" ", "_")), st.get("speedup_vs_" + ref.replace(" ", "_") + "_range")
        if v is None:
            return "–"
        return f"{v:.2f}" + (f" ({r[0]:.2f}–{r[1]:.2f})" if r and r[0] != r[1] else "")

    lines = [f"| runtime | text encoder | UNet (% of peak) | VAE decoder | end to end (median / p90) | "
             f"UNet × {base} | end to end × {base} | UNet × {first_ort or '–'} | end to end × {first_ort or '–'} |",
             "|---|---|---|---|---|---|---|---|---|"]
    for k, r in res.items():
        if "generator" in r:
            g = r["generator"]
            lines.append(f"| {k} | | | | {t(g)} / {g['p90_s'] * scale:.3g} {unit} | | {x(g, base)} | | {x(g, first_ort)} |")
            continue
        e = r["end_to_end"]
        lines.append(f"| {k} | {t(r['text_encoder'])} | {t(r['unet'])} ({r['unet']['pct_of_peak']:.0f}%) | "
                     f"{t(r['vae_decoder'])} | {t(e)} / {e['p90_s'] * scale:.3g} {unit} | {x(r['unet'], base)} | "
                     f"{x(e, base)} | {x(r['unet'], first_ort)} | {x(e, first_ort)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", help="the pipeline folder the exports came from (torch reference)")
    ap.add_argument("--export", action="append", default=[], metavar="LABEL=DIR", help="an ONNX export folder (repeatable)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--markdown", type=Path, default=None, metavar="JSON",
                    help="print the README table of a saved report and exit (no timing)")
    ap.add_argument("--sequential", action="store_true",
                    help="load and time one runtime at a time (less memory; ratios of medians instead of paired per-round ratios)")
    ap.add_argument("-o", "--output", type=Path, default=None, help="JSON path (default: <model>-<device>.json here)")
    a = ap.parse_args(argv)
    if a.markdown:
        print(markdown(json.loads(a.markdown.read_text())))
        return 0
    if not a.model:
        ap.error("MODEL is required (the pipeline folder the exports came from)")
    exports = {}
    for e in a.export:
        label, _, d = e.partition("=")
        if not d or not (Path(d) / "manifest.json").is_file():
            ap.error(f"--export {e!r}: expected LABEL=DIR with an ONNX export folder")
        exports[label] = Path(d)
    if a.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            ap.error("--device cuda: no CUDA GPU is visible here")
    report = bench(a.model, exports, a.threads, a.warmup, a.repeats, a.device, interleave=not a.sequential)
    print(table(report))
    out = save_json(a.output or Path(f"{Path(a.model).name}-{a.device}.json"), report)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
