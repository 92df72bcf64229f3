"""The runtimes a report compares: the PyTorch reference and each export, as three component calls.

Every runtime answers ``text_encoder(ids)``, ``unet(noise, hidden)`` (the one-step denoiser: the final
latents) and ``vae_decoder(latents ÷ scaling_factor)`` (an image in [-1, 1]) on numpy arrays, batch 1, so
per-component parity feeds each export the reference's own inputs and end-to-end parity chains the
export's own outputs.

Every export is opened by its own runtime through the format registry (``runtime.open_export``): ONNX
through onnxruntime, OpenVINO through OpenVINO, Core ML through ``MLModel.predict`` on macOS. A format
whose runtime cannot run on this machine is refused in one line, except where the report knows how to
stand in for it (``STAND_INS``): Core ML on Linux runs as the PyTorch modules exactly as the converter
compressed them (``quantize.coreml.compressed_pipeline``, the same compressor and example inputs,
computed in float32), and is labelled so.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Callable

from .. import runtime
from ..artifacts import read_manifest

COMPONENT_ORDER = ("text_encoder", "unet", "vae_decoder", "end_to_end")
# image to image, for the exports that can (their calls have vae_encoder and unet_at): the encoder on the
# starting images, and the edit end to end (prompt i edits the reference's image of prompt i + 1)
EDIT_ORDER = ("vae_encoder", "image_to_image")
EDIT_STRENGTH = 0.6


@dataclasses.dataclass
class Runtime:
    label: str
    kind: str                    # torch, or the export's format (runtime.names())
    how: str                     # how it ran, in words (shown in the report)
    folder: Path | None
    gates: dict[str, float]      # component (and end_to_end) -> min PSNR dB, from the export's manifest
    precision: str
    calls: dict[str, Callable]   # text_encoder / unet / vae_decoder on numpy arrays
    sizes: dict[str, dict]       # component -> {bytes, params, bits_per_weight, basis}
    scheme: str | None = None
    target_bits: float | None = None
    emulated: bool = False       # a stand-in computed these figures, not the format's runtime (STAND_INS)

    def info(self) -> dict:
        return {"kind": self.kind, "how": self.how, "folder": str(self.folder) if self.folder else None,
                "precision": self.precision, "scheme": self.scheme, "gates": self.gates, "sizes": self.sizes,
                "emulated": self.emulated,
                "total_bytes": sum(s["bytes"] for s in self.sizes.values() if s.get("bytes") is not None) or None}


def _torch_calls(pipe) -> dict[str, Callable]:
    import numpy as np
    import torch

    from ..components import COMPONENTS

    mods = {n: COMPONENTS[n].module(pipe) for n in ("text_encoder", "unet", "vae_decoder", "vae_encoder")}

    def wrap(m):
        def call(*xs):
            with torch.no_grad():
                return m(*(torch.from_numpy(np.ascontiguousarray(x)) for x in xs)).float().numpy()

        return call

    def unet_at(x, t, h):
        """The straight-path one-step graph the exports ship (convert/onnx.py: _OneStepUnet), in PyTorch:
        x·r(t), then one Euler step of size t/1000 at timestep t."""
        r = float(np.sqrt((1000.0 - t) ** 2 + t ** 2) / 1000.0)
        with torch.no_grad():
            xr = torch.from_numpy(np.ascontiguousarray(x)) * r
            tt = torch.full((xr.shape[0],), float(t))
            v = pipe.unet(xr, tt, encoder_hidden_states=torch.from_numpy(np.ascontiguousarray(h)), return_dict=False)[0]
            return (xr + v * (t / 1000.0)).float().numpy()

    return {**{n: wrap(m) for n, m in mods.items()}, "unet_at": unet_at}


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


def _from_export(label: str, export, params: dict[str, int]) -> Runtime:
    """A report runtime over an export opened by its own runtime."""
    sizes = {}
    for n in ("text_encoder", "unet", "vae_decoder"):
        sz = dict(export.sizes.get(n) or {})
        b, p = sz.get("bytes"), sz.get("params") or params[n]
        sizes[n] = {"bytes": b, "params": p, "basis": f"{sz.get('basis', 'file bytes')} ÷ parameters",
                    "bits_per_weight": sz.get("bits_per_weight") or (round(8 * b / p, 2) if b and p else None)}
    return Runtime(label, export.format, export.ran, export.folder, dict(export.gates), export.precision,
                   dict(export.calls), sizes, export.scheme, export.details.get("target_bits"))


def _coreml_stand_in(label: str, folder: Path, manifest: dict, pipe) -> Runtime:
    """Core ML where it cannot predict: the PyTorch modules as the converter compressed them (same
    compressor, same example inputs), computed in float32 — labelled so in the report."""
    from ..runtime import coreml as rc

    precision, scheme, bits = rc.describe(manifest)
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
    return Runtime(label, "coreml", how, folder, rc.gates(manifest), precision, _torch_calls(out), rc.sizes(manifest),
                   scheme, bits, emulated=True)


# formats the report can stand in for where their runtime cannot run here: name -> (label, folder, manifest, pipe) -> Runtime
STAND_INS = {"coreml": _coreml_stand_in}


def open_runtime(label: str, folder: Path, pipe, params: dict[str, int]) -> Runtime:
    """The export in ``folder`` run by its own runtime, or by its stand-in where that cannot run here."""
    m = read_manifest(folder) or {}
    fmt = runtime.get(runtime.format_of(folder, m))
    if fmt.open is not None and fmt.unavailable("cpu") and fmt.name in STAND_INS:
        return STAND_INS[fmt.name](label, folder, m, pipe)
    return _from_export(label, runtime.open_export(folder, manifest=m), params)


def open_exports(exports: list[str], pipe, params: dict[str, int]) -> list[Runtime]:
    """Each export folder (optionally ``LABEL=DIR``) as a :class:`Runtime`; labels made unique."""
    return [open_runtime(label, folder, pipe, params) for label, folder in runtime.parse_exports(exports).items()]
