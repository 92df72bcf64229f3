"""What every runtime format shares: the typed facts of an export, the opened export, the format record.

An export folder is opened once (``runtime.open_export``) into an :class:`Export`: its
:class:`ExportFacts` (latent shape, sizes, scaling factor, flow, steps), a tokenizer, and the three
component calls every consumer needs, on numpy arrays, batch-first:

    text_encoder(input_ids int64 (N, 77)) -> hidden states
    unet(noise (N, C, h, w), hidden) -> the one-step latents (x = z + v(z, τ=1000, text))
    vae_decoder(latents ÷ scaling_factor) -> image in [-1, 1]
    velocity(x, τ (N,), hidden) -> v            (multi-step exports only)

``generate``/``eval`` call :meth:`Export.sample`, ``bench`` times the three calls with a clock between
them, ``report`` feeds each call the reference's inputs. What ran (runtime, precision, scheme) and the
gates and sizes the manifest records travel with it, so no consumer reads a manifest or knows a format.
This module stays light at import (no numpy, no runtime library).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Callable

from ..errors import InputError, ModelError
from ..options import ONE_STEP  # noqa: F401  (re-exported to the runtimes)
from ..validators import short, size_multiple
from .sampler import edit, sample

FLOWS = ("rectified_flow", "diffusion")


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


@dataclasses.dataclass(frozen=True)
class ExportFacts:
    """The facts a runtime computes with, as convert records them in the export's manifest block.

    ``size_multiple``: image sides must be a multiple of it. ``fixed_size``: the graphs are compiled for
    ``height``×``width`` only (OpenVINO's static shapes, Core ML's enumerated sizes use ``sizes``)."""

    latent_shape: tuple[int, int, int]
    height: int
    width: int
    scaling_factor: float
    flow: str
    default_steps: int
    size_multiple: int
    components: tuple[str, ...]
    fixed_size: bool = False
    sizes: tuple[tuple[int, int], ...] = ()

    @property
    def vae_factor(self) -> int:
        return self.height // self.latent_shape[1]

    def latent_for(self, height: int, width: int) -> tuple[int, int, int]:
        f = self.vae_factor
        return (self.latent_shape[0], height // f, width // f)

    def block(self) -> dict:
        """The manifest form (lists, not tuples)."""
        return {"latent_shape": list(self.latent_shape), "height": self.height, "width": self.width,
                "scaling_factor": self.scaling_factor, "flow": self.flow, "default_steps": self.default_steps,
                "size_multiple": self.size_multiple, "components": list(self.components)}

    @classmethod
    def of(cls, pipe, sizes, components, fixed_size: bool = False) -> "ExportFacts":
        """The facts of ``pipe`` exported at ``sizes`` (``components.Sizes``)."""
        return cls((sizes.latent_channels, sizes.latent_height, sizes.latent_width), sizes.height, sizes.width,
                   float(pipe.scaling_factor), pipe.info.flow, pipe.info.default_steps, pipe.size_multiple,
                   tuple(components), fixed_size)

    @classmethod
    def from_block(cls, block, where: Path, fixed_size: bool = False, unet_config: Path | None = None) -> "ExportFacts":
        """Check a manifest block (a hand-edited ``"latent_shape": [4, "8", 8]`` is a one-line error, not a
        traceback mid-run) and type it. A block without ``size_multiple`` (exports made before it was
        recorded) takes it from ``unet_config`` when given, else it is refused: it is never assumed."""
        if not isinstance(block, dict):
            raise ModelError(f"{where}: the export's runtime facts are missing", "restore the manifest, or re-export the model")
        problems = []
        shape = block.get("latent_shape")
        if not (isinstance(shape, list) and len(shape) == 3 and all(_positive_int(d) for d in shape)):
            problems.append(f"latent_shape must be 3 positive integers, got {short(shape, 40)}")
        for key in ("height", "width", "default_steps"):
            if not _positive_int(block.get(key)):
                problems.append(f"{key} must be a positive integer, got {short(block.get(key), 40)}")
        if "size_multiple" in block and not _positive_int(block["size_multiple"]):
            problems.append(f"size_multiple must be a positive integer, got {short(block['size_multiple'], 40)}")
        sf = block.get("scaling_factor")
        if not (isinstance(sf, (int, float)) and not isinstance(sf, bool) and math.isfinite(sf) and sf > 0):
            problems.append(f"scaling_factor must be a positive number, got {short(sf, 40)}")
        if block.get("flow") not in FLOWS:
            problems.append(f"flow must be rectified_flow or diffusion, got {short(block.get('flow'), 40)}")
        comps = block.get("components")
        if not (isinstance(comps, list) and comps and all(isinstance(c, str) for c in comps)):
            problems.append(f"components must be a list of names, got {short(comps, 40)}")
        if problems:
            raise ModelError(f"{where}: {problems[0]}", "restore the manifest, or re-export the model")
        mult = block.get("size_multiple")
        if mult is None:
            mult = _derived_multiple(block, where, unet_config)
        return cls(tuple(shape), block["height"], block["width"], float(sf), block["flow"], block["default_steps"],
                   int(mult), tuple(comps), fixed_size)


def _derived_multiple(block: dict, where: Path, unet_config: Path | None) -> int:
    import json

    if unet_config is None:
        raise ModelError(f"{where}: the export records no size_multiple", "re-export the model with `instaflow-edge convert`")
    try:
        levels = len(json.loads(Path(unet_config).read_text())["block_out_channels"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelError(f"{where} records no size multiple and {unet_config} is unreadable ({e})",
                         "re-export the model with `instaflow-edge convert`") from e
    return size_multiple(block["height"] // block["latent_shape"][1], levels)


@dataclasses.dataclass
class Export:
    """An export opened by its own runtime. ``calls`` hold ``text_encoder``, ``unet``, ``vae_decoder``
    (and ``velocity`` when opened for more than one step).

    ``ran``: what computed, in words (shown in reports). ``precision``: the export's precision or
    scheme, as a short name (``fp32``, ``int8-static``, ``bf16``). ``stage_precisions``: per stage, the
    arithmetic it ran in (``fp32``/``fp16``/``bf16``/``int8``), for a benchmark's % of peak."""

    folder: Path
    format: str
    label: str
    facts: ExportFacts
    steps: int
    tokenize: Callable
    calls: dict[str, Callable]
    precision: str
    ran: str
    scheme: str | None = None
    gates: dict[str, float] = dataclasses.field(default_factory=dict)
    sizes: dict[str, dict] = dataclasses.field(default_factory=dict)
    stage_precisions: dict[str, str] = dataclasses.field(default_factory=dict)
    max_batch: int | None = None  # None: any batch; 1: compiled for batch 1
    device: str = "cpu"
    runtime: str = ""  # what runs it, in tables ("onnxruntime"; the format's name when empty)
    details: dict = dataclasses.field(default_factory=dict)  # format-specific facts for the images manifest

    def sample(self, input_ids, noise, steps: int | None = None):
        """Images in [0, 1] (N, 3, H, W): the one-step chain at 1 step, else the Euler rule of ``flow.py``
        over the exported velocity UNet."""
        return sample(self.calls, input_ids, noise, self.facts.scaling_factor, steps or self.steps)

    def edit(self, input_ids, images, noise, strength: float, steps: int | None = None):
        """Image-to-image: images in [0, 1] from ``images`` in [-1, 1] (N, 3, H, W), noise and token ids,
        starting at s0 = 1 - strength on the straight path (``runtime/sampler.py: edit``)."""
        steps = steps or self.steps
        self.check_edit(steps)
        return edit(self.calls, input_ids, images, noise, self.facts.scaling_factor, steps, strength)

    def check_edit(self, steps: int | None = None) -> None:
        """A one-line refusal when this export cannot edit images at ``steps``."""
        need = ["vae_encoder", "unet_at" if (steps or self.steps) == 1 else "velocity"]
        missing = [n for n in need if n not in self.calls]
        if missing:
            raise InputError(f"this {self.format} export cannot edit images (it has no {' or '.join(missing)}: made before "
                             "image-to-image, or a target that ships no VAE encoder yet)",
                             "convert the model again with --target onnx, or run --image with --backend torch")

    def info(self) -> dict:
        """What ran, for the manifests of generate and eval."""
        return {"backend": self.format, "runtime": self.runtime or self.format,
                "export_precision": self.precision, "ran": self.ran, **self.details}


Opener = Callable[..., Export]


@dataclasses.dataclass(frozen=True)
class RuntimeFormat:
    """One export format: its name (the ``--backend`` choice and ``convert --target``), the ``kind`` its
    manifest carries, and ``open(folder, manifest, steps=, guidance=, threads=, device=) -> Export``.

    ``label(manifest)`` names an export in tables (``ort int8-static``, ``openvino bf16``); a user's own
    label is prefixed with ``label_prefix``. ``unavailable(device)`` says in words why the runtime cannot
    run here on ``device`` (None when it can): Core ML predicts on macOS only, OpenVINO runs on the CPU.
    ``source(manifest)``: what the export was made from (``model``, ``content_sha256``).
    ``extras(folder, manifest, threads, device)``: whole-image runs a benchmark may time besides the three
    stages, as ``name -> () -> (ids, noise) -> output`` (opened only when called). ``open=None``: a format
    that is recognized but has no runtime in Python (a web site runs in a browser); ``refusal`` is then
    the one-line fix."""

    name: str
    kind: str
    open: Opener | None
    description: str
    title: str = ""  # how the format is named in messages ("ONNX", "OpenVINO", "Core ML")
    label: Callable[[dict], str] = lambda manifest: "export"
    label_prefix: str = ""
    unavailable: Callable[[str], str | None] = lambda device: None
    extras: Callable[..., dict] = lambda folder, manifest, threads=None, device="cpu": {}
    source: Callable[[dict], dict] = lambda manifest: manifest.get("source") or {}  # {"model", "content_sha256"}
    refusal: str = ""
