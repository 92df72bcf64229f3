"""Calibration of a static scheme, run as its own process (``python -m instaflow_edge.quantize.onnx_calibrate
JOB_JSON COMPONENT MODEL CACHE [--every-tensor]``), started by ``Calibration.ranges_in_subprocess``:
int8-static's Conv/MatMul/Gemm tensors, or every tensor (the QNN schemes).

Why a process of its own: the calibrator holds an augmented copy of the model and a session that
outputs every calibrated tensor; in the quantizer's process that adds up to > 14 GiB at SD1.5 scale.
Here it is freed when the process exits, and the ranges travel in onnxruntime's calibration-cache
JSON (``quantize_static(calibration_cache_path=...)`` reads it back). Inputs of activation×activation
MatMuls (attention scores, 512 MB each at SD1.5) are not calibrated: those nodes stay fp32.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from ..runtime import onnx_io
from .calibration import Calibration


def calibrate(calibration, component: str, model: Path, cache: Path, every_tensor: bool = False) -> None:
    from onnxruntime.quantization.calibrate import (
        CalibrationDataReader,
        MinMaxCalibrater,
        save_tensors_data,
    )

    from .onnx import STATIC_OP_TYPES, activation_matmuls

    import onnx

    onnx_io.check_model_file(model)
    inputs = {i.name for i in onnx.load(str(model), load_external_data=False).graph.input}
    feeds = [{k: v for k, v in f.items() if k in inputs} for f in calibration.feeds(component)]
    skip = set(activation_matmuls(model))

    class Reader(CalibrationDataReader):
        def __init__(self, items):
            self.it = iter(items)

        def get_next(self):
            return next(self.it, None)

    class Calibrater(MinMaxCalibrater):
        def select_tensors_to_calibrate(self, m):
            tensors, infos = super().select_tensors_to_calibrate(m)
            if every_tensor:
                return tensors, infos
            keep = set()
            for node in m.graph.node:
                if node.op_type in STATIC_OP_TYPES and node.name not in skip:
                    keep.update(node.input)
                    keep.update(node.output)
            return tensors & keep, infos

        def create_inference_session(self):
            """As onnxruntime's, with the memory of a calibration run only: the graph's weights are dropped
            from the Python-side model once the augmented copy is saved (nothing reads them after), and the
            session neither prepacks weights (a second copy) nor keeps an arena (SD1.5's UNet with every
            tensor calibrated went over 22 GiB without these)."""
            import onnxruntime as ort

            for t in self.model.graph.initializer:
                t.ClearField("raw_data")
            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            so.add_session_config_entry("session.disable_prepacking", "1")
            so.enable_cpu_mem_arena = False
            so.log_severity_level = 3
            self.infer_session = ort.InferenceSession(self.augmented_model_path, sess_options=so, providers=self.execution_providers)

    big = (model.parent / onnx_io.EXTERNAL_DATA).exists()
    with tempfile.TemporaryDirectory(prefix="instaflow-calib-") as tmp:
        cal = Calibrater(str(model), None if every_tensor else STATIC_OP_TYPES, str(Path(tmp) / "augmented.onnx"),
                         use_external_data_format=big)
        cal.augment_graph()
        cal.create_inference_session()
        # one input per collect_data call: each call folds its ranges in and frees the outputs (its
        # max_intermediate_outputs option drops them without folding them in, in onnxruntime 1.32)
        for i, feed in enumerate(feeds, 1):
            cal.collect_data(Reader([feed]))
            print(f"calibrated {i}/{len(feeds)}", flush=True)  # the parent's progress bar
        save_tensors_data(cal.compute_data(), cache)


def main(argv: list[str]) -> int:
    every = "--every-tensor" in argv
    job, component, model, cache = [a for a in argv if a != "--every-tensor"]
    import os

    os.chdir(Path(cache).parent)  # onnxruntime's tools drop temp files into the CWD
    calibrate(Calibration.from_job(Path(job)), component, Path(model), Path(cache), every)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
