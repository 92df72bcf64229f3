"""The latency benchmark's old entry point, kept working: ``instaflow-edge bench`` is the command now.

    python -m instaflow_edge.bench.onnx_latency MODEL --export fp32=DIR --export int8-static=DIR \\
        [--threads 1] [--warmup 1] [--repeats 5] [--device cpu|cuda] [--sequential] [-o NAME.json]
    python -m instaflow_edge.bench.onnx_latency --markdown NAME.json     # the README table of a saved result

Everything lives in ``bench/latency.py`` (``BenchConfig``, ``bench``); this module maps the old options
onto it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .latency import BenchConfig, _paired, _stats, _time_interleaved, _time_runs, bench  # noqa: F401  (old names)
from .runners import STAGES, count_flops, matmul_peak  # noqa: F401
from .tables import markdown, table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="One-step latency: torch vs ONNX Runtime exports (see `instaflow-edge bench`).")
    ap.add_argument("model", nargs="?", help="the pipeline folder the exports came from (torch reference)")
    ap.add_argument("--export", action="append", default=[], metavar="LABEL=DIR", help="an export folder (repeatable)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--markdown", type=Path, default=None, metavar="JSON",
                    help="print the README table of a saved result and exit (no timing)")
    ap.add_argument("--sequential", action="store_true", help="load and time one runtime at a time")
    ap.add_argument("-o", "--output", type=Path, default=None, help="JSON path (default: <model>-<device>.json here)")
    a = ap.parse_args(argv)
    if a.markdown:
        print(markdown(json.loads(a.markdown.read_text())))
        return 0
    if not a.model:
        ap.error("MODEL is required (the pipeline folder the exports came from)")
    exports = list(a.export)
    out = a.output or Path(f"{Path(a.model).name}-{a.device}.json")
    report = bench(BenchConfig(model=a.model, exports=exports, output=str(out), threads=a.threads, device=a.device,
                               warmup=a.warmup, repeats=a.repeats, sequential=a.sequential, force=True))
    print(table(report))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
