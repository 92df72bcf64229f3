"""Where an exported model spends its time: onnxruntime's profiler, summed per op type.

    python -m studies.ort_profile EXPORT_DIR [--component unet] [--threads 1] [-o JSON]

One warm-up run, one profiled run on N(0, 1) inputs of the export's shapes (batch 1); prints the op
types by total kernel time and writes them as JSON (default ``studies/results/<export>-<component>-profile.json``).
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

from instaflow_edge.bench.common import save_json


def profile(folder: Path, component: str, threads: int) -> dict:
    import tempfile

    import numpy as np
    import onnxruntime as ort

    from instaflow_edge.runtime import onnx_io

    path = folder / component / onnx_io.MODEL_FILE
    onnx_io.check_model_file(path)
    meta = json.loads((folder / "manifest.json").read_text())["onnx"]
    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        so.enable_profiling, so.profile_file_prefix = True, str(Path(tmp) / "prof")
        s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(0)
        dims = {"batch": 1, "latent_height": meta["latent_shape"][1], "latent_width": meta["latent_shape"][2],
                "sequence": 77}
        feed = {}
        for i in s.get_inputs():
            shape = [d if isinstance(d, int) else dims[d] for d in i.shape]
            if i.name == "timestep":
                feed[i.name] = np.full(shape, 1000.0, np.float32)
            elif "int64" in i.type:
                feed[i.name] = rng.integers(0, 100, shape).astype(np.int64)
            else:
                feed[i.name] = rng.standard_normal(shape).astype(np.float32)
        s.run(None, feed)  # warm-up (not profiled separately: the profile covers both runs' kernels)
        s.run(None, feed)
        events = json.loads(Path(s.end_profiling()).read_text())
    per = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per[e["args"]["op_name"]] += e["dur"]
    total = sum(per.values())
    return {"export": str(folder), "component": component, "threads": threads, "runs": 2,
            "total_ms_per_run": round(total / 2000, 1),
            "ops": [{"op": k, "ms_per_run": round(v / 2000, 1), "share": round(v / total, 4)} for k, v in per.most_common()]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("export", type=Path)
    ap.add_argument("--component", default="unet")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("-o", "--output", type=Path, default=None)
    a = ap.parse_args(argv)
    r = profile(a.export, a.component, a.threads)
    for o in r["ops"][:12]:
        print(f"{o['op']:<28} {o['ms_per_run']:>10.1f} ms {100 * o['share']:>6.1f}%")
    print(f"{'total':<28} {r['total_ms_per_run']:>10.1f} ms")
    out = save_json(a.output or Path(__file__).parent / "results" / f"{a.export.name}-{a.component}-profile.json", r)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
