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

import dataclasses
import gc
import logging
import shutil
import time

from ..artifacts import (
    atomic_dir,
    make_manifest,
    read_manifest,
    sha256_tree,
    write_manifest,
)
from ..parity import DEFAULT_MIN_PSNR, check_all, check_conditioning, compare
from ..quantize import openvino as oq
from ..quantize.calibration import Calibration
from ..quantize.schemes import get_scheme
from ..runtime import onnx_io
from ..runtime import openvino as ovrt
from ..runtime.base import ONE_STEP
from ..runtime.onnx import write_partial
from ..runtime.openvino import OvPrecision
from ..runtime.sampler import sample, session_calls
from ..validators import prompt_file
from . import reference
from .config import ConvertConfig, Target, target
from .onnx import UNET_TIMESTEP, components_for, copy_pipeline_files, export_component, onnx_spec

log = logging.getLogger(__name__)

ROUTE = "torch.onnx.export(dynamo=False) -> openvino.convert_model -> static shapes"
# gates (dB vs PyTorch fp32) of the unquantized precisions: f32 is the fp32 gate; bf16 (8 mantissa bits)
# and f16 the fp16 one (measured: docs/openvino.md)
PRECISION_MIN_PSNR = {"f32": DEFAULT_MIN_PSNR["fp32"], "bf16": DEFAULT_MIN_PSNR["fp16"], "f16": DEFAULT_MIN_PSNR["fp16"]}


def gate_for(ran_in: str, scheme: str | None) -> float:
    """The default gate of a component computed in ``ran_in`` and quantized with ``scheme`` (or not)."""
    g = PRECISION_MIN_PSNR.get(ran_in, DEFAULT_MIN_PSNR["fp16"])
    return min(g, get_scheme("openvino", scheme).gate_db) if scheme else g


@target(Target.openvino)
def export_openvino(cfg: ConvertConfig) -> dict:
    """Export ``cfg.model`` to an OpenVINO folder at ``cfg.output``; returns the manifest (``parity`` and
    ``gates`` are the table to show). Every missed gate is raised at once, as one PsnrError."""
    from ..quantize.onnx import CALIBRATION_PROMPTS

    ovrt.require_openvino()
    if cfg.options.quantize is not None:
        oq.require_nncf()
    src = reference.check_source(cfg)  # prompts file, output vs inputs, model folder: before any load
    import openvino as ov

    t0 = time.perf_counter()
    precision = OvPrecision(cfg.options.precision)
    scheme = cfg.options.quantize.value if cfg.options.quantize else None
    pipe, sizes = reference.load_source(src, cfg.allow_pickle, cfg.height, cfg.width)
    names = components_for(pipe, False)
    record = get_scheme("openvino", scheme) if scheme else None
    params = record.make_params(cfg.options.quantize_params) if record else None
    wanted = cfg.options.quantize_components or (record.default_components if record else ())
    quantized = [n for n in names if scheme and (n in wanted or (n == "unet_velocity" and "unet" in wanted))]
    source_manifest = read_manifest(src) or {}
    prompts = prompt_file(cfg.calibration_prompts, source_manifest.get("prompts") or CALIBRATION_PROMPTS, "calibration prompts")
    timings: dict[str, float] = {}
    with atomic_dir(cfg.output, cfg.force, (cfg.model, cfg.calibration_prompts)) as tmp:
        scratch = tmp / ".onnx"  # the plain ONNX export: conversion source and calibration pipeline
        ref = reference.compute(pipe, sizes, names, onnx_spec, fixed_size=True)
        for name in names:
            spec = onnx_spec(name)
            t = time.perf_counter()
            log.info(f"{name}: exporting to ONNX")
            export_component(spec, spec.module(pipe), ref.components[name][0], scratch / name / onnx_io.MODEL_FILE, opset=18)
            timings[f"export_{name}"] = round(time.perf_counter() - t, 2)
        block = {**ref.facts.block(), "route": ROUTE, "precision": precision.value, "quantize": scheme,
                 "unet_timestep": UNET_TIMESTEP, "openvino_version": ov.get_version()}
        copy_pipeline_files(src, scratch, names)
        for name in names:
            (tmp / name).mkdir()
        copy_pipeline_files(src, tmp, names)
        del pipe
        gc.collect()  # the torch model is not needed past here (SD1.5: 4.3 GB)
        write_partial(scratch, {**block, "opset": 18})
        for name in names:
            t = time.perf_counter()
            log.info(f"{name}: converting to OpenVINO IR")
            model = ov.convert_model(str(scratch / name / onnx_io.MODEL_FILE))
            model.reshape({k: list(v.shape) for k, v in ref.feed(name).items()})
            if name in quantized:
                feeds = None
                if record.calibrated:
                    log.info(f"{name}: calibration inputs from {len(prompts)} prompts")
                    feeds = Calibration(scratch, prompts).feeds(name)
                log.info(f"{name}: NNCF {scheme}")
                model = oq.quantize_model(model, scheme, name, feeds, params)
            ov.save_model(model, str(tmp / name / ovrt.IR_FILE), compress_to_fp16=precision is OvPrecision.f16)
            del model
            gc.collect()
            timings[f"convert_{name}"] = round(time.perf_counter() - t, 2)
        shutil.rmtree(scratch)
        log.info(f"parity vs PyTorch ({precision.value}): {', '.join(names)}, end to end")
        sessions = ovrt.compile_components(tmp, names, precision)
        ran = {name: sessions[name].precision for name in names}
        rows = [compare(name, ref.output(name), sessions[name].run(None, ref.feed(name))[0]) for name in names]
        cond = ref.conditioning(lambda x, s=sessions["unet"]: s.run(None, ref.feed("unet", x))[0])
        calls = session_calls({n: sessions[n] for n in ONE_STEP})
        rows.append(compare("end_to_end", ref.image, sample(calls, ref.ids, ref.noise, ref.facts.scaling_factor, 1)))
        del sessions, calls
        gates = {n: cfg.min_psnr if cfg.min_psnr is not None else gate_for(ran[n], scheme if n in quantized else None)
                 for n in names}
        gates["end_to_end"] = cfg.min_psnr if cfg.min_psnr is not None else min(gates.values())
        check_all(rows, gates, fix="use --precision f32, a lighter --quantize, or lower the gate explicitly with --min-psnr")
        check_conditioning(cond)
        manifest = make_manifest(
            ovrt.KIND, cfg,
            source={"model": str(src), "content_sha256": source_manifest.get("content_sha256") or sha256_tree(src)},
            openvino=block, parity_ran_in=ran,
            quantize={"scheme": scheme, "engine": "nncf" if scheme else None, "components": quantized,
                      "calibration_prompts": len(prompts) if record and record.calibrated else 0,
                      "params": dataclasses.asdict(params) if params else None},
            gates=gates, parity=[p.as_dict() for p in rows], conditioning=cond.as_dict(),
            sizes={n: sum(p.stat().st_size for p in (tmp / n).iterdir() if p.is_file()) for n in names},
            seconds={**timings, "total": round(time.perf_counter() - t0, 2)},
        )
        write_manifest(tmp, manifest)
    return manifest
