"""``convert --target qnn``: QDQ graphs for Qualcomm's HTP (Snapdragon NPUs) and their EP-context binaries.

Route per component (text encoder, one-step UNet, VAE decoder): our ONNX export at static shapes
(``convert/onnx.py: export_component``, batch 1, the export's image size) → the HTP's graph preparation
(``quantize/qnn.py: prepare``: QNN's fusions, constant folding of the shape arithmetic, a finite causal
mask, GroupNorm's affine tail as a depthwise 1×1 Conv) → QDQ quantization with ONNX Runtime's QNN
configuration (``--quantize w8a16``, the default, or ``w8a8``), calibrated on the model's own prompts →
for each ``--htp-arch``, the QNN provider's HTP backend compiles the QDQ graph into an EP-context model
(``htp/vNN/<component>/model_ctx.onnx`` and its ``.bin``), each in a process of its own (the compiler's
memory is freed with it, and its peak RSS measured).

What went where: the manifest's ``htp.archs[arch][component]`` lists the nodes the compiled model keeps
outside its ``EPContext`` nodes (they run on the phone's CPU), by name and op type, with the reason: the
float32 graph inputs' QuantizeLinear and outputs' DequantizeLinear stay there by design (an app feeds and
reads float32); any other node is one the QNN provider did not take.

Parity: the QDQ graphs on ONNX Runtime's CPU provider (the HTP's quantized arithmetic, up to its
kernels) against the PyTorch fp32 reference, per component and end to end, and the conditioning check;
gates as every target's. Then each compiled model is loaded back with the QNN provider and run on the
reference inputs: on an x86-64 host the HTP backend emulates the NPU, so its figures (``htp_emulated``)
show what the compiled graph computes, not how fast a phone runs it.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import ClassVar

from ..artifacts import atomic_dir, inherited_prompts, make_manifest, read_manifest, sha256_tree, write_manifest
from ..child import failure, run_child
from ..errors import InputError, MissingDependencyError, ModelError
from ..quantize import qnn as qq
from ..quantize.calibration import Calibration
from ..quantize.schemes import QnnScheme, get_scheme
from ..runtime import onnx_io
from ..runtime import qnn as qrt
from ..runtime.base import ONE_STEP
from ..runtime.onnx import write_partial
from ..runtime.sampler import sample, session_calls
from ..validators import boolean, optional_choice, prompt_file
from . import reference
from .config import _CAL_HELP, ConvertConfig, opt, target
from .onnx import UNET_TIMESTEP, copy_pipeline_files, export_component, onnx_spec

log = logging.getLogger(__name__)

ROUTE = ("torch.onnx.export(dynamo=False), static shapes -> HTP preparation -> QDQ (QNN config, calibrated) "
         "-> QNN HTP EP-context per architecture")
# Hexagon architectures the HTP backend of onnxruntime-qnn 2.7 compiles for (checked: studies/qnn_probe.py)
# and the Snapdragon 8-series generations that carry them
HTP_ARCHS = {"68": "Snapdragon 888", "69": "Snapdragon 8 Gen 1", "73": "Snapdragon 8 Gen 2",
             "75": "Snapdragon 8 Gen 3", "79": "Snapdragon 8 Elite"}
DEFAULT_ARCHS = ("73", "75", "79")
EMULATED_MAX_PARAMS = 100_000_000
# the UNet's calibration timesteps, cycled over the prompts: text to image (1000) for half of them, and
# the strengths image to image starts from for the rest (its timestep input is quantized like the rest)
EDIT_TIMESTEPS = (1000.0, 700.0, 1000.0, 400.0, 1000.0, 100.0, 1000.0, 0.0)


@dataclasses.dataclass
class QnnOptions:
    """QDQ graphs and EP-context binaries for Snapdragon NPUs (ONNX Runtime's QNN provider, HTP backend).

    ``htp_arch``: the Hexagon architectures to compile for (default 73, 75, 79: Snapdragon 8 Gen 2, 8 Gen
    3, 8 Elite); ``no_compile``: the QDQ graphs only (the provider then compiles on the phone, at start)."""

    target: ClassVar[str] = "qnn"
    module: ClassVar[str] = "instaflow_edge.convert.qnn"
    quantize: QnnScheme = opt(QnnScheme.w8a16, "The QDQ scheme: w8a16 (uint8 weights, uint16 activations) or w8a8.")
    htp_arch: list[str] | None = opt(None, "A Hexagon architecture to compile for (repeatable: "
                                     + ", ".join(f"{a} = {n}" for a, n in HTP_ARCHS.items())
                                     + "; default: " + ", ".join(DEFAULT_ARCHS) + ").", "--htp-arch")
    calibration_prompts: str | None = opt(None, _CAL_HELP)
    no_compile: bool = opt(False, "Write the QDQ graphs only, no EP-context binaries.", "--no-compile")

    def __post_init__(self) -> None:
        self.quantize = optional_choice("quantize", self.quantize, QnnScheme) or QnnScheme.w8a16
        self.no_compile = boolean("no_compile", self.no_compile)
        if self.no_compile and self.htp_arch:
            raise InputError("--htp-arch and --no-compile contradict each other", "drop one of them")
        archs = [str(a).removeprefix("v") for a in (self.htp_arch or DEFAULT_ARCHS)]
        bad = [a for a in archs if a not in HTP_ARCHS]
        if bad:
            raise InputError(f"unknown --htp-arch {bad[0]!r}", f"choose from: {', '.join(HTP_ARCHS)}")
        self.htp_arch = list(dict.fromkeys(archs))

    def check(self, cfg: ConvertConfig) -> None:
        if cfg.fused:
            raise InputError("--fused does not apply to --target qnn (an app runs the three graphs)", "drop --fused")


def require_qnn() -> None:
    """The QNN provider's host wheel (its HTP compiler) must be importable."""
    try:
        import onnxruntime_qnn  # noqa: F401
    except ImportError as e:
        raise MissingDependencyError(f"--target qnn needs onnxruntime-qnn ({e})",
                                     "pip install 'instaflow-edge[qnn]' (x86-64 Linux or Windows)") from e


def qnn_devices():
    """The QNN provider's devices, the provider library registered with onnxruntime first (2.7 is a plug-in
    provider)."""
    import onnxruntime as ort
    import onnxruntime_qnn as oq

    if not any(d.ep_name == oq.get_ep_name() for d in ort.get_ep_devices()):
        ort.register_execution_provider_library(oq.get_ep_name(), oq.get_library_path())
    return [d for d in ort.get_ep_devices() if d.ep_name == oq.get_ep_name()]


def qnn_session(path: Path, arch: str, context_out: Path | None = None):
    """A session of ``path`` on the QNN provider's HTP backend for ``arch``; with ``context_out``, it
    writes the compiled EP-context model there (the binary beside it)."""
    import onnxruntime as ort
    import onnxruntime_qnn as oq

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if context_out is not None:
        so.add_session_config_entry("ep.context_enable", "1")
        so.add_session_config_entry("ep.context_file_path", str(context_out))
        so.add_session_config_entry("ep.context_embed_mode", "0")
    so.add_provider_for_devices(qnn_devices()[:1], {"backend_path": oq.get_qnn_htp_path(), "htp_arch": arch})
    return ort.InferenceSession(str(path), so)


def compile_in_subprocess(qdq: Path, arch: str, out: Path) -> dict:
    """Compile ``qdq`` for ``arch`` into ``out`` (an EP-context model) in a fresh process; returns its
    seconds and the process's peak RSS. A failed compile is a ModelError with the compiler's last line."""
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "instaflow_edge.convert.qnn", str(qdq), arch, str(out)]
    t = time.perf_counter()
    code, stdout, stderr = run_child(cmd)
    if code != 0 or not out.is_file():
        raise ModelError(f"the QNN HTP compiler failed on {qdq.parent.name} for v{arch}: {failure(code, stderr)}",
                         "rerun with --no-compile to keep the QDQ graphs, or report the graph")
    report = json.loads(stdout[-1])
    return {"seconds": round(time.perf_counter() - t, 2), "peak_rss_mib": report.get("peak_rss_mib")}


def _peak_rss_mib() -> float | None:
    """This process's own peak RSS (VmHWM: of its memory image since exec; getrusage's figure would
    include the parent's size at fork), or None where /proc is not."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def placement(qdq: Path, ctx: Path) -> dict:
    """What the compiled model ``ctx`` runs on the HTP and what it leaves on the CPU (see the module
    docstring), against the QDQ graph it was compiled from."""
    import onnx

    total = len(onnx.load(str(qdq), load_external_data=False).graph.node)
    g = onnx.load(str(ctx), load_external_data=False).graph
    inputs, outputs = {i.name for i in g.input}, {o.name for o in g.output}
    outside = []
    for n in g.node:
        if n.op_type == "EPContext":
            continue
        io = (n.op_type == "QuantizeLinear" and n.input[0] in inputs) or (n.op_type == "DequantizeLinear" and n.output[0] in outputs)
        outside.append({"node": n.name, "op": n.op_type,
                        "why": "float32 graph I/O conversion: on the CPU by design" if io else "not taken by the QNN provider"})
    on_cpu = len(outside)
    return {"ep_context_nodes": sum(n.op_type == "EPContext" for n in g.node), "qdq_nodes": total,
            "nodes_on_htp": total - on_cpu, "on_cpu": outside,
            "all_compute_on_htp": all(o["why"].startswith("float32") for o in outside)}


def _binary_bytes(ctx: Path) -> int:
    return sum(p.stat().st_size for p in ctx.parent.iterdir() if p.suffix == ".bin")


@target("qnn")
def export_qnn(cfg: ConvertConfig) -> dict:
    """Export ``cfg.model`` to a QNN folder at ``cfg.output``; returns the manifest (``parity`` and
    ``gates`` are the table to show). Every missed gate is raised at once, as one PsnrError."""
    from ..parity import check_all, check_conditioning, compare
    from ..quantize.onnx import CALIBRATION_PROMPTS

    require_qnn()
    src = reference.check_source(cfg)
    t0 = time.perf_counter()
    scheme = cfg.options.quantize.value
    record = get_scheme("qnn", scheme)
    archs = [] if cfg.options.no_compile else cfg.options.htp_arch
    pipe, sizes = reference.load_source(src, cfg.allow_pickle, cfg.height, cfg.width)
    if not pipe.info.one_step:
        raise InputError(f"{src} is a {pipe.info.default_steps}-step model: --target qnn ships the one-step generator",
                         "distill it to one step first (instaflow-edge train distill), or use --target onnx")
    names = list(qq.QNN_COMPONENTS)  # the encoder: image to image, as every target's
    source_manifest = read_manifest(src) or {}
    prompts = prompt_file(cfg.calibration_prompts, source_manifest.get("prompts") or CALIBRATION_PROMPTS, "calibration prompts")
    big = sum(p.numel() for p in pipe.unet.parameters()) > EMULATED_MAX_PARAMS
    timings: dict[str, float] = {}
    with atomic_dir(cfg.output, cfg.force, (cfg.model, cfg.calibration_prompts)) as tmp:
        scratch = tmp / ".fp32"  # the static fp32 export: the graphs prepared and the calibration pipeline
        ref = reference.compute(pipe, sizes, names, onnx_spec, fixed_size=True)
        for name in names:
            spec = dataclasses.replace(onnx_spec(name), dynamic=())  # static shapes: the HTP compiles one size
            t = time.perf_counter()
            log.info(f"{name}: exporting to ONNX (static shapes)")
            export_component(spec, spec.module(pipe), ref.components[name][0], scratch / name / onnx_io.MODEL_FILE, opset=17)
            timings[f"export_{name}"] = round(time.perf_counter() - t, 2)
        block = {**ref.facts.block(), "route": ROUTE, "quantize": scheme, "unet_timestep": UNET_TIMESTEP, "batch": 1,
                 "noise": "torch.randn(latent_shape, generator=torch.Generator('cpu').manual_seed(seed)), float32 "
                          "(torch_randn.mjs: the same stream)",
                 "same_image_as": "instaflow-edge generate EXPORT PROMPT --seed SEED --backend qnn"}
        copy_pipeline_files(src, scratch, names)
        for name in names:
            (tmp / name).mkdir()
        copy_pipeline_files(src, tmp, names)
        shutil.copy(Path(__file__).parent / "web_assets" / "torch_randn.mjs", tmp / "torch_randn.mjs")  # the noise recipe
        del pipe
        gc.collect()
        write_partial(scratch, block)  # calibration runs the fp32 pipeline
        calibration = Calibration(scratch, prompts, unet_timesteps=EDIT_TIMESTEPS)
        rewrites = {}
        for i, name in enumerate(names, 1):
            t = time.perf_counter()
            prepared = scratch / name / "prepared" / onnx_io.MODEL_FILE
            rewrites[name] = qq.prepare(scratch / name / onnx_io.MODEL_FILE, prepared)
            log.info(f"{name} ({i}/{len(names)}): {scheme}, calibrating on {len(prompts)} prompts")
            record.apply(prepared, tmp / name / onnx_io.MODEL_FILE, name, calibration, None)
            timings[f"quantize_{name}"] = round(time.perf_counter() - t, 2)
        onnx_io.check_folder(tmp)
        log.info(f"parity vs PyTorch ({scheme} QDQ on the CPU provider): {', '.join(names)}, end to end, conditioning")
        sessions = {n: onnx_io.session(tmp / n / onnx_io.MODEL_FILE) for n in names}
        rows = [compare(n, ref.output(n), sessions[n].run(None, ref.feed(n))[0]) for n in names]
        cond = ref.conditioning(lambda x, s=sessions["unet"]: s.run(None, ref.feed("unet", x))[0])
        rows.append(compare("end_to_end", ref.image, sample(session_calls({n: sessions[n] for n in ONE_STEP}), ref.ids,
                                                          ref.noise, ref.facts.scaling_factor, 1)))
        del sessions
        gates = {n: cfg.min_psnr if cfg.min_psnr is not None else record.gate_db for n in [*names, "end_to_end"]}
        check_all(rows, gates, fix="use --quantize w8a16, or lower the gate explicitly with --min-psnr")
        check_conditioning(cond)
        htp = {}
        for arch in archs:
            htp[arch] = {}
            for name in names:
                ctx = qrt.context_model(tmp, arch, name)
                log.info(f"{name}: compiling for HTP v{arch} ({HTP_ARCHS[arch]})")
                row = compile_in_subprocess(tmp / name / onnx_io.MODEL_FILE, arch, ctx)
                row.update(placement(tmp / name / onnx_io.MODEL_FILE, ctx), binary_bytes=_binary_bytes(ctx))
                sess = qnn_session(ctx, arch)  # loads back: the binary is one this provider reads
                if not big:  # the host's HTP emulation runs the compiled graph
                    row["htp_emulated"] = compare(name, ref.output(name), sess.run(None, ref.feed(name))[0]).as_dict()
                del sess
                htp[arch][name] = row
                timings[f"compile_v{arch}_{name}"] = row["seconds"]
        shutil.rmtree(scratch)
        manifest = make_manifest(
            qrt.KIND, cfg,
            source={"model": str(src), "content_sha256": source_manifest.get("content_sha256") or sha256_tree(src)},
            qnn={**block, "onnxruntime_qnn": _version("onnxruntime-qnn"), "rewrites": rewrites},
            quantize={"scheme": scheme, "engine": "onnxruntime (QNN QDQ config)", "components": names,
                      "calibration_prompts": len(prompts)},
            htp={"archs": htp, "compiled": bool(archs),
                 "load": "htp/vNN/<component>/model_ctx.onnx with the QNN provider (backend_path libQnnHtp.so)",
                 "htp_emulated": "the compiled graph run by the HTP backend's host emulation (x86-64), vs PyTorch fp32"
                                 if not big else "not run (a full-size UNet: the host emulation is too slow)"},
            gates=gates, parity=[p.as_dict() for p in rows], conditioning=cond.as_dict(),
            sizes={n: onnx_io.file_sizes(tmp / n) for n in names}, seconds={**timings, "total": round(time.perf_counter() - t0, 2)},
            **inherited_prompts(src),
        )
        write_manifest(tmp, manifest)
    return manifest


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _compile_main(argv: list[str]) -> int:
    """``python -m instaflow_edge.convert.qnn QDQ ARCH OUT``: compile one graph (the child process)."""
    qdq, arch, out = argv
    qnn_session(Path(qdq), arch, Path(out))
    print(json.dumps({"compiled": out, "peak_rss_mib": _peak_rss_mib()}))
    return 0


__all__ = ["QnnOptions", "export_qnn", "HTP_ARCHS", "placement"]

if __name__ == "__main__":
    sys.exit(_compile_main(sys.argv[1:]))
