"""``generate``: prompts → PNGs + a manifest listing every image with its prompt and seed."""

from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path
from typing import Callable, Iterator

from .artifacts import (
    atomic_dir,
    check_output,
    make_manifest,
    read_manifest,
    write_manifest,
)
from . import runtime
from .errors import InputError, NumericsError
from .options import Device, DType
from .pipeline import load_pipeline
from .runtime import Backend
from .validators import backend_choice, boolean, choice, image_count, image_side, image_size, number, optional_integer, seed


DEFAULT_STRENGTH = 0.8  # image-to-image, as diffusers' pipelines default


@dataclasses.dataclass
class GenerateConfig:
    """Options of ``instaflow-edge generate``; ``steps=None`` means the model's default (1 for one-step)."""

    model: str
    prompts: list[str]
    output: str
    seed: int = 0
    num_images: int = 1
    steps: int | None = None
    guidance: float = 1.0
    negative_prompt: str = ""
    height: int | None = None
    width: int | None = None
    device: Device = Device.auto
    dtype: DType = DType.auto
    backend: str = Backend.torch.value  # "torch", or the format of an export (runtime.backend_names())
    image: str | None = None  # image-to-image: the image to edit
    strength: float | None = None  # how far back toward the noise the edit starts, in (0, 1]; default 0.8
    allow_pickle: bool = False
    force: bool = False

    def __post_init__(self) -> None:
        """Check every field once, when the config is made; choices become enums."""
        if isinstance(self.prompts, str) or not self.prompts:
            raise InputError("no prompt given", 'pass at least one prompt, e.g. "a red fox in snow"')
        self.prompts = list(self.prompts)
        for p in self.prompts:
            if not isinstance(p, str) or not p.strip():
                raise InputError("empty prompt", "every prompt needs some text")
        image_count("num_images", self.num_images, len(self.prompts))
        seed("seed", self.seed, self.num_images)  # image k of a prompt uses seed + k
        optional_integer("steps", self.steps, 1)
        number("guidance", self.guidance, low=0.0)
        image_side("height", self.height)
        image_side("width", self.width)
        boolean("allow_pickle", self.allow_pickle)
        boolean("force", self.force)
        self.device = choice("device", self.device, Device)
        self.dtype = choice("dtype", self.dtype, DType)
        self.backend = backend_choice("backend", self.backend, runtime.backend_names())
        if self.strength is not None:
            if self.image is None:
                raise InputError("--strength applies to image-to-image", "add --image FILE, or drop --strength")
            number("strength", self.strength, low=0.0, high=1.0, open_low=True)
        if self.image is not None:
            if not isinstance(self.image, str) or not Path(self.image).is_file():
                raise InputError(f"--image {self.image}: no such file", "pass a PNG or JPEG file to edit")
            self.strength = DEFAULT_STRENGTH if self.strength is None else float(self.strength)


@dataclasses.dataclass
class Job:
    index: int
    prompt: str
    seed: int

    @property
    def filename(self) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", self.prompt.lower()).strip("-")[:40] or "image"
        return f"{self.index:04d}-{slug}-seed{self.seed}.png"


def plan(config: GenerateConfig) -> Iterator[Job]:
    """Image k of every prompt uses seed ``seed + k``: the same seed shows each prompt from the same noise.
    Made lazily, one job at a time (``len(config.prompts) * config.num_images`` of them)."""
    index = 0
    for p in config.prompts:
        for k in range(config.num_images):
            yield Job(index, p, config.seed + k)
            index += 1


# A backend is ``load(config, info) -> render(job) -> HxWx3 uint8 array``: loading happens once, before
# the clock starts; ``info`` receives the sampling settings for the manifest. PyTorch runs a pipeline
# folder; every other backend is an export format, opened by its own runtime (runtime.open_export).


def _torch_backend(config: GenerateConfig, info: dict) -> Callable[[Job], "object"]:
    # a bad model folder fails before torch is imported, a missing GPU before the weights load (load_pipeline)
    pipe = load_pipeline(config.model, config.device.value, config.dtype.value, config.allow_pickle)

    import torch

    from .generator import decode_latents, generate_latents, make_noise

    steps = config.steps or pipe.info.default_steps
    h, w = pipe.image_size(config.height, config.width)
    shape = pipe.latent_shape(h, w)
    info.update(steps=steps, height=h, width=w, flow=pipe.info.flow, device=str(pipe.device), dtype=str(pipe.dtype).removeprefix("torch."))
    image_latents = None
    if config.image is not None:
        from .data import load_image
        from .generator import encode_images

        if pipe.info.flow != "rectified_flow":
            raise InputError(f"--image edits with a rectified flow; {config.model} is a {pipe.info.flow} model",
                             "pass a rectified-flow model (a teacher, 2-RF or one-step student of this recipe)")
        image_latents = encode_images(pipe, load_image(Path(config.image), h, w)[None])
        info.update(image=Path(config.image).name, strength=config.strength,
                    start_s=round(1.0 - config.strength, 6), taus=[t for t, _ in _edit_taus(config.strength, steps)])

    def render(job: Job):
        noise = make_noise([job.seed], shape)
        latents = generate_latents(pipe, [job.prompt], noise, steps, config.guidance, config.negative_prompt,
                                   image_latents, config.strength or 1.0)
        image = decode_latents(pipe, latents)
        if not torch.isfinite(image).all() or not torch.isfinite(latents).all():
            raise NumericsError(
                f"NaN/Inf in the image for prompt {job.prompt!r} seed {job.seed} ({info['dtype']} on {info['device']})",
                "fp16 overflow is the usual cause: retry with --dtype float32",
            )
        return (image[0].permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8")

    return render


def _edit_taus(strength: float, steps: int) -> list[tuple[float, float]]:
    from .flow import edit_schedule

    return [(round(t, 4), ds) for t, ds in edit_schedule(strength, steps)]


def export_size(facts, height: int | None, width: int | None) -> tuple[int, int]:
    """The image size to sample an export at: the export's own unless asked; a size the graphs were not
    built for is a one-line error."""
    h = image_size("height", height or facts.height, facts.size_multiple)
    w = image_size("width", width or facts.width, facts.size_multiple)
    if facts.fixed_size and (h, w) != (facts.height, facts.width) and (h, w) not in facts.sizes:
        built = ", ".join(f"{a}x{b}" for a, b in (facts.sizes or ((facts.height, facts.width),)))
        raise InputError(f"this export is compiled for {built} images, not {h}x{w}",
                         "drop --height/--width, or convert again with them")
    return h, w


def _export_backend(config: GenerateConfig, info: dict) -> Callable[[Job], "object"]:
    import numpy as np

    from .generator import make_noise

    if config.dtype.value not in ("auto", "float32"):
        raise InputError(f"--dtype {config.dtype.value} does not apply to --backend {config.backend} (precision is fixed at export)",
                         "convert or quantize the export in the precision you want (instaflow-edge quantize DIR --scheme fp16)")
    export = runtime.open_export(config.model, expect=config.backend, steps=config.steps, guidance=config.guidance,
                                 device=config.device.value)
    h, w = export_size(export.facts, config.height, config.width)
    shape = export.facts.latent_for(h, w)
    info.update(steps=export.steps, height=h, width=w, flow=export.facts.flow, device=export.device, dtype="float32",
                **export.info())

    images = None
    if config.image is not None:
        from .data import load_image

        export.check_edit()  # the one-line refusal, before any image
        images = load_image(Path(config.image), h, w)[None].numpy()
        info.update(image=Path(config.image).name, strength=config.strength, start_s=round(1.0 - config.strength, 6),
                    taus=[t for t, _ in _edit_taus(config.strength, export.steps)])

    def render(job):
        ids = export.tokenize([job.prompt])
        noise = make_noise([job.seed], shape).numpy()
        image = export.sample(ids, noise) if images is None else export.edit(ids, images, noise, config.strength)
        if not np.isfinite(image).all():
            raise NumericsError(f"NaN/Inf in the image for prompt {job.prompt!r} seed {job.seed} ({config.backend} {export.precision})",
                                "a low-precision export overflowed: use the fp32 or int8 export")
        return (image[0].transpose(1, 2, 0) * 255).round().astype("uint8")

    return render


def generate(config: GenerateConfig, progress: bool = True) -> dict:
    """Generate every (prompt, seed) of ``config`` into ``config.output``; returns the manifest."""
    from PIL import Image
    from tqdm.auto import tqdm


    inputs = (config.model, config.image)  # --force replaces a previous output, never an input
    check_output(config.output, config.force, inputs)
    jobs = plan(config)
    info: dict = {}
    records, seconds = [], []
    with atomic_dir(config.output, config.force, inputs) as tmp:  # locked: one writer per output
        render = (_torch_backend if config.backend == "torch" else _export_backend)(config, info)
        total = len(config.prompts) * config.num_images
        bar = tqdm(jobs, total=total, desc="generating", unit="img", disable=not progress or total < 2)
        for job in bar:
            t0 = time.perf_counter()
            arr = render(job)
            seconds.append(time.perf_counter() - t0)
            Image.fromarray(arr).save(tmp / job.filename)
            records.append({"file": job.filename, "prompt": job.prompt, "seed": job.seed, "seconds": round(seconds[-1], 4)})
        source_manifest = read_manifest(config.model) if Path(config.model).is_dir() else None
        manifest = make_manifest(
            "images",
            config,
            model={"source": config.model, "content_sha256": (source_manifest or {}).get("content_sha256")},
            sampling=info,
            images=records,
            # model loading is outside these figures; the first image also pays one-time warm-up
            seconds_per_image=round(sum(seconds) / len(seconds), 4),
        )
        write_manifest(tmp, manifest)
    return manifest
