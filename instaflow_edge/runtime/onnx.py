"""The ONNX format: an export folder (``convert --target onnx`` / ``quantize``) run with onnxruntime.

One-step models run text encoder → one-step UNet (UNet at τ = 1000 + Euler step) → VAE decoder;
multi-step rectified flows run the exported velocity UNet (``unet_velocity``) with the Euler rule of
``flow.py`` (``runtime/sampler.py``). The folder is checked (manifest, external-data paths, every model
loads and has its component's inputs and outputs) before the first image.
"""

from __future__ import annotations

from pathlib import Path

from ..artifacts import package_versions, read_manifest, write_manifest
from ..errors import DeviceError, ModelError
from . import onnx_io
from .base import ONE_STEP, Export, ExportFacts, RuntimeFormat
from .sampler import check_io, check_sampling, edit_calls, sample, session_calls, tokenizer_for

KIND = "onnx-export"
# the manifest a half-built export carries while convert/quantize calibrate on it (its facts only)
PARTIAL_KIND = "onnx-export-partial"


def write_partial(folder: Path, block: dict) -> None:
    """Record the runtime facts in a half-built export, so calibration can run its fp32 pipeline."""
    write_manifest(folder, {"kind": PARTIAL_KIND, "onnx": block})


def export_facts(folder: Path, manifest: dict | None = None) -> ExportFacts:
    """The runtime facts of an ONNX export folder (written by convert into the manifest's ``onnx`` block)."""
    folder = Path(folder)
    m = manifest if manifest is not None else (read_manifest(folder) or {})
    block = m.get("onnx")
    if not isinstance(block, dict) or "latent_shape" not in block:
        raise ModelError(f"{folder} has no ONNX export manifest", "pass a folder written by `instaflow-edge convert --target onnx`")
    return ExportFacts.from_block(block, folder / "manifest.json", unet_config=folder / "unet" / "config.json")


def open_component(folder: Path, name: str, providers: list[str] | None = None, threads: int | None = None):
    """An onnxruntime session for component ``name`` of an export folder, after checking that its graph's
    inputs and outputs are the component's spec."""
    path = Path(folder) / name / onnx_io.MODEL_FILE
    sess = onnx_io.session(path, threads=threads, providers=providers)
    check_io(sess, name, path)
    return sess


def one_step_calls(folder: Path, names=ONE_STEP, threads: int | None = None, providers: list[str] | None = None) -> dict:
    """The component calls of the export in ``folder`` (its sessions checked against their specs)."""
    return session_calls({n: open_component(folder, n, providers, threads) for n in names})


def run_one_step(folder: Path, input_ids, noise, facts: ExportFacts):
    """Text encoder → one-step UNet → VAE decoder through onnxruntime; image in [0, 1]."""
    return sample(one_step_calls(folder), input_ids, noise, facts.scaling_factor, 1)


def tokenize(folder: Path, prompts: list[str]):
    return tokenizer_for(folder)(prompts)


def unavailable(device: str) -> str | None:
    if device == "cuda":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            return "onnxruntime has no CUDAExecutionProvider here (install onnxruntime-gpu)"
    return None


def extras(folder: Path, manifest: dict, threads: int | None = None, device: str = "cpu") -> dict:
    """The fused generator (``generator/model.onnx``) as a whole-image run, where it carries the export's
    precision (schemes leave it fp32)."""
    q = manifest.get("quantize") or {}
    path = Path(folder) / "generator" / onnx_io.MODEL_FILE
    if not path.is_file() or (q.get("scheme") and "generator" not in (q.get("components") or [])):
        return {}

    def open_fused():
        gen = onnx_io.session(path, threads=threads, providers=_providers(device))
        return lambda ids, noise: gen.run(None, {"input_ids": ids, "noise": noise})[0]

    return {"fused": open_fused}


def _providers(device: str) -> list[str]:
    if device not in ("auto", "cpu", "cuda"):
        raise DeviceError(f"--device {device} is not available with --backend onnx", "use --device cpu or cuda")
    if device != "cuda":
        return ["CPUExecutionProvider"]
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise DeviceError("--device cuda was asked for but onnxruntime has no CUDAExecutionProvider here",
                          "install onnxruntime-gpu, or use --device cpu")
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


def stage_precisions(scheme: str | None, quantized: list[str]) -> dict[str, str]:
    """The arithmetic each stage runs in: int8 for components an int8 scheme quantized (int8-dynamic's
    MatMuls too), fp16 for fp16 ones, fp32 otherwise."""
    prec = "int8" if scheme and scheme.startswith("int8") else ("fp16" if scheme == "fp16" else None)
    out = {s: (prec if prec and s in quantized else "fp32") for s in ONE_STEP}
    out["end_to_end"] = out["generator"] = out["unet"]
    return out


def open_onnx(folder: Path, manifest: dict, *, steps: int | None = None, guidance: float = 1.0,
              threads: int | None = None, device: str = "cpu") -> Export:
    """Open an ONNX export folder (``runtime.open_export`` calls this for its kind)."""
    providers = _providers(device)
    facts = export_facts(folder, manifest)
    steps = steps or facts.default_steps
    check_sampling(facts, steps, guidance, "onnx")
    onnx_io.check_folder(folder)
    names = list(ONE_STEP) + (["unet_velocity"] if steps > 1 else [])
    sessions = {n: open_component(folder, n, providers, threads) for n in names}
    calls = session_calls(sessions)
    if "vae_encoder" in facts.components:  # image-to-image: opened on the first edit
        calls.update(edit_calls(lambda: open_component(folder, "vae_encoder", providers, threads), sessions["unet"],
                                (manifest.get("onnx") or {}).get("unet_timestep")))
    q = manifest.get("quantize") or {}
    scheme = q.get("scheme")
    comps = list(q.get("components") or [])
    where = providers[0].removesuffix("ExecutionProvider")
    ran = f"onnxruntime {package_versions(('onnxruntime',)).get('onnxruntime')} {where} provider" + \
        (f"; {scheme} on {', '.join(comps)}" if scheme else "; fp32")
    sizes = {n: {"bytes": (manifest.get("sizes") or {}).get(n), "basis": "ONNX file bytes"} for n in ONE_STEP}
    return Export(folder=folder, format="onnx", label=label(manifest), facts=facts, steps=steps,
                  tokenize=tokenizer_for(folder), calls=calls, precision=scheme or "fp32", ran=ran,
                  scheme=scheme, gates={k: float(v) for k, v in (manifest.get("gates") or {}).items()}, sizes=sizes,
                  stage_precisions=stage_precisions(scheme, comps),
                  device=where.lower(), runtime="onnxruntime", details={"quantize": q or None})


def label(manifest: dict) -> str:
    return f"ort {((manifest.get('quantize') or {}).get('scheme')) or 'fp32'}"


FORMAT = RuntimeFormat(
    name="onnx", kind=KIND, open=open_onnx, title="ONNX", label=label, label_prefix="ort ", unavailable=unavailable, extras=extras,
    description="ONNX Runtime: text_encoder/, unet/, vae_decoder/ model.onnx in optimum's layout",
)
