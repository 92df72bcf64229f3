"""The QNN format: a ``convert --target qnn`` folder, for Snapdragon NPUs through ONNX Runtime's QNN provider.

Layout::

    text_encoder/model.onnx  unet/model.onnx  vae_decoder/model.onnx      the QDQ graphs (static shapes)
    vae_encoder/model.onnx                                               (image to image)
    htp/v73/unet/model_ctx.onnx + its *.bin ...                          EP-context models per HTP architecture
    tokenizer/  scheduler/  model_index.json  manifest.json

An app on a phone loads ``htp/vNN/<component>/model_ctx.onnx`` with the QNN provider
(``onnxruntime-android-qnn``): the graph was compiled for that Hexagon architecture on the host, so the
session starts without compiling. Here (no NPU), ``generate``/``eval``/``bench``/``report`` run the QDQ
graphs on ONNX Runtime's CPU provider: the same quantized arithmetic the HTP performs, up to its
kernels, and say so.
"""

from __future__ import annotations

from pathlib import Path

from ..artifacts import package_versions
from ..errors import DeviceError, ModelError
from . import onnx_io
from .base import ONE_STEP, Export, ExportFacts, RuntimeFormat
from .onnx import open_component
from .sampler import check_sampling, edit_calls, session_calls, tokenizer_for

KIND = "qnn-export"
HTP_DIR = "htp"
CTX_FILE = "model_ctx.onnx"


def facts_of(folder: Path, manifest: dict) -> ExportFacts:
    block = manifest.get("qnn")
    if not isinstance(block, dict):
        raise ModelError(f"{folder} has no QNN export manifest", "pass a folder written by `instaflow-edge convert --target qnn`")
    return ExportFacts.from_block(block, Path(folder) / "manifest.json", fixed_size=True)


def context_model(folder: Path, arch: str, component: str) -> Path:
    """Where the EP-context model of ``component`` compiled for HTP architecture ``arch`` lies."""
    return Path(folder) / HTP_DIR / f"v{arch}" / component / CTX_FILE


def label(manifest: dict) -> str:
    return f"qnn {(manifest.get('quantize') or {}).get('scheme') or '?'}"


def open_qnn(folder: Path, manifest: dict, *, steps: int | None = None, guidance: float = 1.0,
             threads: int | None = None, device: str = "cpu") -> Export:
    """Open a QNN export: its QDQ graphs on ONNX Runtime's CPU provider."""
    if device not in ("auto", "cpu"):
        raise DeviceError(f"--device {device} is not available with --backend qnn: here its QDQ graphs run on the CPU "
                          "(the compiled HTP graphs need a Snapdragon NPU)", "use --device cpu")
    facts = facts_of(folder, manifest)
    steps = steps or facts.default_steps
    check_sampling(facts, steps, guidance, "qnn")
    onnx_io.check_folder(folder)
    sessions = {n: open_component(folder, n, ["CPUExecutionProvider"], threads) for n in ONE_STEP}
    calls = session_calls(sessions)
    if "vae_encoder" in facts.components:  # image to image: opened on the first edit
        calls.update(edit_calls(lambda: open_component(folder, "vae_encoder", ["CPUExecutionProvider"], threads),
                                sessions["unet"], manifest["qnn"].get("unet_timestep")))
    q = manifest.get("quantize") or {}
    scheme = q.get("scheme") or "?"
    ver = package_versions(("onnxruntime",)).get("onnxruntime")
    archs = sorted((manifest.get("htp") or {}).get("archs") or {})
    ran = (f"QDQ {scheme} graphs on onnxruntime {ver} CPU provider (the HTP's integer arithmetic, up to its "
           f"kernels; the compiled HTP graphs{' for v' + ', v'.join(archs) if archs else ''} need a Snapdragon NPU)")
    sizes = {n: {"bytes": (manifest.get("sizes") or {}).get(n), "basis": "QDQ ONNX file bytes"} for n in ONE_STEP}
    return Export(folder=folder, format="qnn", label=label(manifest), facts=facts, steps=steps,
                  tokenize=tokenizer_for(folder), calls=calls, precision=scheme, ran=ran,
                  scheme=scheme, gates={k: float(v) for k, v in (manifest.get("gates") or {}).items()}, sizes=sizes,
                  # the CPU provider runs 16-bit QDQ by dequantizing to float; 8-bit activations run int8 kernels
                  stage_precisions={s: "int8" if scheme == "w8a8" else "fp32" for s in (*ONE_STEP, "end_to_end")}, max_batch=1,
                  device="cpu", runtime="onnxruntime", details={"quantize": q or None, "htp_archs": archs})


FORMAT = RuntimeFormat(
    name="qnn", kind=KIND, open=open_qnn, title="QNN", label=label, label_prefix="qnn ",
    description="Snapdragon NPU (ONNX Runtime's QNN provider): QDQ graphs and EP-context binaries per HTP architecture",
)
