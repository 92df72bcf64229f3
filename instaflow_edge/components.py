"""Component I/O specs, declared once as data; they drive both the export and its validation.

(optimum's exporter does this with ``OnnxConfig``; Apple's converter with per-component functions.)
Shapes are tuples of *dimension names*, resolved against a pipeline and a requested size by
``Sizes``; ``dynamic`` names the dimensions an export may leave free. Input and output names follow
optimum's ONNX diffusion layout where the component exists there (``input_ids`` →
``last_hidden_state``; ``latent_sample`` → ``sample``), so its ORT pipelines can load our folders.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from .generator import (
    OneStepDenoiser,
    OneStepGenerator,
    TextEncoderComponent,
    VaeDecoderComponent,
    VaeEncoderComponent,
    make_noise,
)
from .options import ONE_STEP  # noqa: F401  (re-exported)


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # "int64" | "float32" (the export's own precision may lower float32 inside)
    dims: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Concrete values of every dimension name, for one pipeline at one image size."""

    batch: int
    sequence: int
    hidden: int
    latent_channels: int
    latent_height: int
    latent_width: int
    height: int
    width: int
    image_channels: int = 3
    one: int = 1  # a literal 1: Apple's hidden states are (batch, hidden, 1, sequence)

    @property
    def moments(self) -> int:
        """Mean and logvar channels of a VAE posterior (Apple's VAEEncoder output)."""
        return 2 * self.latent_channels

    @classmethod
    def of(cls, pipe, batch: int = 1, height: int | None = None, width: int | None = None) -> "Sizes":
        h, w = height or pipe.default_size, width or pipe.default_size
        f = pipe.vae_scale_factor
        return cls(batch=batch, sequence=pipe.tokenizer.model_max_length, hidden=pipe.text_encoder.config.hidden_size,
                   latent_channels=pipe.unet.config.in_channels, latent_height=h // f, latent_width=w // f,
                   height=h, width=w)

    def shape(self, spec: TensorSpec) -> tuple[int, ...]:
        return tuple(getattr(self, d) for d in spec.dims)


def _velocity_unet(pipe) -> torch.nn.Module:
    return _PlainUnet(pipe.unet)


class _PlainUnet(torch.nn.Module):
    """The UNet as optimum exports it (sample, timestep, encoder_hidden_states) → out_sample, for
    N-step use of multi-step models."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


@dataclasses.dataclass(frozen=True)
class ComponentSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    build: Callable  # pipe -> nn.Module in eval mode
    dynamic: tuple[str, ...] = ("batch",)

    def module(self, pipe) -> torch.nn.Module:
        return self.build(pipe).eval()

    def example_inputs(self, pipe, sizes: Sizes, seed: int = 0, prompts: list[str] | None = None) -> tuple[torch.Tensor, ...]:
        """Realistic inputs: real prompts' token ids, N(0,1) noise, reference latents/embeddings."""
        out = []
        for spec in self.inputs:
            shape = sizes.shape(spec)
            if spec.name == "input_ids":
                ps = prompts or EXAMPLE_PROMPTS
                ps = [ps[i % len(ps)] for i in range(shape[0])]
                out.append(pipe.tokenize(ps))
            elif spec.name == "timestep":
                out.append(torch.full(shape, 1000.0))
            elif spec.name == "encoder_hidden_states":
                ps = prompts or EXAMPLE_PROMPTS
                ids = pipe.tokenize([ps[i % len(ps)] for i in range(shape[0])])
                with torch.no_grad():
                    out.append(pipe.text_encoder(ids.to(pipe.device), return_dict=False)[0].float().cpu())
            elif spec.name == "latent_sample":
                # what the decoder really sees: the one-step latents of real prompts, ÷ scaling_factor
                noise = make_noise(list(range(seed, seed + shape[0])), shape[1:])
                ids = pipe.tokenize([(prompts or EXAMPLE_PROMPTS)[i % len(prompts or EXAMPLE_PROMPTS)] for i in range(shape[0])])
                with torch.no_grad():
                    gen = OneStepGenerator.from_pipeline(pipe)
                    lat = gen.denoise(noise.to(pipe.device, pipe.dtype), gen.encode(ids.to(pipe.device)))
                out.append((lat / pipe.scaling_factor).float().cpu())
            elif "image_channels" in spec.dims:  # an image in [-1, 1] (the VAE encoder's input)
                out.append(make_noise(list(range(seed, seed + shape[0])), shape[1:]).mul(0.5).clamp(-1, 1))
            else:  # noise / sample latents
                out.append(make_noise(list(range(seed, seed + shape[0])), shape[1:]))
        return tuple(out)


EXAMPLE_PROMPTS = ["a red fox in snow", "a lighthouse at night", "a cat wearing a hat", "a castle on a mountain"]

_IDS = TensorSpec("input_ids", "int64", ("batch", "sequence"))
_HIDDEN = TensorSpec("encoder_hidden_states", "float32", ("batch", "sequence", "hidden"))
_NOISE = TensorSpec("sample", "float32", ("batch", "latent_channels", "latent_height", "latent_width"))
_LATENT_OUT = TensorSpec("out_sample", "float32", ("batch", "latent_channels", "latent_height", "latent_width"))
_IMAGE = TensorSpec("sample", "float32", ("batch", "image_channels", "height", "width"))
_SPATIAL = ("batch", "latent_height", "latent_width", "height", "width")

COMPONENTS: dict[str, ComponentSpec] = {
    "text_encoder": ComponentSpec(
        "text_encoder", (_IDS,), (TensorSpec("last_hidden_state", "float32", ("batch", "sequence", "hidden")),),
        lambda pipe: TextEncoderComponent(pipe.text_encoder),
    ),
    # the one-step denoiser: UNet at τ = 1000 plus the Euler step; its output is the final latent
    "unet": ComponentSpec(
        "unet", (_NOISE, _HIDDEN), (_LATENT_OUT,), lambda pipe: OneStepDenoiser(pipe.unet), dynamic=_SPATIAL,
    ),
    "vae_decoder": ComponentSpec(
        "vae_decoder",
        (TensorSpec("latent_sample", "float32", ("batch", "latent_channels", "latent_height", "latent_width")),),
        (_IMAGE,), lambda pipe: VaeDecoderComponent(pipe.vae), dynamic=_SPATIAL,
    ),
    # image-to-image: image in [-1, 1] → the posterior mean (× scaling_factor is the UNet's latent)
    "vae_encoder": ComponentSpec(
        "vae_encoder", (_IMAGE,),
        (TensorSpec("latent_sample", "float32", ("batch", "latent_channels", "latent_height", "latent_width")),),
        lambda pipe: VaeEncoderComponent(pipe.vae), dynamic=_SPATIAL,
    ),
    # the whole text→image path as one graph (possible only because the model is one step); image in [0, 1]
    "generator": ComponentSpec(
        "generator", (_IDS, TensorSpec("noise", "float32", _NOISE.dims)),
        (TensorSpec("image", "float32", ("batch", "image_channels", "height", "width")),),
        lambda pipe: OneStepGenerator.from_pipeline(pipe), dynamic=_SPATIAL,
    ),
    # the plain velocity UNet (sample, timestep, encoder_hidden_states), for multi-step models
    "unet_velocity": ComponentSpec(
        "unet_velocity", (_NOISE, TensorSpec("timestep", "float32", ("batch",)), _HIDDEN), (_LATENT_OUT,),
        _velocity_unet, dynamic=_SPATIAL,
    ),
}


