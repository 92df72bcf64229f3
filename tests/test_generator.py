"""The one-step generator against hand-written references built from the diffusers components."""

import pytest
import torch

from instaflow_edge.generator import (
    OneStepGenerator,
    decode_latents,
    generate_latents,
    make_noise,
    sample_diffusion,
    sample_rectified_flow,
)


def _ref_one_step(pipe, ids, z):
    enc = pipe.text_encoder(ids).last_hidden_state
    t = torch.full((z.shape[0],), 1000.0)
    v = pipe.unet(z, t, encoder_hidden_states=enc).sample
    x = z + v
    img = pipe.vae.decode(x / pipe.vae.config.scaling_factor).sample
    return (img / 2 + 0.5).clamp(0, 1)


@torch.no_grad()
def test_generator_matches_hand_reference(tiny_pipe):
    ids = tiny_pipe.tokenize(["a red fox in snow", "a lighthouse at night"])
    z = make_noise([0, 1], (4, 8, 8))
    gen = OneStepGenerator.from_pipeline(tiny_pipe).eval()
    out = gen(ids, z)
    ref = _ref_one_step(tiny_pipe, ids, z)
    assert out.shape == (2, 3, 64, 64)
    assert (out - ref).abs().max().item() <= 1e-5
    # and the image is not trivially constant
    assert out.std().item() > 1e-3


@torch.no_grad()
def test_one_step_sampler_equals_generator(tiny_pipe):
    z = make_noise([3], (4, 8, 8))
    lat = generate_latents(tiny_pipe, ["a cat"], z, num_steps=1)
    gen = OneStepGenerator.from_pipeline(tiny_pipe)
    ids = tiny_pipe.tokenize(["a cat"])
    assert torch.allclose(decode_latents(tiny_pipe, lat), gen(ids, z), atol=1e-6)


@torch.no_grad()
def test_n_step_euler_by_hand(tiny_pipe):
    z = make_noise([5], (4, 8, 8))
    cond = tiny_pipe.text_encoder(tiny_pipe.tokenize(["a dog"]))[0]
    got = sample_rectified_flow(tiny_pipe.unet, z, cond, num_steps=3)
    x = z.clone()
    for i in range(3):
        tau = (1 - i / 3) * 1000
        x = x + tiny_pipe.unet(x, torch.tensor([tau]), encoder_hidden_states=cond).sample / 3
    assert torch.allclose(got, x, atol=1e-6)


@torch.no_grad()
def test_cfg_by_hand(tiny_pipe):
    z = make_noise([7], (4, 8, 8))
    enc = lambda p: tiny_pipe.text_encoder(tiny_pipe.tokenize(p))[0]  # noqa: E731
    cond, uncond = enc(["a dog"]), enc([""])
    got = sample_rectified_flow(tiny_pipe.unet, z, cond, num_steps=2, guidance=3.0, uncond=uncond)
    x = z.clone()
    for tau in (1000.0, 500.0):
        t = torch.tensor([tau])
        vc = tiny_pipe.unet(x, t, encoder_hidden_states=cond).sample
        vu = tiny_pipe.unet(x, t, encoder_hidden_states=uncond).sample
        x = x + (vu + 3.0 * (vc - vu)) / 2
    assert torch.allclose(got, x, atol=1e-5)
    # guidance ≤ 1 is no guidance at all
    plain = sample_rectified_flow(tiny_pipe.unet, z, cond, num_steps=2)
    assert torch.allclose(sample_rectified_flow(tiny_pipe.unet, z, cond, 2, 1.0, uncond), plain)


def test_noise_is_per_seed_and_device_independent():
    a = make_noise([1, 2], (4, 8, 8))
    b = make_noise([2], (4, 8, 8))
    assert torch.equal(a[1], b[0])
    assert not torch.equal(a[0], a[1])


@torch.no_grad()
@pytest.mark.parametrize("sched", ["EulerDiscreteScheduler", "DPMSolverMultistepScheduler"])
def test_diffusion_sampler_matches_diffusers_pipeline(tiny_pipe, sched):
    """An epsilon-prediction teacher is sampled exactly as StableDiffusionPipeline samples it."""
    import diffusers
    from diffusers import StableDiffusionPipeline

    scheduler = getattr(diffusers, sched).from_config(tiny_pipe.scheduler.config)
    sd = StableDiffusionPipeline(
        vae=tiny_pipe.vae, text_encoder=tiny_pipe.text_encoder, tokenizer=tiny_pipe.tokenizer, unet=tiny_pipe.unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    sd.set_progress_bar_config(disable=True)
    z = make_noise([11], (4, 8, 8))
    ref = sd("a red fox", latents=z.clone(), num_inference_steps=6, guidance_scale=1.0, output_type="latent").images
    cond = tiny_pipe.text_encoder(tiny_pipe.tokenize(["a red fox"]))[0]
    got = sample_diffusion(tiny_pipe.unet, getattr(diffusers, sched).from_config(tiny_pipe.scheduler.config), z, cond, 6)
    assert torch.allclose(got, ref, atol=1e-5)
    assert not torch.allclose(got, z)
