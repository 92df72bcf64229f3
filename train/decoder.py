"""``instaflow-edge train decoder``: distil a tiny VAE (diffusers' ``AutoencoderTiny``, TAESD's
architecture, or narrower) from a pipeline's ``AutoencoderKL``, and write the pipeline with it as ``vae``.

Why a pipeline and not a ``--decoder tiny`` switch: the result is an ordinary diffusers folder, so
``generate``, ``eval``, ``convert`` (ONNX, Core ML, every layout and scheme), ``quantize`` and the
consumers' own pipelines (optimum's, Apple's) take it with no new option, and every parity gate compares
an export with the same PyTorch pipeline it came from. A switch would have to be carried by every
command, and a folder with two decoders is not a diffusers layout.

Latent convention (TAESD's): the tiny VAE's ``scaling_factor`` is 1.0 and it works on the *scaled*
latents the UNet produces — its decoder maps ``x`` to what the full decoder makes of
``x / scaling_factor``, its encoder maps an image to ``posterior mean × scaling_factor``. So
``vae.decode(latents / vae.config.scaling_factor)``, as every runtime and export computes it, is right
for both.

Training data: latents of the training images (VAE posterior means) and the model's own one-step
outputs on prompts of the data; loss L1 + L2 between the tiny and the full decoder's images, plus L2
between the tiny encoder's latents and the full encoder's on the images.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

from ..artifacts import (
    atomic_dir,
    inherited_prompts,
    make_manifest,
    sha256_tree,
    write_manifest,
)
from ..errors import InputError, ModelError
from ..pipeline import load_pipeline, quiet_libraries
from ..presets import count_params
from ..threads import Governor, threads_setting
from ..validators import boolean, integer, number, seed, with_article
from .macs import decoder_macs
from .teacher import cache_latents, chunk_size

DIGITS = "digits"


# A tiny decoder is TAESD-sized (64 channels, ≤ 3 blocks a stage); the full SD decoder is 512 wide. Past these
# bounds the "tiny" model outgrows the one it replaces, and a typo (--channels 100000) would allocate 100s of GB.
MAX_CHANNELS = 1024
MAX_BLOCKS = 16
MAX_BATCH = 1024
CROP = 32  # latent side a training step sees at most: a 256² image crop at SD's 8× VAE


def _int_list(name: str, v, low: int = 1, high: int | None = None) -> list[int] | None:
    if v is None:
        return None
    if isinstance(v, str):
        try:
            v = [int(p) for p in v.split(",") if p.strip()]
        except ValueError as e:
            raise InputError(f"{name} must be comma-separated integers, got {v!r}", f"e.g. --{name.replace('_', '-')} 64,64,64,64") from e
    if not isinstance(v, (list, tuple)) or not v or any(isinstance(x, bool) or not isinstance(x, int) or x < low for x in v):
        raise InputError(f"{name} must be a list of integers ≥ {low}, got {v!r}", f"e.g. --{name.replace('_', '-')} 64,64,64,64")
    if high is not None and max(v) > high:
        raise InputError(f"--{name.replace('_', '-')} {max(v)} is more than a tiny decoder takes (at most {high})",
                         f"e.g. --{name.replace('_', '-')} 64,64,64,64 (TAESD)")
    return list(v)


@dataclasses.dataclass(kw_only=True)
class DecoderConfig:
    """Options of ``instaflow-edge train decoder``."""

    model: str
    output: str
    data: str = DIGITS  # "digits" or a folder of images with a captions file
    captions: str | None = None
    channels: list[int] | None = None  # decoder (and encoder) width per stage; default TAESD's 64s
    blocks: list[int] | None = None  # decoder blocks per stage; default TAESD's (3, 3, 3, 1)
    one_step_latents: int = 512  # one-step outputs of MODEL added to the image latents
    held_out: int = 16  # more one-step latents, not trained on: the manifest's PSNR vs the full decoder
    max_steps: int = 2000
    batch_size: int = 32
    learning_rate: float = 1e-3
    seed: int = 0
    threads: str | int = "auto"  # CPU threads: follow the machine's load (threads.py), or a fixed count
    allow_pickle: bool = False
    force: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("model", "output"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise InputError(f"no {name} given", "pass MODEL and -o OUT")
        if not isinstance(self.data, str) or not self.data:
            raise InputError("no training data given", "pass --data digits or --data FOLDER")
        if self.data != DIGITS and not Path(self.data).is_dir():
            raise InputError(f"data folder {self.data} does not exist", "pass --data digits or a folder of images")
        self.channels = _int_list("channels", self.channels, 1, MAX_CHANNELS)
        self.blocks = _int_list("blocks", self.blocks, 0, MAX_BLOCKS)
        if self.channels and len(set(self.channels)) != 1:
            # DecoderTiny's stages hand their width on unchanged (TAESD is 64 throughout)
            raise InputError(f"--channels {','.join(map(str, self.channels))}: AutoencoderTiny's stages must share one width",
                             f"e.g. --channels {','.join([str(self.channels[0])] * len(self.channels))}")
        if self.channels and self.blocks and len(self.channels) != len(self.blocks):
            raise InputError(f"--channels has {len(self.channels)} stages, --blocks {len(self.blocks)}", "give both the same length")
        integer("one_step_latents", self.one_step_latents, 0)
        integer("held_out", self.held_out, 1)
        integer("max_steps", self.max_steps, 1)
        integer("batch_size", self.batch_size, 1)
        if self.batch_size > MAX_BATCH:
            raise InputError(f"--batch-size {self.batch_size} is more than {MAX_BATCH}", "pass a smaller --batch-size")
        self.learning_rate = number("learning_rate", self.learning_rate, 0.0, open_low=True)
        seed("seed", self.seed)
        self.threads = threads_setting("threads", self.threads)
        for name in ("allow_pickle", "force", "progress"):
            boolean(name, getattr(self, name))

    def inputs(self) -> tuple[str, ...]:
        return (self.model, *((self.data,) if self.data != DIGITS else ()), *((self.captions,) if self.captions else ()))


def tiny_vae_config(vae_cfg: dict, scale_factor: int, channels: list[int] | None, blocks: list[int] | None) -> dict:
    """AutoencoderTiny's config for a VAE with ``scale_factor`` (a power of 2): one stage more than
    upsamplings; TAESD's widths and depths unless given."""
    n = int(round(math.log2(scale_factor))) + 1
    if 2 ** (n - 1) != scale_factor:
        raise ModelError(f"the VAE's scale factor {scale_factor} is not a power of 2", "use a Stable Diffusion-style VAE")
    channels = channels or [64] * n
    blocks = blocks if blocks is not None else ([3] * (n - 1) + [1])
    if len(channels) != n or len(blocks) != n:
        raise InputError(f"the VAE upsamples {scale_factor}×: the tiny decoder needs {n} stages, got "
                         f"--channels {','.join(map(str, channels))} --blocks {','.join(map(str, blocks))}",
                         f"give {n} values to each")
    return dict(in_channels=vae_cfg.get("in_channels", 3), out_channels=vae_cfg.get("out_channels", 3),
                latent_channels=vae_cfg["latent_channels"], encoder_block_out_channels=list(reversed(channels)),
                decoder_block_out_channels=channels, num_encoder_blocks=[1] + list(reversed(blocks))[1:],
                num_decoder_blocks=blocks, scaling_factor=1.0, shift_factor=0.0)


def _dataset(config: DecoderConfig, size: int):
    from ..data import digits_dataset, folder_dataset

    if config.data == DIGITS:
        return digits_dataset("train", size=size)
    return folder_dataset(config.data, config.captions, size=size)


def _latents(pipe, config: DecoderConfig, dataset, progress: bool):
    """(image latents, one-step latents, held-out one-step latents) — all scaled latents; the images
    themselves stay in the dataset (read per batch), so memory holds latents only (64 kB each at 512²)."""
    import torch

    size = pipe.default_size
    lat, _, _ = cache_latents(pipe, dataset, progress=progress)
    prompts = [dataset[i % len(dataset)]["prompt"] for i in range(config.one_step_latents + config.held_out)]
    g = torch.Generator().manual_seed(config.seed)
    shape = pipe.latent_shape(size, size)
    outs = []
    step = chunk_size(size * size)
    for start in range(0, len(prompts), step):
        chunk = prompts[start:start + step]
        z = torch.randn((len(chunk), *shape), generator=g)
        with torch.no_grad():
            cond = pipe.text_encoder(pipe.tokenize(chunk), return_dict=False)[0]
            tau = torch.full((len(chunk),), 1000.0)  # one step: x = z + v(z, τ=1000) (flow.py)
            outs.append(z + pipe.unet(z, tau, encoder_hidden_states=cond, return_dict=False)[0])
    gen = torch.cat(outs) if outs else torch.zeros((0, *shape))
    return lat, gen[:config.one_step_latents], gen[config.one_step_latents:]


def _crop(x, side: int, offsets):
    """The ``side``² window at ``offsets`` (one (top, left) per item) of each item of ``x``."""
    import torch

    if side >= x.shape[-1] and side >= x.shape[-2]:
        return x
    return torch.stack([t[..., i:i + side, j:j + side] for t, (i, j) in zip(x, offsets)])


def train_decoder(config: DecoderConfig) -> dict:
    """Distil the tiny VAE and write the pipeline with it; returns the manifest."""
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    with quiet_libraries():  # torchao's kernels it cannot load on a CPU, diffusers' notice of it: five lines otherwise
        from diffusers import AutoencoderKL, AutoencoderTiny

    with atomic_dir(config.output, config.force, config.inputs()) as tmp, Governor(config.threads) as governor:
        pipe = load_pipeline(config.model, device="cpu", dtype="float32", allow_pickle=config.allow_pickle)
        if not isinstance(pipe.vae, AutoencoderKL):
            raise InputError(f"{config.model}'s vae is {with_article(type(pipe.vae).__name__)}, not an AutoencoderKL to distil from",
                             "pass the pipeline with the full VAE")
        full, sf = pipe.vae, pipe.scaling_factor
        tiny_cfg = tiny_vae_config(dict(full.config), pipe.vae_scale_factor, config.channels, config.blocks)
        torch.manual_seed(config.seed)
        tiny = AutoencoderTiny(**tiny_cfg).train()
        dataset = _dataset(config, pipe.default_size)
        lat_img, lat_gen, held = _latents(pipe, config, dataset, config.progress)
        pool = torch.cat([lat_img, lat_gen])
        # Memory is bounded at any size: each step sees latent crops of at most CROP² (a 256² image; the
        # whole latent at the digits' and tiny's sizes), in micro-batches whose gradients add up to the
        # batch's, with the tiny model's activations recomputed in backward above 128² crops.
        f = pipe.vae_scale_factor
        side = min(CROP, pool.shape[-1], pool.shape[-2])
        micro = chunk_size((side * f) ** 2, megapixels=0.25, most=config.batch_size)
        if side * f > 128:
            tiny.enable_gradient_checkpointing()
        opt = torch.optim.Adam(tiny.parameters(), lr=config.learning_rate)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / config.max_steps))))
        g = torch.Generator().manual_seed(config.seed + 1)
        t0 = time.perf_counter()
        bar = tqdm(range(config.max_steps), desc="train decoder", unit="step", disable=not config.progress)
        losses: list[float] = []
        for _ in bar:
            governor.tick()
            idx = torch.randint(0, len(pool), (config.batch_size,), generator=g)
            ii = torch.randint(0, len(lat_img), (config.batch_size,), generator=g)
            hi, wi = pool.shape[-2] - side + 1, pool.shape[-1] - side + 1
            at = (torch.stack([torch.randint(0, hi, (config.batch_size,), generator=g),
                               torch.randint(0, wi, (config.batch_size,), generator=g)], 1).tolist()
                  if hi > 1 or wi > 1 else [(0, 0)] * config.batch_size)
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for a in range(0, config.batch_size, micro):
                part = slice(a, a + micro)
                x = _crop(pool[idx[part]], side, at[part])
                with torch.no_grad():
                    target = full.decode(x / sf, return_dict=False)[0]
                img = tiny.decode(x, return_dict=False)[0]
                loss = F.l1_loss(img, target) + F.mse_loss(img, target)
                images = torch.stack([dataset[int(j)]["image"] for j in ii[part]])
                images = _crop(images, side * f, [(i * f, j * f) for i, j in at[part]])
                enc = _crop(lat_img[ii[part]], side, at[part])
                loss = loss + F.mse_loss(tiny.encode(images, return_dict=False)[0], enc)
                w = len(idx[part]) / config.batch_size
                (loss * w).backward()
                total += loss.item() * w
            opt.step()
            sched.step()
            losses.append(total)
            bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
            if not math.isfinite(losses[-1]):
                raise InputError(f"decoder training loss is {losses[-1]}", "lower --learning-rate")
        seconds = time.perf_counter() - t0
        tiny = tiny.eval().requires_grad_(False)
        shape = pipe.latent_shape(pipe.default_size, pipe.default_size)
        with torch.no_grad():  # held-out one-step latents: the tiny decoder's image vs the full one's
            step = chunk_size((pool.shape[-1] * f) ** 2)
            err = sum(F.mse_loss(tiny.decode(h, return_dict=False)[0].clamp(-1, 1),
                                 full.decode(h / sf, return_dict=False)[0].clamp(-1, 1), reduction="sum")
                      for h in held.split(step))
            psnr = float(10 * torch.log10(4.0 / (err / (len(held) * 3 * (pool.shape[-2] * f) * (pool.shape[-1] * f)))))
        before = {"params": count_params(full.decoder) + count_params(full.post_quant_conv or torch.nn.Identity()),
                  "macs_per_image": decoder_macs(full, shape)}
        after = {"params": count_params(tiny.decoder), "macs_per_image": decoder_macs(tiny, shape)}
        pipe.vae = tiny
        pipe.save(tmp, pipe.info)
        manifest = make_manifest(
            "pipeline", config, model=dataclasses.asdict(pipe.info), stage="decoder", base_model=config.model,
            decoder={"class": "AutoencoderTiny", "config": tiny_cfg, "before": before, "after": after,
                     "macs_ratio": round(before["macs_per_image"] / max(1, after["macs_per_image"]), 2),
                     "held_out_psnr_db": round(psnr, 2), "held_out_latents": len(held),
                     "image_latents": len(lat_img), "one_step_latents": len(lat_gen),
                     "steps": config.max_steps, "first_loss": losses[0],
                     "final_loss": sum(losses[-50:]) / len(losses[-50:]),
                     "seconds": round(seconds, 1), "seconds_per_step": round(seconds / config.max_steps, 4)},
            one_step=pipe.info.one_step, **inherited_prompts(config.model),
            params={k: count_params(getattr(pipe, k)) for k in ("text_encoder", "unet", "vae")},
            content_sha256=sha256_tree(tmp),
        )
        write_manifest(tmp, manifest)
    return manifest
