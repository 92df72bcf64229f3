"""QDQ schemes for Qualcomm's HTP (the Snapdragon NPU), through ONNX Runtime's QNN provider.

Schemes (records under backend ``"qnn"``, the choices of ``convert --target qnn --quantize``):

- ``w8a16`` (default): uint8 weights, uint16 activations, every tensor of the graph quantized (the HTP
  runs integer graphs), ranges from MinMax calibration on the model's own prompts. Qualcomm's published
  SD1.5 runs on the NPU use this pairing.
- ``w8a8``: uint8 weights and activations; half the activation memory, lower quality.

Both start from the fp32 graph prepared by :func:`prepare` (the rewrites the HTP needs, each exact or
within float rounding) and use ONNX Runtime's QNN configuration (``get_qnn_qdq_config``: the operator
overrides that make a QDQ graph the QNN provider accepts; 16-bit Q/DQ as ``com.microsoft`` ops below
opset 21). Calibration runs in its own process (``quantize.onnx_calibrate``, every tensor), as
int8-static's does.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

from ..runtime import onnx_io
from .calibration import Calibration
from .schemes import QnnScheme, scheme

log = logging.getLogger(__name__)

QNN_COMPONENTS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
# A finite stand-in for the causal mask's -inf: 16-bit activations need a finite range, and exp(-1000)
# is 0 in float32 as exp(-inf) is, so the softmax is unchanged while attention logits stay far above it.
MASK_VALUE = -1000.0
# Gates (dB vs PyTorch fp32), measured on the tiny preset: w8a16 text encoder / UNet / decoder / end to
# end 48.2 / 55.6 / 53.2 / - dB, w8a8 UNet 42.3 dB. 30 and 20 dB sit well under those and far above a
# broken graph (a missed rewrite gave 8-24 dB on the HTP).
W8A16_GATE_DB = 30.0
QDQ16_OPSET = 21
W8A8_GATE_DB = 20.0


def prepare(src: Path, dst: Path) -> dict:
    """The fp32 graph the HTP compiles well, from an exported component: QNN's own fusions
    (``qnn_preprocess_model``), ONNX Runtime's shape inference and constant folding
    (``quant_pre_process``: the shape arithmetic of the export becomes constants, which a QDQ graph
    would otherwise quantize), then our rewrites. Returns what was rewritten, for the manifest:

    - ``causal_mask``: -inf in a constant mask becomes :data:`MASK_VALUE` (CLIP's causal attention);
    - ``groupnorm_affine``: GroupNorm's per-channel scale and shift (Mul, Add after the exported
      InstanceNormalization) become one depthwise 1×1 Conv with the same weights. The QNN provider
      takes that Mul, but the compiled HTP graph computes some of them wrongly (on ``tiny``: the UNet's
      first up-block, 8 dB on the host's HTP emulation, 55 dB with the Conv)."""
    import onnx
    from onnxruntime.quantization.execution_providers.qnn import qnn_preprocess_model
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, dst = Path(src).resolve(), Path(dst).resolve()
    dst.parent.mkdir(parents=True, exist_ok=True)
    work = dst.parent / ".prepare"
    work.mkdir(exist_ok=True)
    big = (src.parent / onnx_io.EXTERNAL_DATA).exists()  # > 2 GB: every step keeps its weights outside
    external = {"save_as_external_data": big, "all_tensors_to_one_file": True, "external_data_location": "weights.data"}
    with onnx_io.scratch_cwd():
        fused = work / "fused.onnx"
        first = fused if qnn_preprocess_model(str(src), str(fused), **external) else src
        quant_pre_process(str(first), str(work / "folded.onnx"), skip_symbolic_shape=True,
                          **{**external, "external_data_location": "folded.data"})
    model = onnx.load(str(work / "folded.onnx"))
    done = {"causal_mask": finite_masks(model), "groupnorm_affine": groupnorm_affine_to_conv(model)}
    onnx_io.save(model, dst)
    del model
    shutil.rmtree(work)
    # opset 21, where QuantizeLinear takes 16-bit types: the quantizer would otherwise convert the whole
    # model in memory, which protobuf cannot serialize past 2 GB; here only the graph is converted (the
    # weights stay in their file, referenced as they were)
    from onnx import version_converter

    graph = onnx.load(str(dst), load_external_data=False)
    if next(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) < QDQ16_OPSET:
        onnx.save(version_converter.convert_version(graph, QDQ16_OPSET), str(dst))
    return done


def finite_masks(model) -> int:
    """Replace -inf (and float32's lowest values) in float constants by :data:`MASK_VALUE`; returns how
    many constants changed."""
    import numpy as np
    from onnx import numpy_helper

    count = 0
    for i, t in enumerate(model.graph.initializer):
        if t.data_type != 1:  # float32
            continue
        a = numpy_helper.to_array(t)
        low = a < -1e4
        if a.size and low.any():
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(np.where(low, MASK_VALUE, a).astype(np.float32), t.name))
            count += 1
    return count


def groupnorm_affine_to_conv(model) -> int:
    """Rewrite each InstanceNormalization → Reshape → Mul(γ[C,1,1]) → Add(β[C,1,1]) tail (the exported
    GroupNorm) as Reshape → Conv(weight γ[C,1,1,1], bias β, group C, 1×1); returns the count."""
    import numpy as np
    from onnx import helper, numpy_helper

    g = model.graph
    init = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    users: dict[str, list] = {}
    for n in g.node:
        for x in n.input:
            users.setdefault(x, []).append(n)
    out, skip, count = [], set(), 0
    for n in g.node:
        if n.name in skip:
            continue
        up = producer.get(n.input[0]) if n.op_type == "Mul" and len(n.input) == 2 else None
        after = users.get(n.output[0], []) if up is not None else []
        if (up is not None and up.op_type == "Reshape" and producer.get(up.input[0]) is not None
                and producer[up.input[0]].op_type == "InstanceNormalization" and n.input[1] in init
                and len(after) == 1 and after[0].op_type == "Add" and after[0].input[1] in init):
            gamma = numpy_helper.to_array(init[n.input[1]])
            beta = numpy_helper.to_array(init[after[0].input[1]])
            if gamma.ndim == 3 and gamma.shape[1:] == (1, 1) and beta.shape == gamma.shape:
                c = gamma.shape[0]
                w, b = f"{n.name}/affine_weight", f"{n.name}/affine_bias"
                g.initializer.extend([numpy_helper.from_array(gamma.reshape(c, 1, 1, 1).astype(np.float32), w),
                                      numpy_helper.from_array(beta.reshape(c).astype(np.float32), b)])
                out.append(helper.make_node("Conv", [n.input[0], w, b], [after[0].output[0]],
                                            name=f"{n.name}/affine_conv", group=c, kernel_shape=[1, 1]))
                skip.add(after[0].name)
                count += 1
                continue
        out.append(n)
    if count:
        del g.node[:]
        g.node.extend(out)
    return count


@dataclasses.dataclass(frozen=True)
class _Types:
    activations: str
    weights: str = "QUInt8"


def _qdq(src: Path, dst: Path, component: str, calibration: Calibration, types: _Types) -> None:
    """Calibrate every tensor of ``src`` (in a subprocess) and write its QDQ graph for the QNN provider."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    src, dst = Path(src).resolve(), Path(dst).resolve()
    calibration = dataclasses.replace(calibration, folder=calibration.folder.resolve())
    with onnx_io.scratch_cwd() as tmp:
        cache = tmp / "ranges.json"
        calibration.ranges_in_subprocess(component, src, cache, every_tensor=True)
        qc = get_qnn_qdq_config(str(src), None, activation_type=getattr(QuantType, types.activations),
                                weight_type=getattr(QuantType, types.weights))
        quantize_static(str(src), str(dst), calibration_data_reader=None, quant_format=QuantFormat.QDQ,
                        activation_type=qc.activation_type, weight_type=qc.weight_type,
                        op_types_to_quantize=qc.op_types_to_quantize, nodes_to_exclude=qc.nodes_to_exclude,
                        per_channel=qc.per_channel, use_external_data_format=qc.use_external_data_format,
                        calibrate_method=CalibrationMethod.MinMax, extra_options=qc.extra_options,
                        calibration_cache_path=str(cache))
    stray = [p for p in dst.parent.iterdir() if p.name != dst.name and p.name.startswith(dst.name)]
    if stray:  # the quantizer's own external-data name: re-saved as ours
        model = onnx_io.load(dst)
        for p in stray:
            p.unlink()
        onnx_io.save(model, dst)


_MARKS = ("QuantizeLinear", "DequantizeLinear", "uint8 weights")


@scheme("qnn", QnnScheme.w8a16, gate_db=W8A16_GATE_DB, calibrated=True, default_components=QNN_COMPONENTS,
        marks=_MARKS, description="uint8 weights, uint16 activations, every tensor (QNN HTP)")
def _w8a16(src: Path, dst: Path, component: str, calibration: Calibration | None, params) -> None:
    _qdq(src, dst, component, calibration, _Types("QUInt16"))


@scheme("qnn", QnnScheme.w8a8, gate_db=W8A8_GATE_DB, calibrated=True, default_components=QNN_COMPONENTS,
        marks=_MARKS, description="uint8 weights and activations, every tensor (QNN HTP)")
def _w8a8(src: Path, dst: Path, component: str, calibration: Calibration | None, params) -> None:
    _qdq(src, dst, component, calibration, _Types("QUInt8"))
