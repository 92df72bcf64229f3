"""Presets: random-weight pipelines built in code, for tests and for conversion at real scale.

No weights can be downloaded on our machines, so presets stand in for real checkpoints with the same
classes and layouts (``save_pretrained``), and the same code paths run on both. Same seed → identical
weights. Register a preset with ``@preset("name")``.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Callable

from .artifacts import (
    atomic_dir,
    check_output,
    make_manifest,
    sha256_tree,
    write_manifest,
)
from .errors import InputError
from .pipeline import ModelInfo, Pipeline, quiet_libraries
from .tokenizer import PROMPT_WORDS, build_tokenizer
from .validators import boolean, seed

# build(seed, progress=True, **options) -> Pipeline, or Built when it adds manifest fields; ``progress``
# shows bars for builds that train something (digits), others ignore it
PresetBuilder = Callable[..., "object"]


@dataclasses.dataclass
class Built:
    """A preset builder's result when the build measured something the manifest should keep
    (e.g. the digits VAE's reconstruction PSNR): ``manifest`` is merged into ``manifest.json``."""

    pipeline: "object"
    manifest: dict


@dataclasses.dataclass(frozen=True)
class PresetSpec:
    name: str
    description: str
    build: PresetBuilder
    # exact parameter counts (text_encoder, unet, vae) where the preset pins an architecture
    param_counts: dict[str, int] | None = None


PRESETS: dict[str, PresetSpec] = {}
# presets defined outside this module, by the module that registers them: loaded on first use, so a
# Python caller gets every preset without importing anything first (and importing this module stays light)
LAZY_PRESETS = {"digits": "instaflow_edge.digits.preset"}


def preset_names() -> list[str]:
    return sorted(set(PRESETS) | set(LAZY_PRESETS))


def preset(name: str, description: str, param_counts: dict[str, int] | None = None):
    """Register a preset builder ``build(seed) -> Pipeline``."""

    def deco(fn: PresetBuilder) -> PresetBuilder:
        PRESETS[name] = PresetSpec(name, description, fn, param_counts)
        return fn

    return deco


def get_preset(name: str) -> PresetSpec:
    if name not in PRESETS and name in LAZY_PRESETS:
        import importlib

        importlib.import_module(LAZY_PRESETS[name])
    if name not in PRESETS:
        raise InputError(f"unknown preset {name!r}", f"choose one of: {', '.join(preset_names())}")
    return PRESETS[name]


def count_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _tokenizer(words: list[str]):

    with tempfile.TemporaryDirectory() as d:
        return build_tokenizer(words, d)


def _assemble(seed: int, tokenizer, text_cfg: dict, unet_cfg: dict, vae_cfg: dict, info):
    """Build the components under fixed per-component seeds, so each is reproducible on its own. The
    global RNG is left as it was (the seeds are set inside ``fork_rng``)."""
    with quiet_libraries():
        import torch
        from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        text_cfg = dict(text_cfg)
        text_cfg.setdefault("vocab_size", len(tokenizer))
        text_cfg.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg))
            torch.manual_seed(seed + 1)
            unet = UNet2DConditionModel(**unet_cfg)
            torch.manual_seed(seed + 2)
            vae = AutoencoderKL(**vae_cfg)
        # SD1.x's scheduler config, kept for tools that expect one; rectified flows are sampled with the
        # Euler rule of flow.py (the manifest's "model.flow" says which).
        scheduler = PNDMScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
            skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False,
        )
    return Pipeline(tokenizer, text_encoder.eval(), unet.eval(), vae.eval(), scheduler, info)


@preset("tiny", "seconds-scale SD-architecture pipeline for tests: 64×64 images, one step")
def build_tiny(seed: int, progress: bool = True):

    tok = _tokenizer(PROMPT_WORDS)
    return _assemble(
        seed,
        tok,
        text_cfg=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                      max_position_embeddings=77, projection_dim=32),
        unet_cfg=dict(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
        ),
        vae_cfg=dict(
            in_channels=3, out_channels=3, latent_channels=4, sample_size=64, layers_per_block=1,
            block_out_channels=(16, 32, 32, 32), norm_num_groups=8,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        ),
        info=ModelInfo(flow="rectified_flow", default_steps=1, source="preset:tiny"),
    )


SD15_PARAMS = {"text_encoder": 123_060_480, "unet": 859_520_964, "vae": 83_653_863}


@preset("sd15", "the full SD1.5 / InstaFlow-0.9B architecture at 512×512 (random weights, ~1.07 B params)",
        param_counts=SD15_PARAMS)
def build_sd15(seed: int, progress: bool = True):

    tok = _tokenizer(PROMPT_WORDS)
    return _assemble(
        seed,
        tok,
        # CLIP ViT-L/14's text tower, with CLIP's full 49,408-entry embedding table
        text_cfg=dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                      num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                      projection_dim=768),
        unet_cfg=dict(sample_size=64, cross_attention_dim=768),  # diffusers' defaults are SD1.x's UNet
        vae_cfg=dict(
            in_channels=3, out_channels=3, latent_channels=4, sample_size=512, layers_per_block=2,
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        ),
        info=ModelInfo(flow="rectified_flow", default_steps=1, source="preset:sd15"),
    )


@dataclasses.dataclass
class InitConfig:
    """``instaflow-edge init``: which preset, where, with which seed."""

    preset: str
    output: str
    seed: int = 0
    force: bool = False
    options: dict = dataclasses.field(default_factory=dict)  # builder keywords (e.g. digits: vae_steps)
    progress: bool = True

    def __post_init__(self) -> None:
        get_preset(self.preset)
        seed("seed", self.seed, 5, "a preset seeds its parts with seed … seed + 4")
        boolean("force", self.force)


def init(config: InitConfig) -> str:
    """Build a preset and save it as a pipeline folder with a manifest; returns the folder."""

    check_output(config.output, config.force)  # fail before minutes of building
    spec = get_preset(config.preset)
    try:
        built = spec.build(config.seed, progress=config.progress, **config.options)
    except TypeError as e:
        if not config.options:
            raise
        raise InputError(f"preset {spec.name} does not take options {sorted(config.options)} ({e})",
                         "drop them") from e
    pipe, extra = (built.pipeline, built.manifest) if isinstance(built, Built) else (built, {})
    counts = {k: count_params(getattr(pipe, k)) for k in ("text_encoder", "unet", "vae")}
    if spec.param_counts is not None and counts != spec.param_counts:
        raise RuntimeError(f"preset {spec.name} built {counts}, expected {spec.param_counts}")
    with atomic_dir(config.output, config.force) as tmp:
        pipe.save(tmp)
        write_manifest(
            tmp,
            make_manifest(
                "pipeline",
                config,
                model=dataclasses.asdict(pipe.info),
                preset=spec.name,
                params=counts,
                **extra,
                content_sha256=sha256_tree(tmp),
            ),
        )
    return os.fspath(config.output)
