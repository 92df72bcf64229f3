"""The one-step generator and N-step sampling.

``OneStepGenerator`` maps (token ids, noise latents) → image in [0, 1]: text encoder → UNet at
τ = 1000 → ``x = z + v`` → VAE decode of ``x / scaling_factor``. It is built from three component
modules (``TextEncoderComponent``, ``OneStepDenoiser``, ``VaeDecoderComponent``) which are exactly what
the ONNX and Core ML exports trace, one graph each or fused. No Python control flow depends on tensor
values, so tracing is faithful.

``sample`` is the N-step path: the Euler rule of ``flow.py`` for rectified flows (with optional
classifier-free guidance, InstaFlow's ``pipeline_rf.py``) and the model's own diffusers scheduler for
epsilon/v-prediction teachers.
"""

from __future__ import annotations

import torch
from torch import nn

from . import flow


class TextEncoderComponent(nn.Module):
    """Token ids (B, 77) int64 → last hidden states (B, 77, D): what SD1.x conditions on."""

    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids, return_dict=False)[0]


class OneStepDenoiser(nn.Module):
    """Noise latents z and text embeddings → final latents ``z + v(z, τ=1000, text)``."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, noise: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        tau = noise.new_full((noise.shape[0],), flow.TAU_MAX)
        v = self.unet(noise, tau, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]
        return flow.one_step(noise, v)


class VaeDecoderComponent(nn.Module):
    """``latent_sample`` (the UNet's latents already divided by ``scaling_factor``) → image in [-1, 1].

    The division stays outside, as optimum's ORT pipelines and Apple's Swift pipeline expect of a
    ``vae_decoder`` model.
    """

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent_sample, return_dict=False)[0]


class VaeEncoderComponent(nn.Module):
    """Image ``sample`` in [-1, 1] → ``latent_sample``: the VAE posterior's mean, not scaled (a consumer
    multiplies by ``scaling_factor``, as diffusers' image-to-image pipelines do). No sampling: the same
    image gives the same latent on every runtime. A tiny VAE's (AutoencoderTiny) latents as they are."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        out = self.vae.encode(sample, return_dict=True)
        return out.latent_dist.mean if hasattr(out, "latent_dist") else out.latents


def to_unit_range(image: torch.Tensor) -> torch.Tensor:
    """VAE output [-1, 1] → displayable [0, 1] (as diffusers' image processor does)."""
    return (image / 2 + 0.5).clamp(0, 1)


class OneStepGenerator(nn.Module):
    """(token ids (B, 77), noise latents (B, 4, h, w)) → images (B, 3, 8h, 8w) in [0, 1]."""

    def __init__(self, text_encoder: nn.Module, unet: nn.Module, vae: nn.Module, scaling_factor: float):
        super().__init__()
        self.encode = TextEncoderComponent(text_encoder)
        self.denoise = OneStepDenoiser(unet)
        self.decode = VaeDecoderComponent(vae)
        self.scaling_factor = float(scaling_factor)

    @classmethod
    def from_pipeline(cls, pipe) -> "OneStepGenerator":
        return cls(pipe.text_encoder, pipe.unet, pipe.vae, pipe.scaling_factor)

    def forward(self, input_ids: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        latents = self.denoise(noise, self.encode(input_ids))
        return to_unit_range(self.decode(latents / self.scaling_factor))


# ---------------------------------------------------------------------------------------------------
# noise and N-step sampling


def make_noise(seeds: list[int], shape: tuple[int, int, int], device=None, dtype=torch.float32) -> torch.Tensor:
    """One N(0, 1) latent per seed, drawn on the CPU so the same seed gives the same noise on any device."""
    out = []
    for seed in seeds:
        g = torch.Generator("cpu").manual_seed(int(seed))
        out.append(torch.randn(shape, generator=g, dtype=torch.float32))
    return torch.stack(out).to(device=device, dtype=dtype)


def _unet_v(unet, x, tau: float, cond, uncond, guidance: float) -> torch.Tensor:
    """Velocity (or the model's prediction) at UNet time ``tau``; classifier-free guidance only when
    guidance > 1, as InstaFlow's and diffusers' pipelines do."""
    t = x.new_full((x.shape[0],), tau)
    if uncond is None or guidance <= 1.0:
        return unet(x, t, encoder_hidden_states=cond, return_dict=False)[0]
    both = unet(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=torch.cat([uncond, cond]),
                return_dict=False)[0]
    v_u, v_c = both.chunk(2)
    return flow.guided(v_u, v_c, guidance)


@torch.no_grad()
def sample_rectified_flow(unet, noise, cond, num_steps: int = 1, guidance: float = 1.0, uncond=None,
                          callback=None) -> torch.Tensor:
    """InstaFlow's Euler sampler: ``x ← x + v(x, τ_i)/N`` at ``τ_i = (1 - i/N)·1000``. Returns latents."""
    x = noise
    for i, tau in enumerate(flow.euler_schedule(num_steps)):
        v = _unet_v(unet, x, tau, cond, uncond, guidance)
        x = flow.euler_step(x, v, num_steps)
        if callback is not None:
            callback(i, x)
    return x


@torch.no_grad()
def edit_rectified_flow(unet, x1, noise, cond, strength: float, num_steps: int = 1, guidance: float = 1.0,
                        uncond=None) -> torch.Tensor:
    """Image-to-image on the straight path: start at ``s0 = 1 - strength`` between the image latent ``x1``
    and ``noise``, then Euler steps of ``strength / N`` (a one-step model: one step of size ``strength``
    at ``tau = 1000·strength``). ``strength = 1`` is :func:`sample_rectified_flow`."""
    x = flow.edit_start(noise, x1, strength)
    for tau, ds in flow.edit_schedule(strength, num_steps):
        v = _unet_v(unet, x, tau, cond, uncond, guidance)
        x = x + v * ds
    return x


@torch.no_grad()
def encode_images(pipe, images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] → the latents the UNet works on: the VAE posterior's mean (no sampling, so the
    same image gives the same latent on every runtime) × the VAE's scaling factor. A tiny VAE
    (AutoencoderTiny) returns its latents directly (its factor is 1)."""
    return VaeEncoderComponent(pipe.vae)(images.to(pipe.vae.device, pipe.vae.dtype)) * pipe.scaling_factor


@torch.no_grad()
def sample_diffusion(unet, scheduler, noise, cond, num_steps: int = 25, guidance: float = 1.0, uncond=None) -> torch.Tensor:
    """A diffusion (epsilon/v-prediction) model with its own diffusers scheduler, as SD's pipeline does.

    ``noise`` is the same N(0, 1) draw the rectified-flow path uses; it is scaled by the scheduler's
    ``init_noise_sigma`` here, exactly as ``StableDiffusionPipeline.prepare_latents`` does.
    """
    scheduler.set_timesteps(num_steps, device=noise.device)
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        xin = scheduler.scale_model_input(x, t)
        eps = _unet_v(unet, xin, t, cond, uncond, guidance)
        x = scheduler.step(eps, t, x, return_dict=False)[0]
    return x


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str]) -> torch.Tensor:
    ids = pipe.tokenize(prompts).to(pipe.device)
    return pipe.text_encoder(ids, return_dict=False)[0]


@torch.no_grad()
def decode_latents(pipe, latents: torch.Tensor) -> torch.Tensor:
    """Latents → images in [0, 1] (float32)."""
    img = pipe.vae.decode(latents / pipe.scaling_factor, return_dict=False)[0]
    return to_unit_range(img.float())


@torch.no_grad()
def generate_latents(pipe, prompts: list[str], noise: torch.Tensor, num_steps: int, guidance: float = 1.0,
                     negative_prompt: str = "", image_latents: torch.Tensor | None = None,
                     strength: float = 1.0) -> torch.Tensor:
    """Final latents for ``prompts`` from ``noise`` with the sampler the model calls for; with
    ``image_latents`` (rectified flows), an edit of them at ``strength``."""
    cond = encode_prompts(pipe, prompts)
    uncond = encode_prompts(pipe, [negative_prompt] * len(prompts)) if guidance > 1.0 else None
    noise = noise.to(pipe.device, pipe.dtype)
    if pipe.info.flow == "rectified_flow":
        if image_latents is not None:
            return edit_rectified_flow(pipe.unet, image_latents.to(pipe.device, pipe.dtype), noise, cond, strength,
                                       num_steps, guidance, uncond)
        return sample_rectified_flow(pipe.unet, noise, cond, num_steps, guidance, uncond)
    if image_latents is not None:
        raise ValueError("image-to-image is implemented for rectified flows only")
    return sample_diffusion(pipe.unet, pipe.scheduler, noise, cond, num_steps, guidance, uncond)
