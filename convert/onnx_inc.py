"""``convert --target onnx --quantize int8-static --engine inc``: Intel Neural Compressor's PT2E path.

INC 3.x has no ONNX quantizer any more (the separate onnx-neural-compressor needs numpy < 2). What
works with our pins, and is what this does: ``neural_compressor.torch.export.export`` (torch.export of
the component at the example inputs) → ``prepare(StaticQuantConfig())`` → calibration on real prompts
run through the PyTorch pipeline → ``convert`` → ``torch.onnx.export(dynamo=True)`` of the quantized
graph (QuantizeLinear/DequantizeLinear pairs), which onnxruntime runs. What does not: the exported
graph is specialized to the example shapes (batch 1 at the export's image size: no dynamic axes),
ORT's transformer fusions are not applied to it, and it was only run at the tiny preset here (no SD1.5
figures). The old INC 2.x call on a plain module fails on torch 2.13 (``no attribute 'dynamic_shapes'``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..errors import require
from ..runtime import onnx_io


def inc_int8_static(spec, module, inputs, calibration: list[tuple], path: Path, opset: int) -> None:
    """Quantize ``module`` with INC's PT2E static int8 and export it to ``path``."""
    import warnings

    import onnx
    import torch

    require("neural_compressor", "inc")
    from neural_compressor.torch.export import export
    from neural_compressor.torch.quantization import StaticQuantConfig, convert, prepare

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        prepared = prepare(export(module, tuple(inputs)), StaticQuantConfig())
        for args in calibration:
            prepared(*args)
        quantized = convert(prepared)
        scratch = path.parent / ".export"
        scratch.mkdir(parents=True, exist_ok=True)
        torch.onnx.export(quantized, tuple(inputs), str(scratch / "model.onnx"), dynamo=True, opset_version=opset,
                          input_names=[t.name for t in spec.inputs], output_names=[t.name for t in spec.outputs])
    model = onnx.load(str(scratch / "model.onnx"), load_external_data=True)
    shutil.rmtree(scratch)
    onnx_io.save(model, path)
    onnx.checker.check_model(str(path))
