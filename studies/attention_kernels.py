"""Self-attention kernels on the CPU at SD1.5's shapes: which one should the ONNX export fuse into?

The sd15 int8 profile puts 54% of the UNet's time in ONNX Runtime's fused ``Attention`` op (the
transformer optimizer's default fusion for the UNet's self-attention). This script times one
self-attention block — Q/K/V projections of ``x`` (B, S, C), softmax attention with C/40 heads of 40
channels (SD1.5: 8 heads at C = 320), no output projection — as:

* ``ort Attention``: ``com.microsoft.Attention`` (packed QKV weights, what our export fuses to);
* ``ort MultiHeadAttention``: three MatMuls + ``com.microsoft.MultiHeadAttention``;
* ``ort unfused``: MatMuls, Reshape/Transpose, MatMul, Softmax, MatMul (plain ONNX);
* ``torch sdpa``: three Linear + ``scaled_dot_product_attention`` (what torch eager runs);

all fp32, same inputs, outputs checked against each other, threads pinned; median of ``--repeats``.

    python -m studies.attention_kernels --tokens 4096,1024 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

HEAD_DIM = 40


def _graphs(c: int, heads: int, wq, wk, wv):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", c])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", c])
    inits = [numpy_helper.from_array(w, n) for w, n in ((wq, "wq"), (wk, "wk"), (wv, "wv"))]
    ms = helper.make_opsetid("com.microsoft", 1)
    out = {}
    qkv = np.concatenate([wq, wk, wv], axis=1)
    out["ort Attention"] = helper.make_model(helper.make_graph(
        [helper.make_node("Attention", ["x", "wqkv", "bqkv"], ["y"], domain="com.microsoft", num_heads=heads)],
        "attn", [x], [y], [numpy_helper.from_array(qkv, "wqkv"), numpy_helper.from_array(np.zeros(3 * c, np.float32), "bqkv")]),
        opset_imports=[helper.make_opsetid("", 18), ms])
    proj = [helper.make_node("MatMul", ["x", w], [w[1]]) for w in ("wq", "wk", "wv")]
    out["ort MultiHeadAttention"] = helper.make_model(helper.make_graph(
        proj + [helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["y"], domain="com.microsoft", num_heads=heads)],
        "mha", [x], [y], inits), opset_imports=[helper.make_opsetid("", 18), ms])
    shape = numpy_helper.from_array(np.array([0, -1, heads, HEAD_DIM], np.int64), "split_heads")
    back = numpy_helper.from_array(np.array([0, -1, c], np.int64), "merge_heads")
    scale = numpy_helper.from_array(np.array(HEAD_DIM ** -0.5, np.float32), "scale")
    nodes = list(proj)
    for n in "qkv":
        nodes.append(helper.make_node("Reshape", [n, "split_heads"], [n + "4"]))
        perm = [0, 2, 3, 1] if n == "k" else [0, 2, 1, 3]
        nodes.append(helper.make_node("Transpose", [n + "4"], [n + "h"], perm=perm))
    nodes += [helper.make_node("MatMul", ["qh", "kh"], ["s"]), helper.make_node("Mul", ["s", "scale"], ["s2"]),
              helper.make_node("Softmax", ["s2"], ["p"], axis=-1), helper.make_node("MatMul", ["p", "vh"], ["o"]),
              helper.make_node("Transpose", ["o"], ["o2"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["o2", "merge_heads"], ["y"])]
    out["ort unfused"] = helper.make_model(helper.make_graph(nodes, "plain", [x], [y], inits + [shape, back, scale]),
                                           opset_imports=[helper.make_opsetid("", 18)])
    for m in out.values():
        m.ir_version = 9
        onnx.checker.check_model(m)
    return out


def _time(fn, warmup: int, repeats: int) -> tuple[float, object]:
    for _ in range(warmup):
        y = fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        y = fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), y


def run(tokens: int, c: int, threads: int, warmup: int, repeats: int) -> dict:
    import onnxruntime as ort
    import torch

    heads = c // HEAD_DIM
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, tokens, c)).astype(np.float32)
    ws = [(rng.standard_normal((c, c)) / np.sqrt(c)).astype(np.float32) for _ in range(3)]
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    rows, ref = {}, None
    torch.set_num_threads(threads)
    xt, (wq, wk, wv) = torch.from_numpy(x), [torch.from_numpy(w) for w in ws]

    def sdpa():
        with torch.no_grad():
            q, k, v = ((xt @ w).view(1, tokens, heads, HEAD_DIM).transpose(1, 2) for w in (wq, wk, wv))
            return torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(1, tokens, c).numpy()

    t, ref = _time(sdpa, warmup, repeats)
    rows["torch sdpa"] = {"median_s": t}
    for name, model in _graphs(c, heads, *ws).items():
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        t, y = _time(lambda: sess.run(None, {"x": x})[0], warmup, repeats)
        rows[name] = {"median_s": t, "max_abs_vs_torch": float(np.abs(y - ref).max())}
    base = rows["ort Attention"]["median_s"]
    for r in rows.values():
        r["speedup_vs_ort_attention"] = round(base / r["median_s"], 3)
    # FLOPs: 3 projections + QK^T + PV
    gflop = (3 * 2 * tokens * c * c + 2 * 2 * tokens * tokens * c) / 1e9
    return {"tokens": tokens, "channels": c, "heads": heads, "gflop": round(gflop, 2), "runtimes": rows}


def main(argv: list[str] | None = None) -> dict:
    from instaflow_edge.bench.common import machine, save_result

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="4096,1024", help="sequence lengths (SD1.5 at 512²: 4096, 1024, 256, 64)")
    ap.add_argument("--channels", type=int, default=320)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("-o", "--output", type=Path, default=Path("studies/results/attention_kernels_cpu.json"))
    args = ap.parse_args(argv)
    results = [run(int(s), args.channels, args.threads, args.warmup, args.repeats) for s in args.tokens.split(",")]
    print(f"{'tokens':>6} {'runtime':24s} {'median ms':>10} {'GFLOP/s':>8} {'× ort Attention':>16} {'max |Δ| vs torch':>17}")
    for r in results:
        for name, row in r["runtimes"].items():
            print(f"{r['tokens']:6d} {name:24s} {1000 * row['median_s']:10.1f} {r['gflop'] / row['median_s']:8.1f} "
                  f"{row['speedup_vs_ort_attention']:15.2f}× {row.get('max_abs_vs_torch', 0.0):17.2e}")
    out = {"machine": machine(), "threads": args.threads,
           "repeats": args.repeats, "results": results}
    save_result(args.output, "attention_kernels", out)
    print(f"wrote {args.output}")
    return out


if __name__ == "__main__":
    main()
