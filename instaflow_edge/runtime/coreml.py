"""``generate --backend coreml``: run a ``convert --target coreml`` folder with Core ML (macOS only).

The one-step path an app runs, in Python: tokenize (CLIP BPE from ``vocab.json``/``merges.txt``), then

* ``--layout native``: ``TextEncoder`` → ``Unet`` (x = z + v(z, τ=1000, text); no scheduler, no
  guidance) → ÷ scaling_factor → ``VAEDecoder`` → image;
* ``--layout apple``: what Apple's Swift pipeline does with DPM-Solver++ at one step: hidden states
  transposed to (1, C, 1, 77), ``Unet`` at timestep 999 → x0 = (x − σ·noise_pred)/α (α, σ from the
  manifest) → ÷ 0.18215 → ``VAEDecoder`` → image.

Core ML prediction exists only on macOS; elsewhere this fails in one line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import DeviceError, InputError, require
from ..tokenizer import BOS, EOS

PACKAGES = ("TextEncoder", "Unet", "VAEDecoder")


def check_platform() -> None:
    if sys.platform != "darwin":
        raise DeviceError(f"Core ML prediction needs macOS (this machine runs {sys.platform})",
                          "run --backend coreml on a Mac, or use --backend torch/onnx here")


def load_folder(folder: str | Path) -> dict:
    """The export's manifest, after checking the folder holds a Core ML export."""
    folder = Path(folder)
    man = folder / "manifest.json"
    if not man.is_file() or json.loads(man.read_text()).get("kind") != "coreml":
        raise InputError(f"{folder} is not a Core ML export (no manifest.json of kind 'coreml')",
                         "pass a folder made by `instaflow-edge convert MODEL --target coreml -o OUT`")
    for name in PACKAGES:
        if not (folder / f"{name}.mlpackage").is_dir():
            raise InputError(f"{folder / (name + '.mlpackage')} is missing", "re-run the conversion")
    return json.loads(man.read_text())


def coreml_backend(config, info: dict):
    """``load(config, info) -> render(job)`` for ``generate.BACKENDS``."""
    check_platform()

    ct = require("coremltools", "coreml")
    import numpy as np

    from ..generator import make_noise

    folder = Path(config.model)
    manifest = load_folder(folder)
    if (config.steps or 1) != 1 or config.guidance > 1.0:
        raise InputError("the Core ML export is the one-step generator: no --steps > 1, no --guidance > 1",
                         "drop --steps/--guidance, or use --backend torch for N-step sampling")
    sizes = [tuple(s) for s in manifest["image_sizes"]]
    h, w = config.height or sizes[0][0], config.width or sizes[0][1]
    if (h, w) not in sizes:
        raise InputError(f"the Core ML models accept image sizes {sizes}, not {h}x{w}",
                         "pass one of them, or re-convert with --sizes")
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77,
                        bos_token=BOS, eos_token=EOS, pad_token=EOS, unk_token=EOS)
    units = ct.ComputeUnit.ALL
    te, unet, vae = (ct.models.MLModel(str(folder / f"{n}.mlpackage"), compute_units=units) for n in PACKAGES)
    apple = manifest.get("layout") == "apple"
    if apple:
        sch = manifest["scheduler"]
        t, alpha, sigma = int(sch["timestep"]), np.float32(sch["alpha"]), np.float32(sch["sigma"])
        sf = np.float32(sch["decoder_scale_factor"])
    else:
        sf = float(vae.user_defined_metadata["scaling_factor"])
    latent = manifest.get("latent")
    if not isinstance(latent, dict):
        raise InputError(f"{folder} was converted by an older instaflow-edge (its manifest has no latent shape)",
                         "re-run `instaflow-edge convert --target coreml`")
    f = int(latent["vae_scale_factor"])
    shape = (int(latent["channels"]), h // f, w // f)
    info.update(steps=1, height=h, width=w, flow="rectified_flow", device="coreml", dtype=manifest["config"]["precision"])

    def render(job):
        ids = tok([job.prompt], padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids
        hidden = te.predict({"input_ids": ids.astype(np.float32)})["last_hidden_state"]
        noise = make_noise([job.seed], shape).numpy()
        if apple:
            states = np.ascontiguousarray(hidden.transpose(0, 2, 1)[:, :, None, :], dtype=np.float32)
            eps = unet.predict({"sample": noise, "timestep": np.array([t], dtype=np.float32),
                                "encoder_hidden_states": states})["noise_pred"].astype(np.float32)
            x0 = (noise - eps * sigma) / alpha
            image = vae.predict({"z": (x0 / sf).astype(np.float32)})["image"]
        else:
            latents = unet.predict({"sample": noise, "encoder_hidden_states": hidden})["out_sample"]
            image = vae.predict({"latent_sample": latents / sf})["sample"]
        image = np.clip(image[0] / 2 + 0.5, 0, 1).transpose(1, 2, 0)
        return (image * 255).round().astype("uint8")

    return render
