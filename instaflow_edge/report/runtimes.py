"""The runtimes a report compares: the PyTorch reference and each export, as three component calls.

Every runtime answers ``text_encoder(ids)``, ``unet(noise, hidden)`` (the one-step denoiser: the final
latents) and ``vae_decoder(latents ÷ scaling_factor)`` (an image in [-1, 1]) on numpy arrays, batch 1, so
per-component parity feeds each export the reference's own inputs and end-to-end parity chains the
export's own outputs.

- ONNX exports run through onnxruntime (CPU provider), any scheme.
- Core ML exports run through ``MLModel.predict`` on macOS. On Linux (no Core ML there) they run as the
  PyTorch modules exactly as the converter compressed them (``quantize.coreml.compressed_pipeline``, the
  same compressor and example inputs, computed in float32), and are labelled so.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Callable

from ..artifacts import read_manifest
from ..bench.latency import export_kind, export_label
from ..errors import InputError

COMPONENT_ORDER = ("text_encoder", "unet", "vae_decoder", "end_to_end")


@dataclasses.dataclass
class Runtime:
    label: str
    kind: str                    # torch | onnx | coreml
    how: str                     # how it ran, in words (shown in the report)
    folder: Path | None
    gates: dict[str, float]      # component (and end_to_end) -> min PSNR dB, from the export's manifest
    precision: str
    calls: dict[str, Callable]   # text_encoder / unet / vae_decoder on numpy arrays
    sizes: dict[str, dict]       # component -> {bytes, params, bits_per_weight, basis}
    scheme: str | None = None
    target_bits: float | None = None

    def info(self) -> dict:
        return {"kind": self.kind, "how": self.how, "folder": str(self.folder) if self.folder else None,
                "precision": self.precision, "scheme": self.scheme, "gates": self.gates, "sizes": self.sizes,
                "total_bytes": sum(s["bytes"] for s in self.sizes.values() if s.get("bytes") is not None) or None}


def _torch_calls(pipe) -> dict[str, Callable]:
    import numpy as np
    import torch

    from ..components import COMPONENTS

    mods = {n: COMPONENTS[n].module(pipe) for n in ("text_encoder", "unet", "vae_decoder")}

    def wrap(m):
        def call(*xs):
            with torch.no_grad():
                return m(*(torch.from_numpy(np.ascontiguousarray(x)) for x in xs)).float().numpy()

        return call

    return {n: wrap(m) for n, m in mods.items()}


def used_params(pipe) -> dict[str, int]:
    """Parameters each component's forward pass touches (the VAE decoder component holds the whole VAE)."""
    from ..components import COMPONENTS, Sizes
    from ..convert.coreml import used_parameters

    sizes = Sizes.of(pipe, batch=1)
    return {n: used_parameters(COMPONENTS[n].module(pipe), COMPONENTS[n].example_inputs(pipe, sizes))
            for n in ("text_encoder", "unet", "vae_decoder")}


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def reference(model: str, pipe, params: dict[str, int]) -> Runtime:
    folder = Path(model)
    dirs = {"text_encoder": "text_encoder", "unet": "unet", "vae_decoder": "vae"}
    sizes = {}
    for n, d in dirs.items():
        b = _folder_bytes(folder / d) if (folder / d).is_dir() else None
        sizes[n] = {"bytes": b, "params": params[n], "bits_per_weight": 32.0, "basis": "float32 weights"}
    return Runtime("torch fp32 (reference)", "torch", "PyTorch float32 on the CPU (the reference)", None, {}, "fp32",
                   _torch_calls(pipe), sizes)


def _onnx(label: str, folder: Path, params: dict[str, int]) -> Runtime:
    import numpy as np

    from ..artifacts import package_versions
    from ..runtime.onnx import export_meta, open_component, unet_feed

    m = read_manifest(folder) or {}
    export_meta(folder)
    sess = {n: open_component(folder, n) for n in ("text_encoder", "unet", "vae_decoder")}
    q = m.get("quantize") or {}
    sizes = {}
    for n in sess:
        b = (m.get("sizes") or {}).get(n)
        sizes[n] = {"bytes": b, "params": params[n], "bits_per_weight": round(8 * b / params[n], 2) if b and params[n] else None,
                    "basis": "ONNX file bytes ÷ parameters"}
    calls = {
        "text_encoder": lambda ids: sess["text_encoder"].run(None, {"input_ids": ids.astype(np.int64)})[0],
        "unet": lambda z, h: sess["unet"].run(None, unet_feed(sess["unet"], z.astype(np.float32), h.astype(np.float32)))[0],
        "vae_decoder": lambda x: sess["vae_decoder"].run(None, {"latent_sample": x.astype(np.float32)})[0],
    }
    scheme = q.get("scheme")
    comps = ", ".join(q.get("components") or [])
    how = f"onnxruntime {package_versions(('onnxruntime',)).get('onnxruntime')} CPU provider" + \
        (f"; {scheme} on {comps}" if scheme else "; fp32")
    return Runtime(label, "onnx", how, folder, {k: float(v) for k, v in (m.get("gates") or {}).items()},
                   scheme or "fp32", calls, sizes, scheme)


def _coreml(label: str, folder: Path, pipe) -> Runtime:
    m = read_manifest(folder) or {}
    cfg = m.get("config") or {}
    comps = m.get("components") or {}
    gate = (m.get("gate") or {}).get("min_psnr")
    gates = {k: float(gate) for k in COMPONENT_ORDER} if gate is not None else {}
    sizes = {}
    for n in ("text_encoder", "unet", "vae_decoder"):
        c = comps.get(n) or {}
        p, wb = c.get("params"), c.get("weight_bytes")
        sizes[n] = {"bytes": c.get("size_bytes"), "params": p,
                    "bits_per_weight": round(8 * wb / p, 2) if wb and p else None, "basis": "package weight bytes ÷ parameters"}
    scheme, bits, precision = cfg.get("compress"), cfg.get("target_bits"), cfg.get("precision") or "fp16"
    if sys.platform == "darwin":  # pragma: no cover - macOS only
        calls, how = _coreml_predict(folder, m), f"Core ML predict ({precision}{', ' + scheme if scheme else ''})"
    else:
        calls, how = _coreml_as_pytorch(pipe, scheme, bits, precision)
    return Runtime(label, "coreml", how, folder, gates, precision, calls, sizes, scheme, bits)


def _coreml_as_pytorch(pipe, scheme: str | None, bits: float | None, precision: str) -> tuple[dict, str]:
    """Linux: the PyTorch modules as the converter compressed them (same compressor, same example inputs)."""
    if scheme:
        from ..errors import require
        from ..quantize.coreml import compressed_pipeline

        require("coremltools", "coreml")  # its import-time chatter silenced

        out, _ = compressed_pipeline(pipe, scheme, bits)
        what = f"compressed with {scheme}{f' at {bits:g} bits' if bits else ''} exactly as converted"
    else:
        out, what = pipe, "uncompressed"
    how = (f"PyTorch modules {what}, float32 compute — Core ML cannot predict on {sys.platform}; "
           f"the package's {precision} arithmetic is not simulated")
    return _torch_calls(out), how


def _coreml_predict(folder: Path, m: dict) -> dict:  # pragma: no cover - macOS only
    import numpy as np

    from ..errors import require
    from ..runtime.coreml import PACKAGES

    ct = require("coremltools", "coreml")
    te, unet, vae = (ct.models.MLModel(str(folder / f"{n}.mlpackage")) for n in PACKAGES)
    apple = m.get("layout") == "apple"
    sch = m.get("scheduler") or {}
    model_sf = float(sch.get("model_scaling_factor") or 1.0)

    def text_encoder(ids):
        return te.predict({"input_ids": ids.astype(np.float32)})["last_hidden_state"]

    def denoise(z, h):
        if not apple:
            return unet.predict({"sample": z, "encoder_hidden_states": h})["out_sample"]
        states = np.ascontiguousarray(h.transpose(0, 2, 1)[:, :, None, :], dtype=np.float32)
        eps = unet.predict({"sample": z, "timestep": np.array([int(sch["timestep"])], np.float32),
                            "encoder_hidden_states": states})["noise_pred"].astype(np.float32)
        return (z - eps * np.float32(sch["sigma"])) / np.float32(sch["alpha"])

    def decode(x):  # x: latents ÷ the model's scaling factor
        if not apple:
            return vae.predict({"latent_sample": x})["sample"]
        # Apple's decoder takes latents ÷ 0.18215 and folds the model's own factor in
        return vae.predict({"z": (x * model_sf / np.float32(sch["decoder_scale_factor"])).astype(np.float32)})["image"]

    return {"text_encoder": text_encoder, "unet": denoise, "vae_decoder": decode}


def open_exports(exports: list[str], pipe, params: dict[str, int]) -> list[Runtime]:
    """Each export folder (optionally ``LABEL=DIR``) as a :class:`Runtime`; labels made unique."""
    out: list[Runtime] = []
    seen: set[str] = set()
    for item in exports:
        label, sep, d = str(item).partition("=")
        use_label = bool(sep) and not Path(item).exists()
        folder = Path(d if use_label else item)
        if not folder.is_dir():
            raise InputError(f"export {item}: no such folder", "pass an export folder (or LABEL=DIR)")
        kind = export_kind(folder)
        name = label if use_label else export_label(folder)
        if kind == "onnx" and not name.startswith("ort "):
            name = f"ort {name}"
        if name in seen:
            name = f"{name} ({folder.name})"
        if name in seen:
            raise InputError(f"export {folder} is given twice", "pass each export once")
        seen.add(name)
        out.append(_onnx(name, folder, params) if kind == "onnx" else _coreml(name, folder, pipe))
    return out
