"""The fastest CPU path: our exports against OpenVINO's default on our plain ONNX export.

    python -m studies.cpu_paths MODEL --ort-fp32 DIR --plain DIR [--ort-int8 DIR] \
        [--openvino NAME=DIR ...] [--torch-bf16] [--threads 1 2] [--rounds 3] [--warmup 1] \
        [-o studies/results/cpu_paths-NAME.json] [--markdown REPORT.json]

MODEL is the pipeline the exports came from (the PyTorch fp32 reference). Rows:

- ``ORT fp32 (ours)``: ``--ort-fp32``, our optimized ONNX export (``convert --target onnx``), onnxruntime;
- ``ORT int8-static (ours)``: ``--ort-int8`` (``convert --target onnx --quantize int8-static``);
- ``OpenVINO default, plain export (peer)``: ``--plain`` (``convert --target onnx --optimize none``) loaded
  by ``openvino.Core().compile_model(path, "CPU")`` with nothing changed but the thread count: what a
  user who takes our ONNX export to OpenVINO gets;
- ``OpenVINO f32 hint, plain export``: the same with ``INFERENCE_PRECISION_HINT=f32``;
- ``openvino NAME (ours)``: each ``--openvino NAME=DIR`` (``convert --target openvino``), compiled as
  ``generate --backend openvino`` compiles it;
- ``torch bf16 autocast`` (``--torch-bf16``): the PyTorch modules under ``torch.autocast("cpu", bfloat16)``.

Per thread count, component by component (text encoder, UNet, VAE decoder; only one component's
models are loaded at a time, so SD1.5 fits in RAM): every row's session is built, then warm-up calls,
then rounds in which every row runs once (order rotated). A speed-up vs ORT fp32 is the median of the
per-round ratios (min–max given), so a slow phase of the shared machine hits both sides; end to end
is the per-round sum of the three components. PSNR (dB, vs the PyTorch fp32 module on the same inputs)
per component, and end to end on each row's own chain (its text encoder's output into its UNet, its
UNet's into its decoder). Each time is also a % of the measured matmul peak (``bench/peaks.py``) of the
precision the row computed in; FLOPs counted with torch's FlopCounterMode on the PyTorch modules.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

from instaflow_edge.runtime import onnx_io
from instaflow_edge.runtime import openvino as ovrt
from instaflow_edge.bench.common import machine, save_result
from instaflow_edge.bench.peaks import measure_peaks
from instaflow_edge.bench.tables import cpu_paths_markdown as markdown  # noqa: F401  (the table of a result)
from instaflow_edge.bench.tables import cpu_paths_verdict as verdict  # noqa: F401
from instaflow_edge.bench.tables import CPU_PATHS_PEER as PEER  # noqa: F401

COMPONENTS = ("text_encoder", "unet", "vae_decoder")
BASE = "ORT fp32 (ours)"


def _rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _paired(ref: list[float], other: list[float]) -> dict:
    """Speed-up of ``other`` over ``ref`` per round: median, min, max."""
    r = [a / b for a, b in zip(ref, other)]
    return {"median": round(statistics.median(r), 3), "min": round(min(r), 3), "max": round(max(r), 3)}


# --- rows: name -> {component: make(threads) -> (run(feed) -> output, precision)} -------------------

def _ort(folder: Path, name: str, threads: int):
    sess = onnx_io.session(folder / name / onnx_io.MODEL_FILE, threads=threads)
    return lambda feed: sess.run(None, _feed(sess.get_inputs(), feed))[0]


def _feed(inputs, feed: dict) -> dict:
    names = {i.name for i in inputs}
    return {k: v for k, v in feed.items() if k in names}


def _ov_plain(path: Path, threads: int, hint: str | None):
    import openvino as ov

    cfg = {"INFERENCE_NUM_THREADS": threads}
    if hint:
        cfg["INFERENCE_PRECISION_HINT"] = hint
    compiled = ov.Core().compile_model(str(path), "CPU", cfg)
    sess = ovrt.Session(compiled, path)
    return (lambda feed: sess.run(None, _feed(sess.get_inputs(), feed))[0]), sess.precision


def _ov_ours(folder: Path, name: str, threads: int):
    _, block = ovrt.export_facts(folder)
    sess = ovrt.compile_model(folder / name / ovrt.IR_FILE, block["precision"], threads)
    return (lambda feed: sess.run(None, _feed(sess.get_inputs(), feed))[0]), sess.precision


def _torch_bf16(modules: dict, name: str, threads: int):
    import torch

    mod = modules[name]

    def run(feed):
        torch.set_num_threads(threads)
        args = [torch.from_numpy(feed[k]) for k in _TORCH_ARGS[name]]
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return mod(*args).float().numpy()

    return run


_TORCH_ARGS = {"text_encoder": ("input_ids",), "unet": ("sample", "encoder_hidden_states"), "vae_decoder": ("latent_sample",)}


def _scheme_of(folder: Path) -> tuple[str | None, list[str]]:
    from instaflow_edge.artifacts import read_manifest

    q = (read_manifest(folder) or {}).get("quantize") or {}
    return q.get("scheme"), list(q.get("components") or [])


def build_rows(a, modules) -> dict:
    """{row: {component: make(threads) -> (run, precision)}}."""
    rows: dict = {}

    def ort_row(label, folder):
        scheme, comps = _scheme_of(folder)
        rows[label] = {c: (lambda t, c=c: (_ort(folder, c, t), "int8" if scheme and "int8" in scheme and c in comps else "fp32"))
                       for c in COMPONENTS}

    ort_row(BASE, Path(a.ort_fp32))
    if a.ort_int8:
        ort_row("ORT int8-static (ours)", Path(a.ort_int8))
    plain = Path(a.plain)
    rows[PEER] = {c: (lambda t, c=c: _prec(_ov_plain(plain / c / onnx_io.MODEL_FILE, t, None))) for c in COMPONENTS}
    rows["OpenVINO f32 hint, plain export"] = {c: (lambda t, c=c: _prec(_ov_plain(plain / c / onnx_io.MODEL_FILE, t, "f32")))
                                               for c in COMPONENTS}
    for item in a.openvino or []:
        name, _, folder = item.partition("=")
        folder = Path(folder)
        scheme, comps = _scheme_of(folder)
        rows[f"openvino {name} (ours)"] = {
            c: (lambda t, c=c, folder=folder, comps=comps, scheme=scheme:
                _prec(_ov_ours(folder, c, t), "int8" if scheme in ("int8", "int8-hybrid") and c in comps else None))
            for c in COMPONENTS}
    if a.torch_bf16:
        rows["torch bf16 autocast"] = {c: (lambda t, c=c: (_torch_bf16(modules, c, t), "bf16")) for c in COMPONENTS}
    return rows


def _prec(pair, override: str | None = None):
    run, ran = pair
    return run, override or {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}.get(ran, ran)


# --- the reference and the measurement ----------------------------------------------------------

def reference(model: str):
    """PyTorch fp32: the modules, one input per component (the chain of one prompt and seed), outputs, FLOPs."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from instaflow_edge.components import COMPONENTS as SPECS
    from instaflow_edge.components import EXAMPLE_PROMPTS
    from instaflow_edge.generator import make_noise
    from instaflow_edge.pipeline import load_pipeline

    pipe = load_pipeline(model, "cpu", "float32", False, local_files_only=True)
    h, w = pipe.image_size(None, None)
    ids = pipe.tokenize(EXAMPLE_PROMPTS[:1])
    noise = make_noise([0], pipe.latent_shape(h, w))
    modules = {c: SPECS[c].module(pipe) for c in COMPONENTS}
    feeds, outs, flops = {}, {}, {}
    with torch.no_grad():
        feeds["text_encoder"] = {"input_ids": ids.numpy()}
        with FlopCounterMode(display=False) as fc:
            ehs = modules["text_encoder"](ids)
        flops["text_encoder"], outs["text_encoder"] = fc.get_total_flops(), ehs.numpy()
        feeds["unet"] = {"sample": noise.numpy(), "encoder_hidden_states": ehs.numpy(),
                         "timestep": __import__("numpy").full((1,), 1000.0, "float32")}
        with FlopCounterMode(display=False) as fc:
            lat = modules["unet"](noise, ehs)
        flops["unet"], outs["unet"] = fc.get_total_flops(), lat.numpy()
        feeds["vae_decoder"] = {"latent_sample": (lat / pipe.scaling_factor).numpy()}
        with FlopCounterMode(display=False) as fc:
            img = modules["vae_decoder"](lat / pipe.scaling_factor)
        flops["vae_decoder"], outs["vae_decoder"] = fc.get_total_flops(), img.numpy()
    info = {"height": h, "width": w, "scaling_factor": pipe.scaling_factor}
    return modules, feeds, outs, flops, info


def _next_feed(component: str, out, feed: dict, scaling: float) -> dict:
    """The next component's input made from this component's output (a row's own chain)."""
    import numpy as np

    if component == "text_encoder":
        return {"encoder_hidden_states": out}
    if component == "unet":
        return {"latent_sample": (out / scaling).astype(np.float32)}
    return {}


def measure(a, threads: int, rows: dict, feeds: dict, outs: dict, info: dict, note) -> dict:
    from instaflow_edge.parity import compare, psnr

    res: dict = {r: {} for r in rows}
    chain = {r: dict(feeds["unet"]) for r in rows}  # unet's noise/timestep; text/latent filled per row
    chain_img = {}
    for comp in COMPONENTS:
        runs, prec = {}, {}
        for r, makers in rows.items():
            t = time.perf_counter()
            runs[r], prec[r] = makers[comp](threads)
            res[r].setdefault("load_s", {})[comp] = round(time.perf_counter() - t, 2)
        note(f"{threads} thread(s), {comp}: {len(runs)} rows loaded (peak RSS {_rss_mib():.0f} MiB)")
        own = {}
        for r in runs:  # warm-up 1: the row's own chain (end-to-end PSNR), then more on the reference input
            feed = {**feeds[comp], **({k: v for k, v in chain[r].items() if k in _CHAIN_KEYS[comp]})}
            own[r] = runs[r](feed)
            chain[r].update(_next_feed(comp, own[r], feed, info["scaling_factor"]))
            if comp == "vae_decoder":
                chain_img[r] = own[r]
            for _ in range(a.warmup - 1):
                runs[r](feeds[comp])
        labels = list(runs)
        times: dict[str, list[float]] = {r: [] for r in labels}
        last = {}
        for k in range(a.rounds):
            for r in labels[k % len(labels):] + labels[:k % len(labels)]:
                t = time.perf_counter()
                last[r] = runs[r](feeds[comp])
                times[r].append(time.perf_counter() - t)
            note(f"{threads} thread(s), {comp}: round {k + 1}/{a.rounds}")
        for r in labels:
            row = compare(comp, outs[comp], last[r]).as_dict()
            res[r][comp] = {"median_s": round(statistics.median(times[r]), 4), "times_s": [round(x, 4) for x in times[r]],
                            "precision": prec[r], "psnr_db": row["psnr"]}
        del runs, last, own
        gc.collect()
    ref_img = outs["vae_decoder"]
    for r in rows:
        e2e = [sum(res[r][c]["times_s"][k] for c in COMPONENTS) for k in range(a.rounds)]
        p = psnr(ref_img, chain_img[r])
        res[r]["end_to_end"] = {"median_s": round(statistics.median(e2e), 4), "times_s": [round(x, 4) for x in e2e],
                                "psnr_db": None if p == float("inf") else round(p, 3)}
    return res


_CHAIN_KEYS = {"text_encoder": (), "unet": ("encoder_hidden_states",), "vae_decoder": ("latent_sample",)}


def ov_profile(path: Path, threads: int, precision: str | None, feed: dict, top: int = 8) -> dict:
    """OpenVINO's per-node counters for one call (after a warm-up): time by (op type, kernel), top ``top``."""
    import collections

    import openvino as ov

    cfg = {"INFERENCE_NUM_THREADS": threads, "PERF_COUNT": True}
    if precision:
        cfg["INFERENCE_PRECISION_HINT"] = precision
    compiled = ov.Core().compile_model(str(path), "CPU", cfg)
    sess = ovrt.Session(compiled, path)
    for _ in range(2):
        sess.run(None, _feed(sess.get_inputs(), feed))
    by = collections.Counter()
    for p in sess._request.get_profiling_info():
        by[f"{p.node_type} [{p.exec_type}]"] += p.real_time.total_seconds()
    total = sum(by.values())
    return {"total_s": round(total, 3), "ran_in": sess.precision,
            "top": [{"op": k, "s": round(v, 3), "share": round(v / total, 3)} for k, v in by.most_common(top)]}


def profiles(a, threads: int, feeds: dict, note) -> dict:
    """Per-op profiles of the peer and of our openvino rows for ``a.profile`` components."""
    out: dict = {}
    for comp in a.profile or []:
        out[comp] = {PEER: ov_profile(Path(a.plain) / comp / onnx_io.MODEL_FILE, threads, None, feeds[comp])}
        for item in a.openvino or []:
            name, _, folder = item.partition("=")
            prec = ovrt.export_facts(Path(folder))[1]["precision"]
            out[comp][f"openvino {name} (ours)"] = ov_profile(Path(folder) / comp / ovrt.IR_FILE, threads,
                                                               None if prec == "auto" else prec, feeds[comp])
        note(f"{threads} thread(s), {comp}: profiled")
    return out


def derive(res: dict, flops: dict, peaks: dict) -> None:
    """Ratios vs ORT fp32 and vs the peer, per round; % of the peak of each row's precision."""
    from instaflow_edge.bench.peaks import pct_of_peak

    for r, comps in res.items():
        for c in (*COMPONENTS, "end_to_end"):
            x = comps[c]
            x["vs_ort_fp32"] = _paired(res[BASE][c]["times_s"], x["times_s"])
            x["vs_peer"] = _paired(res[PEER][c]["times_s"], x["times_s"])
            if c != "end_to_end":
                pct = pct_of_peak(flops[c], x["median_s"], peaks, x["precision"])
                x["pct_of_peak"] = None if pct is None else round(pct, 1)


def run(a) -> dict:
    t0 = time.perf_counter()

    def note(msg):
        print(f"[cpu_paths {time.perf_counter() - t0:6.0f}s] {msg}", flush=True)

    modules, feeds, outs, flops, info = reference(a.model)
    if not a.torch_bf16:
        del modules
        modules = None
        gc.collect()
    note(f"reference done: {info['height']}x{info['width']}, GFLOPs " +
         ", ".join(f"{c} {flops[c] / 1e9:.1f}" for c in COMPONENTS))
    rows = build_rows(a, modules)
    report = {"model": a.model, "image": [info["height"], info["width"]], "rounds": a.rounds, "warmup": a.warmup,
              "machine": {**machine(), **({"note": a.note} if a.note else {})},
              "flops": flops, "rows": list(rows), "exports": {"ort_fp32": a.ort_fp32, "ort_int8": a.ort_int8, "plain": a.plain,
                                                              "openvino": a.openvino or []},
              "sizes_bytes": _sizes(a), "by_threads": {}}
    import openvino
    import onnxruntime
    import torch

    report["versions"] = {"openvino": openvino.get_version(), "onnxruntime": onnxruntime.__version__, "torch": torch.__version__}
    for threads in a.threads:
        peaks = measure_peaks(threads)
        note(f"{threads} thread(s): peaks " + ", ".join(f"{p} {v['gops']:.0f} GOP/s ({v['via']})" for p, v in peaks["peaks"].items()))
        res = measure(a, threads, rows, feeds, outs, info, note)
        derive(res, flops, peaks)
        report["by_threads"][str(threads)] = {"peaks": peaks, "results": res}
        if a.profile and threads == a.threads[0]:
            report["profiles"] = {"threads": threads, **profiles(a, threads, feeds, note)}
    report["peak_rss_mib"] = round(_rss_mib())
    report["seconds"] = round(time.perf_counter() - t0, 1)
    return report


def _sizes(a) -> dict:
    def size(folder):
        return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())

    out = {"ort_fp32": size(a.ort_fp32), "plain": size(a.plain)}
    if a.ort_int8:
        out["ort_int8"] = size(a.ort_int8)
    for item in a.openvino or []:
        name, _, folder = item.partition("=")
        out[f"openvino {name}"] = size(folder)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m studies.cpu_paths", description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?")
    ap.add_argument("--ort-fp32")
    ap.add_argument("--ort-int8")
    ap.add_argument("--plain")
    ap.add_argument("--openvino", action="append", metavar="NAME=DIR")
    ap.add_argument("--torch-bf16", action="store_true")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--profile", nargs="+", choices=COMPONENTS, help="also record OpenVINO's per-op profile of the peer "
                    "and of our openvino rows for these components (first thread count)")
    ap.add_argument("-o", "--output", help="save the report as JSON here")
    ap.add_argument("--note", help="free text stored with the machine (e.g. what else it was running)")
    ap.add_argument("--markdown", metavar="REPORT.json", help="print the table of a saved report and exit")
    a = ap.parse_args(argv)
    if a.markdown:
        print(markdown(json.loads(Path(a.markdown).read_text())))
        return 0
    if not (a.model and a.ort_fp32 and a.plain):
        ap.error("MODEL, --ort-fp32 and --plain are required")
    for folder in [a.model, a.ort_fp32, a.plain, a.ort_int8] + [x.partition("=")[2] for x in a.openvino or []]:
        if folder and not Path(folder).is_dir():
            ap.error(f"{folder} is not a folder")
    if any("=" not in x for x in a.openvino or []):
        ap.error("--openvino takes NAME=DIR")
    if a.rounds < 1 or a.warmup < 1 or any(t < 1 for t in a.threads):
        ap.error("--rounds, --warmup and --threads must be >= 1")
    report = run(a)
    if a.output:
        save_result(a.output, "cpu_paths", report)
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
