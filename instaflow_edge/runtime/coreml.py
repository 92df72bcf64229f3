"""The Core ML format: a ``convert --target coreml`` folder run with Core ML (macOS only).

The one-step path an app runs, in Python: tokenize (CLIP BPE from ``vocab.json``/``merges.txt``), then

* ``--layout native``: ``TextEncoder`` → ``Unet`` (x = z + v(z, τ=1000, text); no scheduler, no
  guidance) → ÷ scaling_factor → ``VAEDecoder`` → image;
* ``--layout apple``: what Apple's Swift pipeline does with DPM-Solver++ at one step: hidden states
  transposed to (1, C, 1, 77), ``Unet`` at timestep 999 → x0 = (x − σ·noise_pred)/α (α, σ from the
  manifest) → ÷ 0.18215 → ``VAEDecoder`` → image.

Core ML prediction exists only on macOS; elsewhere this fails in one line.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from ..artifacts import read_manifest
from ..errors import DeviceError, InputError, ModelError, require
from ..tokenizer import BOS, EOS
from .base import ONE_STEP, Export, ExportFacts, RuntimeFormat

KIND = "coreml"
PACKAGES = ("TextEncoder", "Unet", "VAEDecoder")


def unavailable(device: str = "cpu") -> str | None:
    return None if sys.platform == "darwin" else f"Core ML prediction needs macOS (this machine runs {sys.platform})"


def check_platform() -> None:
    why = unavailable()
    if why:
        raise DeviceError(why, "run --backend coreml on a Mac, or use --backend torch/onnx here")


def export_facts(folder: Path, manifest: dict) -> ExportFacts:
    """The runtime facts of a Core ML export: enumerated image sizes (the first is the default), the latent
    channels and VAE factor; one step. ``scaling_factor`` is recorded by convert (older exports: 1.0 here,
    read from the VAEDecoder package's metadata when it is opened)."""
    where = Path(folder) / "manifest.json"
    latent = manifest.get("latent")
    sizes = manifest.get("image_sizes")
    if not isinstance(latent, dict) or not isinstance(sizes, list) or not sizes:
        raise InputError(f"{folder} was converted by an older instaflow-edge (its manifest has no latent shape)",
                         "re-run `instaflow-edge convert --target coreml`")
    try:
        f, c = int(latent["vae_scale_factor"]), int(latent["channels"])
        sizes = tuple((int(h), int(w)) for h, w in sizes)
        sf = float(latent.get("scaling_factor") or (manifest.get("scheduler") or {}).get("model_scaling_factor") or 1.0)
    except (KeyError, TypeError, ValueError) as e:
        raise ModelError(f"{where}: latent/image_sizes are not numbers ({e})", "restore the manifest, or re-export the model") from e
    h, w = sizes[0]
    block = {"latent_shape": [c, h // f, w // f], "height": h, "width": w, "scaling_factor": sf,
             "flow": (manifest.get("model") or {}).get("flow") or "rectified_flow", "default_steps": 1,
             "size_multiple": f, "components": list(ONE_STEP)}
    facts = ExportFacts.from_block(block, where, fixed_size=True)
    return dataclasses.replace(facts, sizes=sizes)


def load_folder(folder: str | Path, manifest: dict | None = None) -> dict:
    """The export's manifest (read here unless given), after checking the folder holds a Core ML export."""
    folder = Path(folder)
    if manifest is None:
        manifest = read_manifest(folder) if folder.is_dir() else None
    if (manifest or {}).get("kind") != KIND:
        raise InputError(f"{folder} is not a Core ML export (no manifest.json of kind 'coreml')",
                         "pass a folder made by `instaflow-edge convert coreml MODEL -o OUT`")
    for name in PACKAGES:
        if not (folder / f"{name}.mlpackage").is_dir():
            raise InputError(f"{folder / (name + '.mlpackage')} is missing", "re-run the conversion")
    return manifest


def tokenizer_for(folder: Path):
    """Apple's tokenizer files (``vocab.json``, ``merges.txt``) as a ``prompts -> ids`` function."""
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer(str(Path(folder) / "vocab.json"), str(Path(folder) / "merges.txt"), model_max_length=77,
                        bos_token=BOS, eos_token=EOS, pad_token=EOS, unk_token=EOS)
    return lambda prompts: tok(prompts, padding="max_length", max_length=77, truncation=True,
                               return_tensors="np").input_ids.astype("int64")


def predict_calls(folder: Path, manifest: dict, facts: ExportFacts) -> tuple[dict, float]:  # pragma: no cover - macOS only
    """The packages as component calls through ``MLModel.predict``, and the scaling factor the decoder
    call's input is divided by. ``--layout apple``: what Apple's Swift pipeline does with DPM-Solver++
    at one step (x0 = (x − σ·ε)/α; the decoder takes latents ÷ 0.18215 and folds the model's own factor in)."""
    import numpy as np

    ct = require("coremltools", "coreml")
    te, unet, vae = (ct.models.MLModel(str(Path(folder) / f"{n}.mlpackage"), compute_units=ct.ComputeUnit.ALL)
                     for n in PACKAGES)
    apple = manifest.get("layout") == "apple"
    sch = manifest.get("scheduler") or {}
    sf = facts.scaling_factor
    if not apple and "scaling_factor" not in (manifest.get("latent") or {}):
        sf = float(vae.user_defined_metadata["scaling_factor"])

    def text_encoder(ids):
        return te.predict({"input_ids": np.asarray(ids).astype(np.float32)})["last_hidden_state"]

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
        return vae.predict({"z": (x * np.float32(sf) / np.float32(sch["decoder_scale_factor"])).astype(np.float32)})["image"]

    return {"text_encoder": text_encoder, "unet": denoise, "vae_decoder": decode}, sf


def describe(manifest: dict) -> tuple[str, str | None, float | None]:
    """``(precision, compression, target bits)`` of a Core ML export, from its manifest."""
    cfg = manifest.get("config") or {}
    cfg = cfg.get("options") or cfg  # exports made before the per-target options kept them flat
    return cfg.get("precision") or "fp16", cfg.get("compress"), cfg.get("target_bits")


def label(manifest: dict) -> str:
    precision, comp, bits = describe(manifest)
    if comp == "mixed-bit" and bits:
        comp = f"mixed-bit {bits:g}"
    return f"coreml {comp or precision}"


def gates(manifest: dict) -> dict[str, float]:
    gate = (manifest.get("gate") or {}).get("min_psnr")
    return {k: float(gate) for k in (*ONE_STEP, "end_to_end")} if gate is not None else {}


def sizes(manifest: dict) -> dict[str, dict]:
    out = {}
    for n in ONE_STEP:
        c = (manifest.get("components") or {}).get(n) or {}
        p, wb = c.get("params"), c.get("weight_bytes")
        out[n] = {"bytes": c.get("size_bytes"), "params": p,
                  "bits_per_weight": round(8 * wb / p, 2) if wb and p else None, "basis": "package weight bytes ÷ parameters"}
    return out


def open_coreml(folder: Path, manifest: dict, *, steps: int | None = None, guidance: float = 1.0,
                threads: int | None = None, device: str = "cpu") -> Export:  # pragma: no cover - macOS only
    """Open a Core ML export on macOS (``runtime.open_export`` refuses elsewhere, before this runs)."""
    check_platform()
    manifest = load_folder(folder, manifest)
    if (steps or 1) != 1 or guidance > 1.0:
        raise InputError("the Core ML export is the one-step generator: no --steps > 1, no --guidance > 1",
                         "drop --steps/--guidance, or use --backend torch for N-step sampling")
    facts = export_facts(folder, manifest)
    calls, sf = predict_calls(folder, manifest, facts)
    facts = dataclasses.replace(facts, scaling_factor=sf)
    precision, comp, bits = describe(manifest)
    p = {"fp16": "fp16", "fp32": "fp32"}.get(precision, precision)
    return Export(folder=folder, format="coreml", label=label(manifest), facts=facts, steps=1,
                  tokenize=tokenizer_for(folder), calls=calls, precision=precision + (f"+{comp}" if comp else ""),
                  ran=f"Core ML predict ({precision}{', ' + comp if comp else ''})", scheme=comp, gates=gates(manifest),
                  sizes=sizes(manifest), stage_precisions={s: p for s in (*ONE_STEP, "end_to_end", "generator")}, max_batch=1, device="coreml", runtime="Core ML",
                  details={"target_bits": bits})


FORMAT = RuntimeFormat(
    name="coreml", kind=KIND, open=open_coreml, title="Core ML", label=label, unavailable=unavailable,
    source=lambda manifest: {"model": (manifest.get("model") or {}).get("source"),
                             "content_sha256": (manifest.get("model") or {}).get("content_sha256")},
    description="Core ML packages (TextEncoder, Unet, VAEDecoder .mlpackage) for Apple's Swift pipeline or ours",
)
