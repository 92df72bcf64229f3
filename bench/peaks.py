"""The machine's measured matmul peaks: fp32, bf16 and int8, each through the runtimes that reach it.

    python -m instaflow_edge.bench.peaks [--threads 1] [--n 1536] [--seconds 0.5] [-o peaks.json]

A CPU's real limit depends on the precision: avx512_bf16 / AMX run bf16 faster than fp32, VNNI / AMX
run int8 faster still, and each library reaches those units or not. So each precision is measured
through several runtimes (torch, ONNX Runtime, OpenVINO; whichever are installed) on one n×n×n
GEMM, and the precision's peak is the best of them: a benchmark reports its figures as "% of the
peak of the precision it ran in". An int8 op counts as 2 ops per multiply-add, like a float one.

``measure_peaks(threads)`` returns ``{"threads", "n", "peaks": {precision: {"gops", "via"}},
"candidates": {precision: {runtime: gops | "error: ..."}}}``; the CLI prints it as JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Callable

PRECISIONS = ("fp32", "bf16", "int8")


def _best_seconds(fn: Callable[[], object], seconds: float, min_reps: int = 3) -> float:
    """Best wall time of one call of ``fn`` over at least ``min_reps`` calls or ``seconds`` of calls."""
    fn()  # warm-up (first-call allocation, kernel selection)
    best, t0, reps = float("inf"), time.perf_counter(), 0
    while reps < min_reps or time.perf_counter() - t0 < seconds:
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
        reps += 1
    return best


def _torch(precision: str, threads: int, n: int, seconds: float) -> float:
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)
        if precision == "int8":
            a = torch.randint(-128, 127, (n, n), dtype=torch.int8, generator=g)
            b = torch.randint(-128, 127, (n, n), dtype=torch.int8, generator=g)
            fn = lambda: torch._int_mm(a, b)  # noqa: E731  int8 x int8 -> int32
        else:
            dt = torch.float32 if precision == "fp32" else torch.bfloat16
            a = torch.randn(n, n, generator=g).to(dt)
            b = torch.randn(n, n, generator=g).to(dt)
            fn = lambda: a @ b  # noqa: E731
        with torch.inference_mode():
            return _best_seconds(fn, seconds)
    finally:
        torch.set_num_threads(old)


def _ort(precision: str, threads: int, n: int, seconds: float) -> float:
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    if precision == "fp32":
        w = numpy_helper.from_array(rng.standard_normal((n, n), dtype=np.float32), "w")
        node = helper.make_node("MatMul", ["x", "w"], ["y"])
        x_type, y_type, inits = TensorProto.FLOAT, TensorProto.FLOAT, [w]
        x = rng.standard_normal((n, n), dtype=np.float32)
        nodes = [node]
    elif precision == "int8":
        # MatMulInteger: uint8 activations x int8 weights -> int32 (MLAS's VNNI kernels)
        w = numpy_helper.from_array(rng.integers(-128, 127, (n, n), dtype=np.int8), "w")
        nodes = [helper.make_node("MatMulInteger", ["x", "w"], ["y"])]
        x_type, y_type, inits = TensorProto.UINT8, TensorProto.INT32, [w]
        x = rng.integers(0, 255, (n, n), dtype=np.uint8)
    else:  # bf16: tried, so the report says what onnxruntime's CPU provider does with it (no kernel, in 1.32)
        w = numpy_helper.from_array(rng.standard_normal((n, n), dtype=np.float32), "w")
        nodes = [helper.make_node("Cast", ["x"], ["xb"], to=TensorProto.BFLOAT16),
                 helper.make_node("Cast", ["w"], ["wb"], to=TensorProto.BFLOAT16),
                 helper.make_node("MatMul", ["xb", "wb"], ["yb"]),
                 helper.make_node("Cast", ["yb"], ["y"], to=TensorProto.FLOAT)]
        x_type, y_type, inits = TensorProto.FLOAT, TensorProto.FLOAT, [w]
        x = rng.standard_normal((n, n), dtype=np.float32)
    graph = helper.make_graph(nodes, "peak", [helper.make_tensor_value_info("x", x_type, [n, n])],
                              [helper.make_tensor_value_info("y", y_type, [n, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return _best_seconds(lambda: sess.run(None, {"x": x}), seconds)


def _openvino(precision: str, threads: int, n: int, seconds: float) -> float:
    import numpy as np
    import openvino as ov
    import openvino.opset13 as ops

    rng = np.random.default_rng(0)
    x = ops.parameter([n, n], np.float32, name="x")
    w = ops.constant(rng.standard_normal((n, n), dtype=np.float32))
    if precision == "int8":
        # the pattern NNCF writes: FakeQuantize (256 levels) on activations and weights -> an int8 GEMM
        lo, hi = ops.constant(np.float32(-4.0)), ops.constant(np.float32(4.0))
        x_in = ops.fake_quantize(x, lo, hi, lo, hi, 256)
        w_in = ops.fake_quantize(w, lo, hi, lo, hi, 255)
    else:
        x_in, w_in = x, w
    model = ov.Model([ops.matmul(x_in, w_in, False, False)], [x], "peak")
    config = {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
              "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32"}
    compiled = ov.Core().compile_model(model, "CPU", config)
    if precision == "bf16" and compiled.get_property("INFERENCE_PRECISION_HINT") != ov.Type.bf16:
        raise RuntimeError("OpenVINO's CPU plugin does not run bf16 on this CPU")
    req = compiled.create_infer_request()
    data = rng.standard_normal((n, n), dtype=np.float32)
    return _best_seconds(lambda: req.infer({0: data}), seconds)


RUNTIMES: dict[str, Callable[[str, int, int, float], float]] = {
    "torch": _torch, "onnxruntime": _ort, "openvino": _openvino,
}
# every runtime is tried in every precision; one that cannot run it is recorded with its error
SUPPORTS = {"torch": PRECISIONS, "onnxruntime": PRECISIONS, "openvino": PRECISIONS}


def measure_peaks(threads: int, n: int = 1536, seconds: float = 0.5) -> dict:
    """Measured GEMM throughput (GOP/s) per precision and runtime, and each precision's best."""
    if not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    ops = 2 * n**3
    candidates: dict[str, dict[str, float | str]] = {p: {} for p in PRECISIONS}
    for rt, fn in RUNTIMES.items():
        for p in SUPPORTS[rt]:
            try:
                candidates[p][rt] = round(ops / fn(p, threads, n, seconds) / 1e9, 2)
            except ImportError as e:
                candidates[p][rt] = f"error: not installed ({e.name})"
            except Exception as e:  # a runtime that cannot run this precision here is a fact, not a failure
                candidates[p][rt] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    peaks = {}
    for p, by_rt in candidates.items():
        ok = {rt: v for rt, v in by_rt.items() if isinstance(v, float)}
        if ok:
            rt = max(ok, key=ok.get)
            peaks[p] = {"gops": ok[rt], "via": rt}
    return {"threads": threads, "n": n, "peaks": peaks, "candidates": candidates}


def pct_of_peak(flops: float, seconds: float, peaks: dict, precision: str) -> float | None:
    """``flops`` done in ``seconds`` as a % of the measured peak of ``precision`` (None if unmeasured)."""
    peak = peaks.get("peaks", peaks).get(precision)
    if not peak or seconds <= 0:
        return None
    return 100.0 * flops / seconds / 1e9 / peak["gops"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m instaflow_edge.bench.peaks", description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n", type=int, default=1536, help="GEMM side (n×n×n)")
    ap.add_argument("--seconds", type=float, default=0.5, help="timing budget per runtime and precision")
    ap.add_argument("-o", "--output", help="also save the result (with the machine) as JSON here")
    a = ap.parse_args(argv)
    if a.threads < 1 or a.n < 16 or a.seconds <= 0:
        ap.error("--threads must be >= 1, --n >= 16 and --seconds > 0")
    res = measure_peaks(a.threads, a.n, a.seconds)
    if a.output:
        from .common import machine, save_result

        save_result(a.output, "peaks", {"machine": machine(), **res})
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
