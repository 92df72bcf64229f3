"""ONNX quantization schemes (onnxruntime's quantizer), one registry for ``convert --quantize`` and
``instaflow-edge quantize``.

Schemes (records in ``schemes.SCHEMES`` under backend ``"onnx"``, filled by ``@scheme``; a test checks
they and ``schemes.OnnxScheme`` agree):

- ``fp16``: onnxruntime's float16 converter, fp32 inputs/outputs (``keep_io_types``) and a block list of
  overflow-prone ops kept fp32 (normalizations, their Pow/ReduceMean/Sqrt pieces, Exp/Softmax). NaN/Inf
  is caught by the parity check. (onnxconverter-common's converter breaks the TorchScript export's
  time-projection cast.)
- ``int8-dynamic``: weight-only-at-rest int8 for MatMul/Gemm, activations quantized at run time.
  Convolutions are left fp32: dynamic Conv becomes ConvInteger, which has no fast CPU kernel.
- ``int8-static``: QDQ, per-channel symmetric int8 weights, uint8 activations (the CPU/VNNI pairing
  onnxruntime recommends) for Conv/MatMul/Gemm, ranges from MinMax calibration on real prompts run
  through the pipeline. Activation×activation MatMuls (attention scores and their product with V) stay
  fp32: they are not calibrated, which is what keeps calibration at SD1.5 scale under ~12 GiB (each
  score tensor is 512 MB there), and attention is where int8 hurts quality most. Calibration runs in
  its own process (``quantize.onnx_calibrate``) and hands its ranges over in a cache file, so the
  quantizer never holds the calibration session's memory.

Engines: ``ort`` (the above). ``inc`` (Intel Neural Compressor) has no ONNX path in INC 3.x; see
``convert/onnx.py`` for what ``--engine inc`` does and does not do.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from ..envinfo import cpu_info
from ..parity import DEFAULT_MIN_PSNR
from ..runtime import onnx_io
from ..runtime.onnx_io import EXTERNAL_DATA
from .calibration import Calibration
from .schemes import DEFAULT_COMPONENTS, OnnxScheme, get_scheme, scheme  # noqa: F401  (DEFAULT_COMPONENTS: re-exported)

log = logging.getLogger(__name__)

FP16_OP_BLOCK = ["LayerNormalization", "SkipLayerNormalization", "InstanceNormalization", "GroupNorm",
                 "Pow", "ReduceMean", "Sqrt", "Exp", "Softmax", "RandomNormalLike"]
STATIC_OP_TYPES = ["Conv", "MatMul", "Gemm"]
DYNAMIC_OP_TYPES = ["MatMul", "Gemm"]

CALIBRATION_PROMPTS = [
    "a red fox in snow", "a lighthouse at night", "a cat wearing a hat", "a castle on a mountain",
    "a bowl of fruit on a table", "a city street in the rain", "a portrait of an old man", "a sailing boat at sunset",
]

# Default gates (dB) against the PyTorch fp32 reference, per scheme (fp32 60 and fp16 35 from parity.py).
# int8, measured on random-weight presets: int8-static text encoder /
# UNet / end to end = 45.3-48.6 / 42.3-44.9 / 44.4-46.1 dB on tiny (onnxruntime and INC), 40.1 / 47.1 /
# 46.3 dB on sd15 (8 calibration prompts); int8-dynamic 47.8 / 62.9 / 62.4 dB on tiny. An earlier run saw
# 29.4 dB on the sd15 UNet with only 3 calibration inputs. 25 dB (rms error 5.6 % of the reference's
# peak) sits 15 dB under everything measured here and 4 dB under that weakest run: a gate that a sound
# calibration clears and a broken one (wrong ranges, an unquantizable op quantized) does not.
INT8_GATE_DB = 25.0


def default_gate(name: OnnxScheme | str | None) -> float:
    """The default gate (dB) of scheme ``name`` against the fp32 reference (``None``: fp32, nothing quantized)."""
    return DEFAULT_MIN_PSNR["fp32"] if name is None else get_scheme("onnx", name).gate_db


def _big(path: Path) -> bool:

    return (path.parent / EXTERNAL_DATA).exists()


@scheme("onnx", OnnxScheme.fp16, gate_db=DEFAULT_MIN_PSNR["fp16"], marks=("float16 weights",),
        description="onnxruntime's float16 converter, fp32 I/O, overflow-prone ops kept fp32")
def _fp16(src: Path, dst: Path, component: str, calibration: Calibration | None, params) -> None:
    from onnxruntime.transformers.float16 import (
        DEFAULT_OP_BLOCK_LIST,
        convert_float_to_float16,
    )


    model = onnx_io.load(src)
    model = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True,
                                     op_block_list=list(DEFAULT_OP_BLOCK_LIST) + FP16_OP_BLOCK)
    onnx_io.save(model, dst)


@scheme("onnx", OnnxScheme.int8_dynamic, gate_db=INT8_GATE_DB, marks=("DynamicQuantizeLinear", "int8 weights"),
        description="int8 MatMul/Gemm weights, activations quantized at run time")
def _int8_dynamic(src: Path, dst: Path, component: str, calibration: Calibration | None, params) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic


    onnx_io.check_model_file(src)
    src, dst = Path(src).resolve(), Path(dst).resolve()  # the quantizer runs in a scratch working directory
    with onnx_io.scratch_cwd():
        quantize_dynamic(str(src), str(dst), per_channel=True, weight_type=QuantType.QInt8,
                         op_types_to_quantize=DYNAMIC_OP_TYPES, use_external_data_format=_big(src),
                         extra_options={"MatMulConstBOnly": True})
    _tidy_external(dst)


def x86_without_vnni() -> bool:
    """Whether this is an x86 CPU without VNNI (AVX-512 VNNI, AVX-VNNI, AMX int8): there onnxruntime's
    u8×s8 kernels sum pairs in int16 (``vpmaddubsw``) and saturate with full-range 8-bit weights, so int8
    weights are quantized with 7 bits (``reduce_range``, onnxruntime's advice for non-VNNI machines)."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return False
    flags = set(cpu_info().get("flags") or ())
    return not flags & {"avx512_vnni", "avx_vnni", "amx_int8"}


@scheme("onnx", OnnxScheme.int8_static, gate_db=INT8_GATE_DB, calibrated=True,
        marks=("QuantizeLinear", "DequantizeLinear", "int8 weights"),
        description="QDQ int8, per-channel weights, MinMax-calibrated uint8 activations")
def _int8_static(src: Path, dst: Path, component: str, calibration: Calibration | None, params) -> None:
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )


    onnx_io.check_model_file(src)
    src, dst = Path(src).resolve(), Path(dst).resolve()
    calibration = dataclasses.replace(calibration, folder=calibration.folder.resolve())
    with onnx_io.scratch_cwd() as tmp:
        cache = tmp / "ranges.json"
        calibration.ranges_in_subprocess(component, src, cache)
        quantize_static(
            str(src), str(dst), calibration_data_reader=None, quant_format=QuantFormat.QDQ,
            op_types_to_quantize=STATIC_OP_TYPES, per_channel=True, activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8, nodes_to_exclude=activation_matmuls(src), reduce_range=x86_without_vnni(),
            use_external_data_format=_big(src), calibrate_method=CalibrationMethod.MinMax,
            # MatMul outputs stay fp32: every one feeds a bias Add or attention (fp32 either way), and ORT
            # then runs DQ→MatMul as MatMulIntegerToFloat instead of requantizing and dequantizing at once
            # (sd15 UNet, 1 thread: 2.10× → 2.19× ORT fp32, PSNR unchanged at 47.5 dB)
            extra_options={"WeightSymmetric": True, "ActivationSymmetric": False,
                           "OpTypesToExcludeOutputQuantization": ["MatMul"]},
            calibration_cache_path=str(cache),
        )
    _tidy_external(dst)


def _tidy_external(dst: Path) -> None:
    """onnxruntime's quantizers name external data ``<model>.data``; re-save through onnx_io so a big
    result uses our one ``model.onnx_data`` and a small one is a single file."""

    stray = [p for p in dst.parent.iterdir() if p.name != dst.name and p.name.startswith(dst.name)]
    if not stray:
        return
    model = onnx_io.load(dst)
    for p in stray:
        p.unlink()
    onnx_io.save(model, dst)


def activation_matmuls(path: Path) -> list[str]:
    """Names of MatMul nodes whose two inputs are both activations (attention: Q·Kᵀ and P·V)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    consts = {t.name for t in model.graph.initializer}
    consts |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    # weights may reach a MatMul through a Transpose/Cast of a constant
    for n in model.graph.node:
        if n.op_type in ("Transpose", "Cast", "Reshape", "DequantizeLinear") and n.input and n.input[0] in consts:
            consts |= set(n.output)
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and not (set(n.input) & consts)]


def apply_scheme(folder: Path, scheme_name: OnnxScheme | str, components: list[str], prompts: list[str],
                 params=None) -> None:
    """Quantize ``components`` of the export in ``folder`` in place. Every component is quantized from
    the fp32 pipeline first (calibration runs the fp32 upstream models), then all are swapped in."""
    record = get_scheme("onnx", scheme_name)
    calibration = Calibration(folder, prompts) if record.calibrated else None
    staged = {}
    for i, name in enumerate(components, 1):
        log.info(f"{name} ({i}/{len(components)}): {record.name}"
                 + (f", calibrating on {len(prompts)} prompts" if record.calibrated else ""))
        src = folder / name / onnx_io.MODEL_FILE
        dst = folder / name / ".quantized" / onnx_io.MODEL_FILE
        dst.parent.mkdir(exist_ok=True)
        record.apply(src, dst, name, calibration, params)
        onnx_io.session(dst)  # load test before it replaces the fp32 model
        staged[name] = dst
    for name, dst in staged.items():
        for p in list((folder / name).iterdir()):
            if p.is_file() and p.name.startswith(onnx_io.MODEL_FILE):
                p.unlink()
        for p in dst.parent.iterdir():
            p.rename(folder / name / p.name)
        dst.parent.rmdir()
