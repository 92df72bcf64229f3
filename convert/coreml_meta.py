"""What a Core ML package says about itself: component names, input/output descriptions, license and metadata.

Xcode shows these in the model's preview; Apple's Swift pipeline finds components by the file names in ``NAMES``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..artifacts import package_versions
from . import coreml_apple as apple
from .config import CoreMLLayout

NAMES = {"text_encoder": "TextEncoder", "unet": "Unet", "vae_decoder": "VAEDecoder", "vae_encoder": "VAEEncoder",
         "generator": "Generator"}
DESCRIPTIONS = {
    "input_ids": "CLIP token ids (batch, 77) as float32: <|startoftext|>, the prompt's tokens, <|endoftext|>, padded with <|endoftext|>",
    "last_hidden_state": "CLIP text encoder last hidden states (batch, 77, hidden): the UNet's encoder_hidden_states",
    "sample": "N(0, 1) noise latents z (batch, 4, H/8, W/8)",
    "encoder_hidden_states": "the TextEncoder's last_hidden_state",
    "out_sample": "final latents x = z + v(z, τ=1000, text): one Euler step of the rectified flow (no guidance)",
    "latent_sample": "the Unet's out_sample divided by the VAE scaling_factor",
    "noise": "N(0, 1) noise latents z (batch, 4, H/8, W/8)",
    "image": "RGB image in [0, 1], (batch, 3, H, W)",
}
DESCRIPTIONS_OUT = {("vae_decoder", "sample"): "RGB image in [-1, 1], (batch, 3, H, W): map with x/2 + 0.5"}


def describe(ml, config, name: str, spec, pipe) -> None:
    """Set author, license, version, descriptions and our metadata on a converted package (in place)."""

    v = package_versions()
    ml.author = "instaflow-edge"
    ml.license = source_license(config.model)
    ml.version = v.get("instaflow-edge") or ""
    is_apple = config.options.layout is CoreMLLayout.apple and name != "generator"
    ml.short_description = apple.SHORT[name] if is_apple else {
        "text_encoder": "CLIP text encoder of a one-step InstaFlow generator",
        "unet": "One-step rectified-flow denoiser: x = z + v(z, τ=1000, text) (UNet plus one Euler step)",
        "vae_decoder": "VAE decoder: latents ÷ scaling_factor → image",
        "generator": "Fused one-step generator: token ids + noise → image",
    }[name]
    for t in spec.inputs:
        ml.input_description[t.name] = apple.DESCRIPTIONS[name][t.name] if is_apple else DESCRIPTIONS[t.name]
    for t in spec.outputs:
        ml.output_description[t.name] = (apple.DESCRIPTIONS[name][t.name] if is_apple else
                                         DESCRIPTIONS_OUT.get((name, t.name)) or DESCRIPTIONS[t.name])
    meta = {
        "source": config.model, "component": name, "flow": pipe.info.flow, "timestep": "1000",
        "scaling_factor": str(pipe.scaling_factor), "min_target": config.options.min_target.value,
        "precision": config.options.precision.value, "attention": config.options.attention.value,
        "compression": config.options.compress.value if config.options.compress else "none", "target_bits": "" if config.options.target_bits is None else str(config.options.target_bits),
        "layout": config.options.layout.value,
        **{f"version.{k}": str(val) for k, val in v.items() if val},
    }
    if config.options.layout is CoreMLLayout.apple:
        meta.update({"scheduler": apple.SCHEDULER, "step_count": str(apple.STEP_COUNT),
                     "timestep": str(apple.ONE_STEP["timestep"]), "velocity_timestep": "1000",
                     "alpha": repr(float(apple.ONE_STEP["alpha"])), "sigma": repr(float(apple.ONE_STEP["sigma"])),
                     "decoder_scale_factor": repr(float(apple.DECODER_SCALE_FACTOR))})
    ml.user_defined_metadata.update(meta)


def source_license(model: str) -> str:
    """The source's license: its manifest's ``license`` or its model card's front matter; else unspecified."""
    folder = Path(model)
    if folder.is_dir():
        man = folder / "manifest.json"
        if man.is_file():
            lic = json.loads(man.read_text()).get("license")
            if lic:
                return str(lic)
        card = folder / "README.md"
        if card.is_file():
            m = re.search(r"^license:\s*(\S+)", card.read_text(errors="replace")[:4000], re.M)
            if m:
                return m.group(1)
    return "unspecified (see the source model's card)"
