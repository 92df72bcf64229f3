"""``train teacher``: a 1-rectified flow from any SD-like diffusers pipeline.

The VAE and text encoder stay frozen; the UNet (initialised from MODEL's) learns the velocity of
independent (noise, data) pairs with the RF loss at ``s ~ U(0, 1)``. Latents (VAE posterior mean ×
scaling_factor) and prompt embeddings are computed once before training; 10% of prompts (by default)
are replaced with the empty prompt so classifier-free guidance works. The output is a diffusers
pipeline folder whose manifest says ``model.flow = "rectified_flow"`` (sampled with the Euler rule of
flow.py, ``default_steps`` steps), loadable by ``generate`` and ``eval``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from ..artifacts import (
    atomic_dir,
    make_manifest,
    prompt_sample,
    sha256_tree,
    write_manifest,
)
from ..errors import InputError
from ..pipeline import ModelInfo, load_pipeline
from ..presets import count_params
from ..validators import boolean, integer, number, short, with_article
from .conditioning import MAX_CACHED_PROMPTS, PromptConditioning
from .config import TrainConfig

DIGITS = "digits"


@dataclasses.dataclass(kw_only=True)
class TeacherConfig(TrainConfig):
    """Options of ``instaflow-edge train teacher``: the engine's plus the data and the output model."""

    model: str
    data: str = DIGITS  # "digits" or a folder of images with a captions file
    captions: str | None = None  # default: captions.jsonl / captions.csv inside the folder
    cfg_dropout: float = 0.1  # share of prompts replaced by "" (classifier-free guidance)
    default_steps: int = 32  # Euler steps `generate`/`eval` use for the trained model
    allow_pickle: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.model, str) or not self.model:
            raise InputError("no model given", "pass a pipeline folder or hub id as MODEL")
        if not isinstance(self.data, str) or not self.data:
            raise InputError("no training data given", "pass --data digits or --data FOLDER")
        if self.data != DIGITS and not Path(self.data).is_dir():
            raise InputError(f"data folder {self.data} does not exist or is not a folder",
                             "pass --data digits, or a folder of images with captions.jsonl/captions.csv")
        if self.captions is not None and (not isinstance(self.captions, str) or not self.captions):
            raise InputError(f"captions must be the path of a captions file, got {short(self.captions)}",
                             "pass --captions FILE (or set captions to a path in the config file)")
        if self.captions is not None and self.data == DIGITS:
            raise InputError("--captions applies to a data folder, not to --data digits", "drop --captions")
        self.cfg_dropout = number("cfg_dropout", self.cfg_dropout, 0.0, 1.0, open_high=True)
        integer("default_steps", self.default_steps, 1)
        boolean("allow_pickle", self.allow_pickle)

    def inputs(self) -> tuple[str, ...]:
        return (self.model, *((self.data,) if self.data != DIGITS else ()), *((self.captions,) if self.captions else ()))


class TeacherSource:
    """Cached latents ``x1`` and prompt conditioning (``conditioning.PromptConditioning``); ``get``
    applies the prompt dropout."""

    def __init__(self, latents, prompt_index, prompts: list[str], pipe, cfg_dropout: float,
                 max_cached_prompts: int = MAX_CACHED_PROMPTS):
        self.latents = latents
        self.prompt_index = prompt_index
        self.cfg_dropout = cfg_dropout
        self.conditioning = PromptConditioning(pipe, pipe.tokenize(prompts), max_cached_prompts)

    def __len__(self) -> int:
        return len(self.latents)

    def get(self, indices, rnd, device) -> dict:
        drop = rnd.uniform() < self.cfg_dropout  # drawn even at 0 so the random stream never shifts
        return {"x1": self.latents[indices].to(device),
                "cond": self.conditioning.cond(self.prompt_index[indices], drop, device)}


def load_dataset(config: TeacherConfig, size: int):
    """The training images at the pipeline's resolution."""
    from ..data import digits_dataset, folder_dataset

    if config.data == DIGITS:
        return digits_dataset("train", size=size)
    return folder_dataset(config.data, config.captions, size=size)


def chunk_size(pixels: int, megapixels: float = 1.0, most: int = 64) -> int:
    """How many images of ``pixels`` each one forward pass takes: about ``megapixels`` of images at a
    time (a convolution stack's memory grows with the pixels it sees), so 64 at 128², 4 at 512² (1 … ``most``)."""
    return max(1, min(most, int(megapixels * 2**20 / max(1, pixels))))


def cache_latents(pipe, dataset, batch_size: int | None = None, progress: bool = True):
    """(latents (N, C, h, w) = VAE posterior mean × scaling_factor, prompt index (N,), unique prompts);
    ``batch_size`` images per encoder pass (default: :func:`chunk_size` of the images' pixels)."""
    import torch
    from tqdm.auto import tqdm

    if type(pipe.vae).__name__ != "AutoencoderKL":  # a tiny VAE (train decoder) has no posterior to take the mean of
        raise InputError(f"the model's vae is {with_article(type(pipe.vae).__name__)}; latents are the AutoencoderKL's posterior means",
                         "train on the pipeline with the full VAE (the one `train decoder` started from)")
    prompts: dict[str, int] = {}
    index, chunks = [], []
    n = len(dataset)
    batch_size = batch_size or chunk_size(dataset.size ** 2)
    for start in tqdm(range(0, n, batch_size), desc="caching latents", unit="batch", disable=not progress):
        items = [dataset[i] for i in range(start, min(n, start + batch_size))]
        images = torch.stack([it["image"] for it in items]).to(pipe.device, pipe.vae.dtype)
        with torch.no_grad():
            chunks.append(pipe.vae.encode(images).latent_dist.mean.float().cpu() * pipe.scaling_factor)
        index += [prompts.setdefault(it["prompt"], len(prompts)) for it in items]
    return torch.cat(chunks), torch.tensor(index, dtype=torch.long), list(prompts)


def train_teacher(config: TeacherConfig) -> str:
    """Train a 1-rectified flow on ``config.data`` from ``config.model``; returns the output folder."""
    from .engine import claimed, fit, make_accelerator, training_summary
    from .objectives import RectifiedFlowObjective

    config.check_paths()  # before minutes of training: no overlap with an input, no existing output
    accelerator = make_accelerator(config)
    with claimed(config, accelerator):  # the main process holds the output's lock for the whole run
        main = accelerator.is_main_process
        dev = accelerator.device
        pipe = load_pipeline(config.model, device=dev.type if dev.type in ("cpu", "mps") else str(dev), dtype="float32",
                             allow_pickle=config.allow_pickle)
        dataset = load_dataset(config, pipe.default_size)
        latents, prompt_index, prompts = cache_latents(pipe, dataset, progress=config.progress and main)
        source = TeacherSource(latents, prompt_index, prompts, pipe, config.cfg_dropout)
        unet, result = fit(config, accelerator, pipe.unet, source, RectifiedFlowObjective(), describe="train teacher")

        if main:
            pipe.unet = unet.eval().requires_grad_(False)
            info = ModelInfo(flow="rectified_flow", default_steps=config.default_steps, source=config.model)
            with atomic_dir(config.output, config.force, config.inputs()) as tmp:
                pipe.save(tmp, info)
                write_manifest(tmp, make_manifest(
                    "pipeline", config,
                    model=dataclasses.asdict(info),
                    stage="teacher",
                    base_model=config.model,
                    data={"source": config.data, "samples": len(dataset), "unique_prompts": len(prompts),
                          "latent_shape": list(latents.shape[1:])},
                    prompts=prompt_sample(prompts),
                    training=training_summary(config, result, accelerator),
                    params={k: count_params(getattr(pipe, k)) for k in ("text_encoder", "unet", "vae")},
                    content_sha256=sha256_tree(tmp),
                ))
        accelerator.wait_for_everyone()
    _end_distributed()
    return os.fspath(config.output)


def _end_distributed() -> None:
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
