"""``Calibration``: the inputs a calibrated scheme is fitted on, and every disk hand-off that needs.

A calibration is the fp32 export in ``folder`` (its runtime facts in the manifest, full or partial), the
prompts and a seed: :meth:`Calibration.feeds` runs that fp32 pipeline upstream of a component and gives
one input dict per prompt; :meth:`Calibration.ranges_in_subprocess` runs onnxruntime's calibrator on a
component's model in a fresh process (``quantize.onnx_calibrate``: the calibrator's memory is freed with
it) and leaves the ranges in a cache file. The prompts and ranges files live beside the cache; nothing
else of the hand-off is spread over callers.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from ..child import failure, run_child
from ..errors import InputError, ModelError
from ..runtime import onnx_io
from ..runtime.onnx import export_facts, tokenize
from ..runtime.sampler import unet_feed


@dataclasses.dataclass(frozen=True)
class Calibration:
    folder: Path
    prompts: tuple[str, ...]
    seed: int = 0
    # the one-step UNet's timestep per input (cycled; empty: 1000, text to image). A graph that is
    # quantized whole quantizes its timestep input too, so one that edits images is calibrated over the
    # timesteps image-to-image feeds it, or every other timestep would clip to 1000.
    unet_timesteps: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "folder", Path(self.folder))
        object.__setattr__(self, "prompts", tuple(self.prompts))
        object.__setattr__(self, "unet_timesteps", tuple(float(t) for t in self.unet_timesteps))
        if not self.prompts:
            raise InputError("no calibration prompts", "pass --calibration-prompts FILE with one prompt per line")

    def feeds(self, component: str) -> list[dict]:
        """One input dict per prompt for ``component``, made by running the fp32 export upstream of it."""
        import numpy as np

        from ..generator import make_noise

        folder, prompts = self.folder, list(self.prompts)
        facts = export_facts(folder)
        ids = tokenize(folder, prompts)
        noise = [make_noise([self.seed + i], facts.latent_shape).numpy() for i in range(len(prompts))]
        if component in ("text_encoder", "generator"):
            return [{"input_ids": ids[i: i + 1]} if component == "text_encoder"
                    else {"input_ids": ids[i: i + 1], "noise": noise[i]} for i in range(len(prompts))]
        te = onnx_io.session(folder / "text_encoder" / onnx_io.MODEL_FILE)
        ehs = [te.run(None, {"input_ids": ids[i: i + 1]})[0] for i in range(len(prompts))]
        del te
        if component == "unet":
            un = onnx_io.session(folder / "unet" / onnx_io.MODEL_FILE)
            feeds = [unet_feed(un, noise[i], ehs[i]) for i in range(len(prompts))]
            for i, f in enumerate(feeds):
                if self.unet_timesteps and "timestep" in f:
                    f["timestep"] = np.full((1,), self.unet_timesteps[i % len(self.unet_timesteps)], np.float32)
            return feeds
        if component == "unet_velocity":
            steps = max(1, facts.default_steps)  # the taus the N-step sampler visits
            taus = [1000.0 * (1 - k / steps) for k in range(steps)]
            return [{"sample": noise[i], "timestep": np.full((1,), taus[i % len(taus)], np.float32),
                     "encoder_hidden_states": ehs[i]} for i in range(len(prompts))]
        if component in ("vae_decoder", "vae_encoder"):
            un = onnx_io.session(folder / "unet" / onnx_io.MODEL_FILE)
            lat = [un.run(None, unet_feed(un, noise[i], ehs[i]))[0] / facts.scaling_factor for i in range(len(prompts))]
            if component == "vae_decoder":
                return [{"latent_sample": x} for x in lat]
            de = onnx_io.session(folder / "vae_decoder" / onnx_io.MODEL_FILE)  # the encoder sees the model's images
            return [{"sample": np.clip(de.run(None, {"latent_sample": x})[0], -1, 1)} for x in lat]
        raise InputError(f"no calibration inputs for component {component!r}", "quantize another component")

    def ranges_in_subprocess(self, component: str, model: Path, cache: Path, every_tensor: bool = False) -> None:
        """onnxruntime's MinMax ranges of ``model`` (component ``component``) on these inputs, computed in a
        fresh Python process and written to ``cache`` (its calibration-cache JSON): of the tensors around
        int8-static's Conv/MatMul/Gemm nodes, or of ``every_tensor`` (a graph quantized whole, as for the
        HTP). The child reports each input done as a ``calibrated i/n`` line (a progress bar here)."""
        from tqdm import tqdm

        job = cache.with_suffix(".job.json")
        job.write_text(json.dumps({"folder": str(self.folder), "prompts": list(self.prompts), "seed": self.seed,
                                   "unet_timesteps": list(self.unet_timesteps)}))
        cmd = [sys.executable, "-m", "instaflow_edge.quantize.onnx_calibrate", str(job), component, str(model), str(cache)]
        cmd += ["--every-tensor"] if every_tensor else []
        with tqdm(total=len(self.prompts), desc=f"calibrating {component}", unit="input", disable=None, leave=False,
                  dynamic_ncols=True) as bar:
            code, _, stderr = run_child(cmd, lambda line: bar.update(1) if line.startswith("calibrated ") else None)
        if code != 0 or not cache.is_file():
            raise ModelError(f"calibration of {component} failed: {failure(code, stderr)}",
                             "rerun with --debug; a smaller --calibration-prompts file needs less memory")

    @classmethod
    def from_job(cls, job: Path) -> "Calibration":
        """The calibration a parent process handed to ``quantize.onnx_calibrate``."""
        d = json.loads(Path(job).read_text())
        return cls(Path(d["folder"]), tuple(d["prompts"]), int(d["seed"]), tuple(d.get("unet_timesteps") or ()))
