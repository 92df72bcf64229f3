"""train decoder on the tiny preset: a pipeline whose vae is a distilled AutoencoderTiny (TAESD's
latent convention, scaling_factor 1.0) that generate and convert (ONNX and Core ML) take unchanged, with
counted decoder MACs; bad inputs as one line with nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Eight 64×64 images with captions (the training images whose latents the decoder learns)."""
    import numpy as np
    from PIL import Image

    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(8):
        a = (rng.random((64, 64, 3)) * 255).astype("uint8")
        Image.fromarray(a).save(folder / f"{i}.png")
        rows.append(json.dumps({"file": f"{i}.png", "text": "a red fox" if i % 2 else "a blue cat"}))
    (folder / "captions.jsonl").write_text("\n".join(rows) + "\n")
    return folder


@pytest.fixture(scope="module")
def tiny_dec(tmp_path_factory, tiny_dir, images) -> tuple[Path, dict]:
    from instaflow_edge.train.decoder import DecoderConfig, train_decoder

    out = tmp_path_factory.mktemp("dec") / "tiny-dec"
    m = train_decoder(DecoderConfig(model=str(tiny_dir), output=str(out), data=str(images), channels="8,8,8,8",
                                    blocks="1,1,1,1", one_step_latents=8, max_steps=30, batch_size=4,
                                    learning_rate=3e-3, progress=False))
    return out, m


def test_decoder_pipeline_layout_and_figures(tiny_dec, tiny_dir):
    from diffusers import AutoencoderTiny

    from instaflow_edge.pipeline import load_pipeline

    out, m = tiny_dec
    index = json.loads((out / "model_index.json").read_text())
    assert index["vae"] == ["diffusers", "AutoencoderTiny"]
    vae_cfg = json.loads((out / "vae" / "config.json").read_text())
    assert vae_cfg["scaling_factor"] == 1.0 and vae_cfg["decoder_block_out_channels"] == [8, 8, 8, 8]
    assert [p.suffix for p in (out / "vae").iterdir() if p.suffix != ".json"] == [".safetensors"]
    pipe = load_pipeline(out)
    assert isinstance(pipe.vae, AutoencoderTiny) and pipe.vae_scale_factor == 8 and pipe.scaling_factor == 1.0
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == \
        (tiny_dir / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    d = m["decoder"]
    assert d["after"]["macs_per_image"] < d["before"]["macs_per_image"] and d["macs_ratio"] > 1
    assert d["final_loss"] < d["first_loss"]  # it learns the full decoder's map
    assert d["image_latents"] == 8 and d["one_step_latents"] == 8


def test_tiny_decoder_learns_the_full_decoders_images(tiny_dec, tiny_dir):
    """On the model's own one-step latents, the trained tiny decoder is closer to the full decoder's image
    than an untrained one (the latent convention is right: decode(x / 1.0) ≈ full.decode(x / sf))."""
    import torch
    from diffusers import AutoencoderTiny

    from instaflow_edge.generator import decode_latents, generate_latents
    from instaflow_edge.pipeline import load_pipeline

    full, tiny = load_pipeline(tiny_dir), load_pipeline(tiny_dec[0])
    noise = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(123))
    lat = generate_latents(full, ["a red fox"] * 4, noise, 1)
    ref, got = decode_latents(full, lat), decode_latents(tiny, lat)
    torch.manual_seed(0)
    untrained = AutoencoderTiny(**{k: v for k, v in tiny.vae.config.items() if not k.startswith("_") and k != "block_out_channels"})
    with torch.no_grad():
        raw = (untrained.decode(lat, return_dict=False)[0].float() / 2 + 0.5).clamp(0, 1)
    assert torch.mean((got - ref) ** 2) < torch.mean((raw - ref) ** 2)


def test_decoder_pipeline_generates_and_converts(tmp_path, tiny_dec):
    from typer.testing import CliRunner

    from instaflow_edge.cli import app

    out = tiny_dec[0]
    run = lambda *a: CliRunner().invoke(app, [str(x) for x in a])  # noqa: E731
    r = run("generate", out, "a red fox", "-o", tmp_path / "g")
    assert r.exit_code == 0, r.output
    r = run("convert", out, "--target", "onnx", "-o", tmp_path / "onnx")
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "onnx" / "manifest.json").read_text())
    parity = {row["component"]: row for row in m["parity"]}
    assert parity["vae_decoder"]["psnr"] >= 60 and parity["end_to_end"]["psnr"] >= 60
    r = run("generate", tmp_path / "onnx", "a red fox", "-o", tmp_path / "g-onnx", "--backend", "onnx")
    assert r.exit_code == 0, r.output
    r = run("convert", out, "--target", "coreml", "-o", tmp_path / "cml")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "cml" / "VAEDecoder.mlpackage").is_dir()
    assert json.loads((tmp_path / "cml" / "manifest.json").read_text())["end_to_end"]["psnr"] >= 35


def test_decoder_bad_inputs_are_one_line(tmp_path, tiny_dec, tiny_dir, images):
    from typer.testing import CliRunner

    from instaflow_edge.cli import app

    (tmp_path / "work").mkdir()
    (tmp_path / "notpipe").mkdir()
    out = tmp_path / "work" / "o"
    cases = [
        (["train", "decoder", tiny_dec[0], "-o", out, "--data", images], "vae is an AutoencoderTiny, not an AutoencoderKL"),
        (["train", "decoder", tiny_dir, "-o", out, "--data", images, "--channels", "8,16,8,8"], "one width"),
        (["train", "decoder", tiny_dir, "-o", out, "--data", images, "--channels", "8,8"], "needs 4 stages"),
        (["train", "decoder", tiny_dir, "-o", out, "--data", tmp_path / "nope"], "does not exist"),
        (["train", "decoder", tmp_path / "notpipe", "-o", out], "no model_index.json"),
    ]
    for args, needle in cases:
        r = CliRunner().invoke(app, [str(a) for a in args])
        lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
        assert r.exit_code != 0 and len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], (args, r.output)
        assert list((tmp_path / "work").iterdir()) == [], (args, list((tmp_path / "work").iterdir()))


def test_large_latents_train_on_crops_in_micro_batches(tmp_path, tiny_dir, images, monkeypatch):
    """At SD's size a step sees latent crops (and their image crops), micro-batched, with gradient
    checkpointing: forced here on tiny by a crop of 4 latents (32 px) and a 1-image micro-batch budget."""
    import instaflow_edge.train.decoder as dec
    from instaflow_edge.train import teacher

    monkeypatch.setattr(dec, "CROP", 4)
    calls = []
    real = teacher.chunk_size
    monkeypatch.setattr(dec, "chunk_size", lambda px, megapixels=1.0, most=64: calls.append((px, megapixels)) or
                        (1 if megapixels < 1 else real(px, megapixels, most)))
    out = tmp_path / "cropped"
    m = dec.train_decoder(dec.DecoderConfig(model=str(tiny_dir), output=str(out), data=str(images), channels="8,8,8,8",
                                            blocks="1,1,1,1", one_step_latents=4, held_out=2, max_steps=3, batch_size=3,
                                            progress=False))
    assert (32 * 32, 0.25) in calls  # the micro-batch was sized for a 32² crop
    d = m["decoder"]
    assert d["steps"] == 3 and d["first_loss"] > 0 and d["held_out_psnr_db"] > 0
    assert (out / "vae" / "config.json").is_file()


def test_a_decoder_run_prints_no_library_import_chatter(tmp_path, tiny_dir, images):
    """torchao's kernels that cannot load on a CPU and torch's pytree notices stay out of its stderr."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "instaflow_edge.cli", "train", "decoder", str(tiny_dir), "-o",
                        str(tmp_path / "d"), "--data", str(images), "--channels", "8,8,8,8", "--blocks", "1,1,1,1",
                        "--one-step-latents", "1", "--max-steps", "1", "--batch-size", "2",
                        "--no-progress"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for noise in ("torchao", "_pytree", "Failed to load", "Unable to import"):
        assert noise not in r.stderr, r.stderr
