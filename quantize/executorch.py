"""ExecuTorch's quantization schemes: PT2E (``torchao.quantization.pt2e``) with XNNPACK's quantizer.

``int8``: static int8, per-channel symmetric weights of convolutions and linears, per-tensor activations
observed on the model's own prompts (``convert/executorch.py: calibration_inputs``), as XNNPACK's int8
kernels take them. Only convolutions and linears are quantized (as ONNX int8-static quantizes Conv,
MatMul and Gemm): XNNPACK's quantizer by default also quantizes every add, mul and cat, and the residual
adds of a trained CLIP text encoder carry outliers that a per-tensor int8 range cannot hold (the digits
student's text encoder fell to 15.0 dB that way, under the 25 dB gate). Applied to a component as ``torch.export`` traced it (before the XNNPACK
decompositions), so normalization arithmetic stays float. Registered with ``@scheme("executorch", ...)``.
"""

from __future__ import annotations

from .schemes import EtScheme, scheme

INT8_GATE_DB = 25.0  # as the other int8 schemes (quantize/onnx.py, quantize/openvino.py)


@scheme("executorch", EtScheme.int8, gate_db=INT8_GATE_DB, calibrated=True,
        marks=("quantized_decomposed.quantize_per_tensor.default", "quantized_decomposed.dequantize_per_channel.default"),
        description="PT2E static int8 for XNNPACK: per-channel weights, calibrated per-tensor activations")
def _int8(module, inputs: tuple, feeds: list[tuple]):
    """``module`` (a traced ``torch.export`` module) observed on ``feeds`` and converted to q/dq int8."""
    import torch
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    config = get_symmetric_quantization_config(is_per_channel=True)
    quantizer = XNNPACKQuantizer()
    for op in (torch.ops.aten.linear.default, torch.ops.aten.conv2d.default, torch.ops.aten.convolution.default):
        quantizer.set_operator_type(op, config)
    prepared = prepare_pt2e(module, quantizer)
    with torch.no_grad():
        for feed in feeds or [inputs]:
            prepared(*feed)
    return convert_pt2e(prepared)
