"""``generate --image FILE --strength S``: image-to-image on the straight path (start at s0 = 1 − S
between the seed's noise and the image's latent, Euler steps of S/N), checked against the arithmetic
written out; bad inputs one line each."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from instaflow_edge.cli import app


def _cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _png(folder):
    (f,) = folder.glob("*.png")
    return np.asarray(Image.open(f)).astype(np.int16)


def _by_hand(pipe, image_path, prompt, seed, strength, steps):
    """The edit written out: encode (posterior mean × factor), x = (1−S)·x1 + S·z, then N Euler steps
    x ← x + (S/N)·v(x, 1000·(1 − s_i)) with s_i = 1 − S + i·S/N, decode, round to 8 bits."""
    from instaflow_edge.data import load_image
    from instaflow_edge.generator import decode_latents, encode_prompts, make_noise

    h = w = pipe.default_size
    img = load_image(image_path, h, w)[None]
    x1 = pipe.vae.encode(img).latent_dist.mean * pipe.vae.config.scaling_factor
    z = make_noise([seed], pipe.latent_shape(h, w))
    cond = encode_prompts(pipe, [prompt])
    x = (1 - strength) * x1 + strength * z
    with torch.no_grad():
        for i in range(steps):
            s = 1 - strength + i * strength / steps
            v = pipe.unet(x, torch.full((1,), 1000 * (1 - s)), encoder_hidden_states=cond, return_dict=False)[0]
            x = x + v * (strength / steps)
    out = decode_latents(pipe, x)
    return (out[0].permute(1, 2, 0).numpy() * 255).round().astype(np.int16)


@pytest.mark.parametrize("strength, steps", [(0.5, 1), (0.3, 4)])
def test_an_edit_is_the_straight_path_arithmetic(strength, steps, tiny_dir, tiny_pipe, source_image, tmp_path):
    r = _cli("generate", tiny_dir, "a red fox", "--image", source_image, "--strength", strength, "--steps", steps,
             "--seed", 7, "-o", tmp_path / "e")
    assert r.exit_code == 0, r.output
    got = _png(tmp_path / "e")
    want = _by_hand(tiny_pipe, source_image, "a red fox", 7, strength, steps)
    assert np.abs(got - want).max() <= 1
    s = json.loads((tmp_path / "e" / "manifest.json").read_text())["sampling"]
    assert s["strength"] == strength and s["start_s"] == pytest.approx(1 - strength) and len(s["taus"]) == steps
    assert s["taus"][0] == pytest.approx(1000 * strength)


def test_strength_one_is_text_to_image_and_a_low_strength_keeps_the_image(tiny_dir, source_image, tmp_path):
    assert _cli("generate", tiny_dir, "a red fox", "--seed", 3, "-o", tmp_path / "t2i").exit_code == 0
    assert _cli("generate", tiny_dir, "a red fox", "--seed", 3, "--image", source_image, "--strength", 1,
                "-o", tmp_path / "s1").exit_code == 0
    assert np.array_equal(_png(tmp_path / "t2i"), _png(tmp_path / "s1"))
    for s in (0.05, 0.9):
        assert _cli("generate", tiny_dir, "a red fox", "--seed", 3, "--image", source_image, "--strength", s,
                    "-o", tmp_path / f"s{s}").exit_code == 0
    # the edit moves away from the seed's text-to-image picture as the strength falls
    d_low = np.abs(_png(tmp_path / "s0.05") - _png(tmp_path / "t2i")).mean()
    d_high = np.abs(_png(tmp_path / "s0.9") - _png(tmp_path / "t2i")).mean()
    assert d_high < d_low


@pytest.mark.parametrize("args, match", [
    (["--strength", "0.5"], "--strength applies to image-to-image"),
    (["--image", "{missing}"], "no such file"),
    (["--image", "{text}"], "cannot read image"),
    (["--image", "{image}", "--strength", "0"], "strength must be"),
    (["--image", "{image}", "--strength", "1.5"], "strength must be"),
])
def test_bad_image_to_image_inputs_are_one_line(args, match, tiny_dir, source_image, tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    args = [a.format(missing=tmp_path / "nope.png", text=text, image=source_image) for a in args]
    r = _cli("generate", tiny_dir, "a red fox", *args, "-o", tmp_path / "out")
    assert r.exit_code != 0 and match in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("strength, steps", [(0.6, 1), (1.0, 1)])
def test_the_onnx_export_edits_as_generate_does(strength, steps, tiny_dir, tiny_onnx_fp32, edit_image):
    """ONNX Runtime over vae_encoder/ and the straight-path UNet graph: the torch backend's image."""
    want = edit_image(tiny_dir, "torch", strength, steps)
    got = edit_image(tiny_onnx_fp32, "onnx", strength, steps)
    assert np.abs(want - got).max() <= 1, np.abs(want - got).max()


def test_an_export_without_an_encoder_refuses_to_edit_in_one_line(tiny_onnx_fp32, source_image, tmp_path):
    """An export made before image-to-image (its manifest lists no vae_encoder): one line, nothing written."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(tiny_onnx_fp32, old)
    m = json.loads((old / "manifest.json").read_text())
    m["onnx"]["components"].remove("vae_encoder")
    m["onnx"].pop("unet_timestep")
    (old / "manifest.json").write_text(json.dumps(m))
    shutil.rmtree(old / "vae_encoder")
    r = _cli("generate", old, "a red fox", "--backend", "onnx", "--image", source_image, "-o", tmp_path / "out")
    assert r.exit_code != 0 and "cannot edit images" in r.output and "convert the model again" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "out").exists()
