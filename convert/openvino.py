"""``convert --target openvino``: OpenVINO IR per component, NNCF quantization and parity gates.

Route: PyTorch → our plain ONNX export (``convert/onnx.py: export_component``, TorchScript, no ORT
fusions: those are com.microsoft ops OpenVINO does not read) → ``ov.convert_model`` → shapes made
static (batch 1, the export's image size) → optional NNCF quantization → ``ov.save_model``. Why from
ONNX and not ``ov.convert_model(torch_module)``: the ONNX graph is exactly the one the peer row of the
benchmark ("OpenVINO's default on our plain ONNX export") loads, so the benchmark compares our choices
(static shapes, precision, quantization) on one graph; and the ONNX exporter is the one our other
targets already check against the PyTorch reference (docs/openvino.md).

``--precision``: ``auto`` keeps OpenVINO's device default (bf16 on CPUs with avx512_bf16 or AMX, else
f32), ``f32``/``bf16``/``f16`` set the CPU plugin's inference precision; the precision each component
ran in during the parity check is recorded (``parity_ran_in``). IR weights are f32, or f16 for ``f16``.

Parity: every component and the whole one-step image against the PyTorch fp32 reference, compiled as
``generate --backend openvino`` compiles it; a missed gate raises before the folder is renamed into
place, so nothing is written.
"""

from __future__ import annotations

import gc
import shutil
import time
from pathlib import Path

from ..artifacts import (
    atomic_dir,
    check_output,
    make_manifest,
    read_manifest,
    sha256_tree,
    write_manifest,
)
from ..errors import ModelError
from ..parity import DEFAULT_MIN_PSNR, check_all, compare
from ..pipeline import load_pipeline
from ..progress import say
from ..quantize import openvino as oq
from ..runtime import onnx_io
from ..runtime import openvino as ovrt
from ..runtime.onnx import check_io as ort_check_io
from ..runtime.openvino import OvPrecision
from ..validators import prompt_file
from .config import ConvertConfig, Target, target
from .onnx import _copy_pipeline_files, _end_to_end_reference, components_for, export_component, onnx_spec

ROUTE = "torch.onnx.export(dynamo=False) -> openvino.convert_model -> static shapes"
# gates (dB vs PyTorch fp32) of the unquantized precisions: f32 is the fp32 gate; bf16 (8 mantissa bits)
# and f16 the fp16 one (measured: docs/openvino.md)
PRECISION_MIN_PSNR = {"f32": DEFAULT_MIN_PSNR["fp32"], "bf16": DEFAULT_MIN_PSNR["fp16"], "f16": DEFAULT_MIN_PSNR["fp16"]}


def gate_for(ran_in: str, scheme: str | None) -> float:
    """The default gate of a component computed in ``ran_in`` and quantized with ``scheme`` (or not)."""
    g = PRECISION_MIN_PSNR.get(ran_in, DEFAULT_MIN_PSNR["fp16"])
    return min(g, oq.SCHEME_MIN_PSNR[scheme]) if scheme else g


@target(Target.openvino)
def export_openvino(cfg: ConvertConfig) -> dict:
    """Export ``cfg.model`` to an OpenVINO folder at ``cfg.output``; returns the manifest (``parity`` and
    ``gates`` are the table to show). Every missed gate is raised at once, as one PsnrError."""
    import torch

    from ..components import Sizes
    from ..quantize.onnx import CALIBRATION_PROMPTS, calibration_feeds

    ovrt.require_openvino()
    if cfg.ov_quantize is not None:
        oq.require_nncf()
    prompt_file(cfg.calibration_prompts, [], "calibration prompts")  # a missing/empty file fails now
    check_output(cfg.output, cfg.force, (cfg.model, cfg.calibration_prompts))
    src = Path(cfg.model)
    if not src.is_dir():
        raise ModelError(f"model path {src} is not a folder", "pass a local pipeline folder (instaflow-edge init / train output)")
    import openvino as ov

    t0 = time.perf_counter()
    precision = OvPrecision(cfg.ov_precision)
    scheme = cfg.ov_quantize.value if cfg.ov_quantize else None
    pipe = load_pipeline(src, "cpu", "float32", cfg.allow_pickle, local_files_only=True)
    height, width = pipe.image_size(cfg.height, cfg.width)
    sizes = Sizes.of(pipe, batch=1, height=height, width=width)
    names = components_for(pipe, False)
    wanted = cfg.quantize_components or oq.DEFAULT_COMPONENTS
    quantized = [n for n in names if scheme and (n in wanted or (n == "unet_velocity" and "unet" in wanted))]
    source_manifest = read_manifest(src) or {}
    prompts = prompt_file(cfg.calibration_prompts, source_manifest.get("prompts") or CALIBRATION_PROMPTS, "calibration prompts")
    timings: dict[str, float] = {}
    with atomic_dir(cfg.output, cfg.force, (cfg.model, cfg.calibration_prompts)) as tmp:
        scratch = tmp / ".onnx"  # the plain ONNX export: conversion source and calibration pipeline
        refs = {}
        for name in names:
            spec = onnx_spec(name)
            module = spec.module(pipe)
            inputs = spec.example_inputs(pipe, sizes)
            with torch.no_grad():
                refs[name] = ({t.name: x.numpy() for t, x in zip(spec.inputs, inputs)}, module(*inputs).numpy())
            t = time.perf_counter()
            say("openvino", f"{name}: exporting to ONNX")
            export_component(spec, module, inputs, scratch / name / onnx_io.MODEL_FILE, opset=18)
            timings[f"export_{name}"] = round(time.perf_counter() - t, 2)
        e2e = _end_to_end_reference(pipe, sizes)
        meta = {"latent_shape": [sizes.latent_channels, sizes.latent_height, sizes.latent_width],
                "height": sizes.height, "width": sizes.width, "scaling_factor": pipe.scaling_factor,
                "flow": pipe.info.flow, "default_steps": pipe.info.default_steps, "route": ROUTE,
                "components": names, "size_multiple": pipe.size_multiple, "precision": precision.value,
                "quantize": scheme, "openvino_version": ov.get_version()}
        _copy_pipeline_files(src, scratch, names)
        for name in names:
            (tmp / name).mkdir()
        _copy_pipeline_files(src, tmp, names)
        del pipe, module
        gc.collect()  # the torch model is not needed past here (SD1.5: 4.3 GB)
        write_manifest(scratch, {"kind": "onnx-export-partial", "onnx": {**meta, "opset": 18}})
        for name in names:
            t = time.perf_counter()
            say("openvino", f"{name}: converting to OpenVINO IR")
            model = ov.convert_model(str(scratch / name / onnx_io.MODEL_FILE))
            model.reshape({k: list(v.shape) for k, v in refs[name][0].items()})
            if name in quantized:
                feeds = None
                if scheme in oq.CALIBRATED:
                    say("openvino", f"{name}: calibration inputs from {len(prompts)} prompts")
                    feeds = calibration_feeds(scratch, name, prompts)
                say("openvino", f"{name}: NNCF {scheme}")
                model = oq.quantize_model(model, scheme, name, feeds)
            ov.save_model(model, str(tmp / name / ovrt.IR_FILE), compress_to_fp16=precision is OvPrecision.f16)
            del model
            gc.collect()
            timings[f"convert_{name}"] = round(time.perf_counter() - t, 2)
        shutil.rmtree(scratch)
        say("openvino", f"parity vs PyTorch ({precision.value}): {', '.join(names)}, end to end")
        rows, ran, sessions = [], {}, {}
        core = ov.Core()
        for name in names:
            sess = ovrt.compile_model(tmp / name / ovrt.IR_FILE, precision, core=core)
            ort_check_io(sess, name, tmp / name / ovrt.IR_FILE)
            ran[name] = sess.precision
            inputs, ref = refs[name]
            rows.append(compare(name, ref, sess.run(None, inputs)[0]))
            if name in ovrt.COMPONENTS_ONE_STEP:
                sessions[name] = sess
        rows.append(compare("end_to_end", e2e[1], ovrt.run_one_step(None, e2e[0]["input_ids"], e2e[0]["noise"], meta, sessions)))
        del sessions
        gates = {n: cfg.min_psnr if cfg.min_psnr is not None else gate_for(ran[n], scheme if n in quantized else None)
                 for n in names}
        gates["end_to_end"] = cfg.min_psnr if cfg.min_psnr is not None else min(gates.values())
        check_all(rows, gates, fix="use --precision f32, a lighter --quantize, or lower the gate explicitly with --min-psnr")
        manifest = make_manifest(
            "openvino-export", cfg,
            source={"model": str(src), "content_sha256": source_manifest.get("content_sha256") or sha256_tree(src)},
            openvino=meta, parity_ran_in=ran,
            quantize={"scheme": scheme, "engine": "nncf" if scheme else None, "components": quantized,
                      "calibration_prompts": len(prompts) if scheme in oq.CALIBRATED else 0},
            gates=gates, parity=[p.as_dict() for p in rows],
            sizes={n: sum(p.stat().st_size for p in (tmp / n).iterdir() if p.is_file()) for n in names},
            seconds={**timings, "total": round(time.perf_counter() - t0, 2)},
        )
        write_manifest(tmp, manifest)
    return manifest
