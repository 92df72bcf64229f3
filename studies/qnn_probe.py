"""What ONNX Runtime's QNN provider (the ``onnxruntime-qnn`` wheel) does on an x86-64 Linux host.

    python studies/qnn_probe.py [-o studies/results/qnn_probe.json]

Run it with the Python of a venv that has ``onnxruntime-qnn`` (it installs its own ``onnxruntime``, so it
cannot share the package's venv)::

    python3 -m venv .venv-qnn && .venv-qnn/bin/pip install onnxruntime-qnn==2.7.0 "numpy<2.4" onnx
    .venv-qnn/bin/python studies/qnn_probe.py

A small Conv → Relu graph (3→8 channels, 16×16) is QDQ-quantized with ONNX Runtime's QNN config
(``get_qnn_qdq_config``: uint8 weights, uint16 activations, W8A16), calibrated on four random inputs,
then for each Hexagon architecture compiled by the QNN provider's HTP backend into an EP-context model
(``ep.context_enable``: an ``EPContext`` node and a ``*_qnn.bin``), loaded back and run. The JSON says
which devices the provider lists, the compile seconds and binary per architecture, and how far the
compiled graph's output is from the same QDQ model on ONNX Runtime's CPU provider and from fp32. It uses
only numpy, onnx and onnxruntime, not this package (which is not installed in that venv).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ARCHS = ("68", "69", "73", "75", "79")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _conv_model(path: Path, rng) -> None:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(rng.normal(size=(8, 3, 3, 3)).astype(np.float32), "W")
    g = helper.make_graph([helper.make_node("Conv", ["x", "W"], ["y"], pads=[1, 1, 1, 1]),
                           helper.make_node("Relu", ["y"], ["z"])], "conv",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                          [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 8, 16, 16])], [w])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]), str(path))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", "--output", default="studies/results/qnn_probe.json")
    args = ap.parse_args()
    try:
        import numpy as np
        import onnx
        import onnxruntime as ort
        import onnxruntime_qnn as oq
        from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize
        from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config
    except ImportError as e:
        sys.exit(f"error: {e} — run this with the Python of a venv that has onnxruntime-qnn (see the docstring)")

    rng = np.random.default_rng(0)
    work = Path(tempfile.mkdtemp(prefix="qnn-probe-"))
    fp32, qdq = work / "conv.onnx", work / "conv.qdq.onnx"
    _conv_model(fp32, rng)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"x": rng.normal(size=(1, 3, 16, 16)).astype(np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self.it, None)

    quantize(str(fp32), str(qdq), get_qnn_qdq_config(str(fp32), Reader(), activation_type=QuantType.QUInt16,
                                                      weight_type=QuantType.QUInt8))
    ort.register_execution_provider_library(oq.get_ep_name(), oq.get_library_path())
    devices = ort.get_ep_devices()
    qnn = [d for d in devices if d.ep_name == oq.get_ep_name()]
    x = np.random.default_rng(1).normal(size=(1, 3, 16, 16)).astype(np.float32)
    ref = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    cpu = ort.InferenceSession(str(qdq), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    archs = {}
    for arch in ARCHS:
        row: dict = {}
        opts = {"backend_path": oq.get_qnn_htp_path(), "htp_arch": arch}
        so = ort.SessionOptions()
        so.add_session_config_entry("ep.context_enable", "1")
        so.add_session_config_entry("ep.context_file_path", str(work / f"ctx_{arch}.onnx"))
        so.add_session_config_entry("ep.context_embed_mode", "0")
        so.add_provider_for_devices(qnn[:1], opts)
        t = time.perf_counter()
        try:
            ort.InferenceSession(str(qdq), so)
        except Exception as e:  # an architecture this SDK cannot compile for: recorded, not fatal
            archs[arch] = {"compiled": False, "error": str(e)[:300]}
            continue
        row["compiled"] = True
        row["compile_s"] = round(time.perf_counter() - t, 3)
        ctx = onnx.load(str(work / f"ctx_{arch}.onnx"))
        row["ctx_ops"] = [n.op_type for n in ctx.graph.node]
        bins = sorted(work.glob(f"ctx_{arch}*.bin"))
        row["binary_bytes"] = sum(b.stat().st_size for b in bins)
        row["binary_sha256"] = hashlib.sha256(b"".join(b.read_bytes() for b in bins)).hexdigest()[:16]
        so = ort.SessionOptions()
        so.add_provider_for_devices(qnn[:1], opts)
        try:
            sess = ort.InferenceSession(str(work / f"ctx_{arch}.onnx"), so)
            out = sess.run(None, {"x": x})[0]
            row.update(loaded=True, ran=True, providers=sess.get_providers(),
                       max_abs_vs_qdq_cpu=float(np.abs(out - cpu).max()), max_abs_vs_fp32=float(np.abs(out - ref).max()))
        except Exception as e:
            row.update(loaded=False, error=str(e)[:300])
        archs[arch] = row
    result = {
        "what": "QDQ W8A16 Conv+Relu compiled to QNN HTP EP-context binaries per Hexagon architecture, loaded and run here",
        "machine": {"cpu": _cpu_model(), "platform": platform.platform(), "cores": os.cpu_count()},
        "versions": {"onnxruntime": ort.__version__, "onnxruntime_qnn": oq.__version__},
        "devices": [{"ep": d.ep_name, "type": str(d.device.type), "vendor": d.device.vendor} for d in devices],
        "qdq_ops": sorted({n.op_type for n in onnx.load(str(qdq)).graph.node}),
        "qdq_cpu_max_abs_vs_fp32": float(np.abs(cpu - ref).max()),
        "fp32_max_abs": float(np.abs(ref).max()),
        "archs": archs,
    }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(out)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
