"""The ``digits`` preset: architecture, tokenizer, the VAE trained in the build, manifest, determinism.

The full build (600 VAE steps, minutes) is marked slow; the fast tests shorten the VAE training.
"""

import json

import pytest
import torch

from instaflow_edge.data import eval_prompts
from instaflow_edge.digits import preset as digits
from instaflow_edge.digits.preset import DigitsPresetConfig, build_digits
from instaflow_edge.presets import Built, InitConfig, count_params, init

FAST = DigitsPresetConfig(vae_steps=4, vae_batch_size=8, text_steps=3, text_batch_size=16)


@pytest.fixture(scope="module")
def built():
    return build_digits(0, FAST, progress=False)


def test_architecture(built):
    pipe = built.pipeline
    assert isinstance(built, Built)
    assert 1_000_000 <= count_params(pipe.unet) <= 5_000_000
    assert pipe.unet.config.sample_size == 8 and pipe.default_size == 32 and pipe.vae_scale_factor == 4
    assert pipe.info.flow == "rectified_flow" and pipe.info.default_steps == 32
    x = torch.zeros(2, 3, 32, 32)
    with torch.no_grad():
        z = pipe.vae.encode(x).latent_dist.mean
        assert z.shape == (2, 4, 8, 8)
        assert pipe.vae.decode(z).sample.shape == (2, 3, 32, 32)
    assert not any(p.requires_grad for m in (pipe.unet, pipe.vae, pipe.text_encoder) for p in m.parameters())


def test_tokenizer_covers_the_prompts(built):
    tok = built.pipeline.tokenizer
    for p, _ in eval_prompts(8):
        assert len(tok(p).input_ids) - 2 == len(p.replace(",", " ,").split()), p


def test_vae_training_fields(built):
    info = built.manifest["vae_training"]
    assert info["steps"] == FAST.vae_steps
    assert info["scaling_factor"] == pytest.approx(built.pipeline.scaling_factor)
    assert info["scaling_factor"] == pytest.approx(1 / info["latent_std_unscaled"], rel=1e-3)
    assert info["val_psnr_db"] > 0


def test_scaled_latents_have_unit_std(built):
    from instaflow_edge.data import digits_dataset

    ds = digits_dataset("train")
    x = torch.stack([ds[i]["image"] for i in range(len(ds))])
    with torch.no_grad():
        z = built.pipeline.vae.encode(x).latent_dist.mean * built.pipeline.scaling_factor
    assert float(z.std()) == pytest.approx(1.0, abs=1e-3)


def test_same_seed_same_weights(built):
    again = build_digits(0, FAST, progress=False)
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(built.pipeline, name).state_dict(), getattr(again.pipeline, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert again.manifest["vae_training"]["val_psnr_db"] == built.manifest["vae_training"]["val_psnr_db"]


def test_init_writes_vae_figures_into_manifest(tmp_path, monkeypatch, capfd):
    monkeypatch.setattr(digits, "DigitsPresetConfig", lambda: FAST)
    out = tmp_path / "d"
    init(InitConfig(preset="digits", output=str(out), seed=1, progress=False))
    err = capfd.readouterr().err
    assert "digits VAE" not in err and "text encoder" not in err  # --no-progress: no bars
    m = json.loads((out / "manifest.json").read_text())
    assert m["preset"] == "digits" and m["model"]["default_steps"] == 32
    assert m["vae_training"]["steps"] == FAST.vae_steps and "val_psnr_db" in m["vae_training"]
    from instaflow_edge.pipeline import load_pipeline

    pipe = load_pipeline(out)
    assert pipe.scaling_factor == pytest.approx(m["vae_training"]["scaling_factor"])
    assert pipe.info.default_steps == 32


def test_text_encoder_pretraining_separates_the_digits():
    """A random CLIP text tower encodes the template, not the digit (same-digit prompts in different
    templates are *less* alike than different digits in one template); the tiny-CLIP pretraining of the
    build turns that around, and leaves the tower frozen."""
    from instaflow_edge.data import prompt_vocabulary
    from instaflow_edge.pipeline import ModelInfo
    from instaflow_edge.presets import _assemble, _tokenizer

    pipe = _assemble(0, _tokenizer(prompt_vocabulary()), digits.TEXT_CFG, digits.UNET_CFG, digits.VAE_CFG, ModelInfo())
    info = digits.train_text_encoder(pipe, DigitsPresetConfig(text_steps=80, text_batch_size=64), 4, progress=False)
    before, after = info["separation_before"], info["separation_after"]
    assert before["different_digit_cosine"] > before["same_digit_cosine"]
    assert after["same_digit_cosine"] > 0.8 and after["different_digit_cosine"] < 0.3, info
    assert after == digits.prompt_separation(pipe)
    assert not any(p.requires_grad for p in pipe.text_encoder.parameters()) and not pipe.text_encoder.training


def test_text_steps_zero_keeps_the_random_tower(built):
    from instaflow_edge.data import prompt_vocabulary
    from instaflow_edge.pipeline import ModelInfo
    from instaflow_edge.presets import _assemble, _tokenizer

    pipe = _assemble(0, _tokenizer(prompt_vocabulary()), digits.TEXT_CFG, digits.UNET_CFG, digits.VAE_CFG, ModelInfo())
    ref = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    info = digits.train_text_encoder(pipe, DigitsPresetConfig(text_steps=0), 4, progress=False)
    assert info["steps"] == 0 and info["separation_after"] == info["separation_before"]
    assert all(torch.equal(ref[k], v) for k, v in pipe.text_encoder.state_dict().items())
    assert built.manifest["text_encoder_training"]["steps"] == FAST.text_steps


def test_bad_config():
    from instaflow_edge.errors import InputError

    with pytest.raises(InputError, match="vae_steps"):
        build_digits(0, DigitsPresetConfig(vae_steps=0))
    with pytest.raises(InputError, match="text_steps"):
        build_digits(0, DigitsPresetConfig(text_steps=-1))


@pytest.mark.slow
def test_full_digits_build(tmp_path):
    """The real preset: its VAE reconstructs the held-out digits well."""
    out = tmp_path / "digits"
    init(InitConfig(preset="digits", output=str(out)))
    m = json.loads((out / "manifest.json").read_text())
    assert m["vae_training"]["val_psnr_db"] >= 28.0
