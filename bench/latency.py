"""``instaflow-edge bench``: one-step latency of the PyTorch reference and every export given.

Each run is the whole one-step image (text encoder → one-step UNet → VAE decoder) with a clock between
the stages, so per-component and end-to-end figures come from the same runs; the fused generator
(``generator/model.onnx``, when exported with its precision) is timed as its own run. Warm-up runs are
discarded; median and p90 are reported; threads are pinned (torch and ORT intra-op) and stated.

Runtimes are interleaved: every round runs each once (order rotated), and a speed-up is the median of
the per-round ratios (with their min–max), so a slow phase of a shared machine hits both sides of a
ratio; ``sequential=True`` times one runtime after another instead (less memory: at SD1.5 the
interleaved run holds torch and every export at once). Ratios are vs the torch row and vs the first
ONNX export given.

Also recorded: the peak RSS of each runtime (the RSS its loading added, and the most one run added on
top: Linux's high-water mark, reset before every run through ``/proc/self/clear_refs``), the machine's
measured matmul peaks (``bench/peaks.py``: fp32, bf16, int8) and each stage's % of the peak of the
precision it ran in (FLOPs counted with torch's FlopCounterMode on the torch modules), the runtime
versions, and with ``device=cuda`` the GPU's name (torch fp16 eager, ``torch.compile``, ORT's CUDA
provider when installed). OpenVINO exports (``convert --target openvino``) are compiled for the CPU in
their own precision (``auto``: the CPU's default, bf16 where it has bf16 units) with ``threads``, as
``generate --backend openvino`` runs them. Core ML packages are timed through ``predict`` on macOS;
elsewhere their row says why it is absent.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import os
import statistics
import sys
from pathlib import Path

from .. import runtime
from ..artifacts import (
    atomic_write_text,
    claim_output,
    make_manifest,
    read_manifest,
    to_jsonable,
)
from ..errors import DeviceError, InputError
from ..runtime import parse_exports, source_pipeline
from ..validators import boolean, choice, integer
from .runners import (
    STAGES,
    count_flops,
    export_runner,
    matmul_peak,
    torch_runner,
    whole_runner,
)

log = logging.getLogger(__name__)


class BenchDevice(str, enum.Enum):
    cpu = "cpu"
    cuda = "cuda"


@dataclasses.dataclass
class BenchConfig:
    """Options of ``instaflow-edge bench``. ``exports``: export folders (ONNX or Core ML), each optionally
    ``LABEL=DIR``; without a label the row is named from the export's manifest (``ort int8-static``)."""

    model: str
    exports: list[str] = dataclasses.field(default_factory=list)
    output: str = "bench.json"
    threads: int = 1
    device: BenchDevice = BenchDevice.cpu
    warmup: int = 1
    repeats: int = 5
    sequential: bool = False
    note: str | None = None
    force: bool = False

    def __post_init__(self) -> None:
        self.device = choice("device", self.device, BenchDevice)
        integer("threads", self.threads, 1)
        integer("warmup", self.warmup, 0)
        integer("repeats", self.repeats, 1)
        boolean("sequential", self.sequential)
        boolean("force", self.force)
        if isinstance(self.exports, str):
            self.exports = [self.exports]
        self.exports = list(self.exports)
        if not str(self.output).endswith(".json"):
            raise InputError(f"-o {self.output}: the bench result is a JSON file", "pass -o NAME.json")
        model = Path(self.model)
        if not (model / "model_index.json").is_file():
            raise InputError(f"{self.model} is not a pipeline folder (no model_index.json)",
                             "pass the pipeline folder the exports were made from (the torch reference)")



def _trim_heap() -> None:
    """Return glibc's free heap pages to the OS (Linux; elsewhere nothing), so RSS differences measure loads."""
    import ctypes
    import ctypes.util

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass

# ---------------------------------------------------------------------------------------------------
# statistics and interleaving


def _stats(xs: list[float]) -> dict:
    xs = sorted(xs)
    p90 = xs[min(len(xs) - 1, int(round(0.9 * (len(xs) - 1))))]
    return {"median_s": statistics.median(xs), "p90_s": p90, "n": len(xs)}


class Rss:
    """The process's resident memory (Linux ``/proc/self/status``): now, and the high-water mark since
    the last :meth:`reset` (``/proc/self/clear_refs`` ← 5). Elsewhere every figure is None."""

    def __init__(self) -> None:
        self.ok = sys.platform.startswith("linux") and self.now_mib() is not None and self.reset()

    @staticmethod
    def _field(name: str) -> float | None:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(name + ":"):
                        return int(line.split()[1]) / 1024
        except OSError:
            return None
        return None

    def now_mib(self) -> float | None:
        return self._field("VmRSS")

    def peak_mib(self) -> float | None:
        return self._field("VmHWM")

    @staticmethod
    def reset() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False


def _time_runs(run_once, warmup: int, repeats: int, rss: Rss | None = None, memory: dict | None = None) -> dict:
    """``run_once()`` returns {stage: seconds}; returns {stage: stats} plus end_to_end."""
    mem: dict = {}
    out = _time_interleaved({"x": run_once}, warmup, repeats, rss, mem)["x"]
    if memory is not None and "x" in mem:
        memory.update(mem["x"])
    return out


def _time_interleaved(runners: dict, warmup: int, repeats: int, rss: Rss | None = None,
                      memory: dict | None = None) -> dict:
    """Rounds of one run of every runner, the order rotated each round, so slow phases of a noisy
    machine hit every runner alike. Returns {label: {stage: stats}}; each stage's raw times are kept
    in ``times_s`` so ratios can be paired by round (``_paired``). With ``rss`` (and a ``memory`` dict),
    ``memory[label]["run_peak_mib"]`` is the most RSS one run of that runner added."""
    labels = list(runners)

    def call(k):
        if rss is None or not rss.ok:
            return runners[k]()
        before = rss.now_mib()
        rss.reset()
        t = runners[k]()
        extra = max(0.0, rss.peak_mib() - before)
        m = memory.setdefault(k, {}) if memory is not None else {}
        m["run_peak_mib"] = round(max(m.get("run_peak_mib", 0.0), extra), 1)
        return t

    for _ in range(warmup):
        for k in labels:
            call(k)
    per: dict[str, dict[str, list[float]]] = {k: {} for k in labels}
    for r in range(repeats):
        for k in labels[r % len(labels):] + labels[:r % len(labels)]:
            t = call(k)
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


def stage_precisions(export, device: str) -> dict[str, str]:
    """The precision each stage of a runtime computes in, for its % of peak: what the export's own runtime
    says it runs (``Export.stage_precisions``); torch: fp32 on the CPU, fp16 on CUDA."""
    if export is None:
        p = "fp16" if device == "cuda" else "fp32"
        return {s: p for s in (*STAGES, "end_to_end", "generator")}
    return export.stage_precisions


def runtime_versions() -> dict:
    from ..artifacts import package_versions

    v = dict(package_versions(("torch", "onnxruntime", "openvino", "coremltools", "numpy")))
    try:
        import onnxruntime as ort

        v["onnxruntime_providers"] = ort.get_available_providers()
    except ImportError:
        pass
    return v


def _gpu() -> dict:
    import torch

    return {"name": torch.cuda.get_device_name(0), "cuda": torch.version.cuda,
            "memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)}


def check_device(device: BenchDevice) -> None:
    """``--device cuda`` without a CUDA GPU visible to torch is a one-line error, before any model loads."""
    if device is BenchDevice.cuda:
        import torch

        if not torch.cuda.is_available():
            raise DeviceError("--device cuda: torch sees no CUDA GPU here (torch "
                              f"{torch.__version__}{'' if torch.version.cuda else ', a CPU-only build'})",
                              "run the GPU reference on a machine with a CUDA GPU and a CUDA build of torch, or use --device cpu")


def bench(config: BenchConfig, progress: bool = True) -> dict:
    """Time the torch reference and every export of ``config``; write the JSON to ``config.output``
    (atomically) and return it."""
    exports = parse_exports(config.exports)
    check_device(config.device)
    inputs_ = (config.model, *exports.values())
    with claim_output(config.output, config.force, inputs_, what="bench result") as out:
        result = measure(config.model, exports, config.threads, config.warmup, config.repeats, config.device.value,
                         interleave=not config.sequential, progress=progress)
        result["note"] = config.note
        manifest = make_manifest("bench", config, **result)
        atomic_write_text(out, json.dumps(manifest, indent=2, default=str) + "\n")
    return manifest


def measure(model: str, exports: dict[str, Path], threads: int, warmup: int, repeats: int, device: str,
            interleave: bool = True, progress: bool = True) -> dict:
    """The timing itself (no output written): see the module docstring."""
    import gc

    import torch

    from ..components import EXAMPLE_PROMPTS, Sizes
    from ..envinfo import collect
    from ..generator import make_noise
    from ..pipeline import load_pipeline
    from .peaks import measure_peaks

    def note(msg):
        if progress:
            log.info(msg)

    rss = Rss()
    torch.set_num_threads(threads)
    import diffusers  # noqa: F401  (imported before the clock of the pipeline's memory: libraries are not weights)
    import transformers  # noqa: F401

    rss0 = rss.now_mib()
    pipe = load_pipeline(model, "cpu", "float32", local_files_only=True)
    pipe_mib = (rss.now_mib() - rss0) if rss.ok else None
    sizes = Sizes.of(pipe)
    inputs = {"input_ids": pipe.tokenize(EXAMPLE_PROMPTS[:1]).numpy(),
              "noise": make_noise([0], (sizes.latent_channels, sizes.latent_height, sizes.latent_width)).numpy()}
    note(f"measuring the matmul peaks ({threads} thread{'s' * (threads != 1)})")
    peaks = measure_peaks(threads)
    if device == "cuda":
        peaks["peaks"]["fp16"] = {"gops": round(matmul_peak(threads, "cuda"), 1), "via": "torch cuda"}
    flops = count_flops(pipe, inputs)
    makers: dict[str, object] = {}  # label -> () -> runner, built lazily so the sequential mode holds one
    folders: dict[str, Path | None] = {}
    skipped: dict[str, str] = {}
    if device == "cuda":
        makers["torch fp16 eager"] = lambda: torch_runner(pipe, inputs, "cuda", torch.float16)
        makers["torch fp16 compile"] = lambda: torch_runner(pipe, inputs, "cuda", torch.float16, True)
    else:
        makers["torch eager fp32"] = lambda: torch_runner(pipe, inputs, "cpu", torch.float32)
    for k in makers:
        folders[k] = None
    # an export made from another pipeline (a pruned model beside its original) is timed on the same
    # inputs; its % of peak counts the FLOPs of its own pipeline
    own_flops: dict[str, dict] = {}  # export label -> the FLOPs of its own pipeline
    by_source: dict[Path, dict] = {}  # each other pipeline counted once
    model_dir = Path(model).resolve() if Path(model).is_dir() else None
    for label, folder in exports.items():
        src = source_pipeline(folder)
        if src is not None and model_dir is not None and src.resolve() != model_dir:
            if src.resolve() not in by_source:
                note(f"counting the FLOPs of {src} (the pipeline {label} was made from)")
                other = load_pipeline(src, "cpu", "float32", local_files_only=True)
                by_source[src.resolve()] = count_flops(other, inputs)
                del other
                gc.collect()
            own_flops[label] = by_source[src.resolve()]
    formats: dict[str, str] = {}  # label -> format name
    base_of: dict[str, str] = {}  # a whole-image run's label -> its export's label
    precisions: dict[str, dict] = {}  # export label -> what each stage computed in, as its runtime says
    for label, folder in exports.items():
        m = read_manifest(folder) or {}
        fmt = runtime.get(runtime.format_of(folder, m))
        why = fmt.unavailable(device) if fmt.open is not None else f"{fmt.name} exports have no runtime here ({fmt.description})"
        if why:
            skipped[label] = why
            continue
        # opened when its runner is built (the sequential mode holds one runtime at a time)
        makers[label] = lambda folder=folder, label=label, m=m: export_runner(_open(label, folder, m), inputs)
        formats[label] = fmt.name
        for run_name, make_run in fmt.extras(folder, m, threads=threads, device=device).items():
            makers[f"{label} {run_name}"] = lambda make_run=make_run: whole_runner(make_run(), inputs)
            formats[f"{label} {run_name}"] = fmt.name
            base_of[f"{label} {run_name}"] = label
        folders[label] = folder

    def _open(label, folder, manifest):
        export = runtime.open_export(folder, threads=threads, device=device, manifest=manifest)
        precisions[label] = export.stage_precisions
        return export

    # torch.compile needs its own warm-up (compilation) beyond the others'
    extra = {k: 2 for k in makers if "compile" in k}
    memory: dict[str, dict] = {}

    def build(k, make):
        gc.collect()
        _trim_heap()  # memory freed by earlier runtimes goes back to the OS first, so it cannot offset this load
        before = rss.now_mib()
        r = make()
        if rss.ok:
            load = rss.now_mib() - before + (pipe_mib if k.startswith("torch") else 0.0)
            # what is left of freeing noise (a few MiB the allocator returns meanwhile) is not a negative load
            memory.setdefault(k, {})["load_mib"] = round(max(0.0, load), 1)
        return r

    note(f"timing {len(makers)} runtime{'s' * (len(makers) != 1)}: {', '.join(makers)} "
         f"({warmup} warm-up, {repeats} rounds, {'interleaved' if interleave else 'one after another'})")
    if interleave:
        runners = {k: build(k, make) for k, make in makers.items()}
        for k, n in extra.items():
            for _ in range(n):
                runners[k]()
        results = _time_interleaved(runners, warmup, repeats, rss, memory)
        del runners
    else:
        results = {}
        torch_labels = [k for k in makers if k.startswith("torch")]
        for k, make in makers.items():
            mem: dict = {}
            results[k] = _time_runs(build(k, make), warmup + extra.get(k, 0), repeats, rss, mem)
            memory.setdefault(k, {}).update(mem)
            if k == torch_labels[-1]:
                pipe = None  # every torch runtime timed: free the pipeline before ORT loads
            gc.collect()
    process_peak = rss.peak_mib()
    pipe = None  # noqa: F841  (the pipeline freed before the export rows)
    gc.collect()
    for k, m in memory.items():
        if "load_mib" in m and "run_peak_mib" in m:
            m["peak_rss_mib"] = round(m["load_mib"] + m["run_peak_mib"], 1)
    base = next(iter(results))
    first_ort = next((k for k in results if formats.get(k) == "onnx" and k in exports), None)
    refs = [base] + ([first_ort] if first_ort else [])
    for k, r in results.items():
        prec = precisions.get(base_of.get(k, k)) or stage_precisions(None, device)
        fl = own_flops.get(k.removesuffix(" fused"), flops)
        for stage, st in r.items():
            p = peaks["peaks"].get(prec[stage]) or peaks["peaks"].get("fp32")
            st["peak_precision"] = prec[stage] if prec[stage] in peaks["peaks"] else "fp32"
            st["pct_of_peak"] = round(100 * fl[stage] / st["median_s"] / 1e9 / p["gops"], 2) if st["median_s"] and p else None
            ref_stage = "end_to_end" if stage == "generator" else stage
            for ref in refs:
                key = "speedup_vs_" + ref.replace(" ", "_")
                ref_st = results[ref][ref_stage]
                if interleave:
                    paired = _paired(ref_st["times_s"], st["times_s"])
                    st[key], st[key + "_range"] = paired["median"], [paired["min"], paired["max"]]
                else:
                    st[key] = round(ref_st["median_s"] / st["median_s"], 3)
    machine = collect()
    return {"model": model, "device": device, "threads": threads, "warmup": warmup, "repeats": repeats,
            "interleaved": interleave, "image": [sizes.height, sizes.width], "batch": 1,
            "cpu_cores": os.cpu_count(),
            "gpu": _gpu() if device == "cuda" else None,
            "matmul_peak_gflops": peaks["peaks"]["fp32"]["gops"] if "fp32" in peaks["peaks"] else None,
            "peaks": peaks, "gflop": {k: round(v / 1e9, 4) for k, v in flops.items()},
            "gflop_by_export": {k: {s: round(v / 1e9, 4) for s, v in f.items()} for k, f in own_flops.items()},
            "exports": {k: str(v) for k, v in exports.items()}, "skipped": skipped,
            "results": results, "memory": memory,
            "process_peak_rss_mib": round(process_peak, 1) if process_peak else None,
            "runtime_versions": runtime_versions(), "machine": to_jsonable(machine)}
