"""``convert --target coreml --layout apple`` against Apple's own pipeline, not just our reference.

``tests/peers/apple_swift.py`` transliterates the Swift ``StableDiffusionPipeline`` arithmetic (tokenizer
framing, ``TorchRandomSource``, ``toHiddenStates``, DPM-Solver++ in float32, decoder scaling, CGImage
conversion). Here it runs the modules exactly as the converter traced them (their weights are the
packages' weights: ``weights_match`` in the manifest), in float16 for an fp16 export, and its PNG is
compared with ``generate``'s for the same prompt and seed. The spec test reads every saved package with
coremltools and checks it against Apple's contract, written down as data in the peer module.
"""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("coremltools")

from peers import apple_swift as swift  # noqa: E402

from instaflow_edge.convert import coreml as cm  # noqa: E402
from instaflow_edge.convert import coreml_apple as apple  # noqa: E402
from instaflow_edge.convert import coreml_check as cc  # noqa: E402
from instaflow_edge.convert.config import ConvertConfig, Precision  # noqa: E402
from instaflow_edge.parity import psnr  # noqa: E402

PROMPTS = [("a red fox in snow", 0), ("a lighthouse at night", 3)]
OUTPUTS = {"text_encoder": ["last_hidden_state", "pooled_outputs"], "unet": ["noise_pred"], "vae_decoder": ["image"],
           "vae_encoder": ["latent"]}
FILES = {"TextEncoder": "text_encoder", "Unet": "unet", "VAEDecoder": "vae_decoder", "VAEEncoder": "vae_encoder"}


def _with_scaling_factor(src, dst, factor: float):
    """A copy of a pipeline folder whose VAE has another scaling_factor (the digits preset's is ≈ 1.746)."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "vae" / "config.json").read_text())
    cfg["scaling_factor"] = factor
    (dst / "vae" / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="session")
def digits_scaled_tiny(tmp_path_factory, tiny_dir):
    return _with_scaling_factor(tiny_dir, tmp_path_factory.mktemp("models") / "tiny-sf", 1.746)


@pytest.fixture(scope="session")
def apple_fp32(tmp_path_factory, digits_scaled_tiny):
    """An fp32 Apple-layout export (original attention) of a tiny model with scaling_factor 1.746, and the
    modules the converter traced."""
    out = tmp_path_factory.mktemp("coreml-apple") / "fp32"
    traced: dict = {}
    manifest = cm.export_coreml(ConvertConfig.of("coreml", model=str(digits_scaled_tiny), output=str(out),
                                              precision="fp32"), traced=traced)
    return out, manifest, traced


def _predict(module, names: list[str], inputs: list[str], precision: Precision):
    """``MLModel.prediction`` stood in for by ``module`` as the package computes it."""
    shipped, cast = cm.as_shipped(module, precision)

    def predict(feed: dict) -> dict:
        xs = tuple(torch.from_numpy(np.ascontiguousarray(feed[n])) for n in inputs)
        with torch.no_grad():
            out = shipped(*cast(xs))
        out = out if isinstance(out, tuple) else (out,)
        return {n: o.float().numpy() for n, o in zip(names, out)}

    return predict


def _swift_image(export, traced: dict, precision: Precision, prompt: str, seed: int, **kw) -> dict:
    tok = swift.BPETokenizer(export / "merges.txt", export / "vocab.json")
    models = {n: _predict(traced[n], OUTPUTS[n], [t.name for t in apple.SPECS[n].inputs], precision) for n in OUTPUTS}
    m = json.loads((export / "manifest.json").read_text())
    shape = (1, m["latent"]["channels"], *(s // m["latent"]["vae_scale_factor"] for s in m["image_sizes"][0]))
    return swift.generate_images(models["text_encoder"], models["unet"], models["vae_decoder"], tok, prompt, seed=seed,
                                 latent_shape=shape, encoder=models["vae_encoder"], **kw)


def _generate_png(tmp_path, model, prompt: str, seed: int, guidance: float = 1.0, **kw) -> np.ndarray:
    from PIL import Image

    from instaflow_edge.generate import GenerateConfig, generate

    out = tmp_path / f"gen-{seed}-{guidance}-{kw.get('strength')}"
    m = generate(GenerateConfig(model=str(model), prompts=[prompt], output=str(out), seed=seed, guidance=guidance,
                                device="cpu", dtype="float32", **kw), progress=False)
    return np.asarray(Image.open(out / m["images"][0]["file"]).convert("RGB"))


def _psnr8(a: np.ndarray, b: np.ndarray) -> float:
    return psnr(a.astype(np.float64), b.astype(np.float64), peak=255.0)


# ---------------------------------------------------------------------------------------------------
# the scheduler constants


def test_one_step_constants_are_apples():
    """The converter's timestep, α and σ are the Swift DPM-Solver++'s at stepCount 1, bit for bit."""
    s = swift.DPMSolverMultistepScheduler(step_count=1)
    t = s.time_steps[0]
    assert s.time_steps == [apple.ONE_STEP["timestep"]] == [999]
    assert s.alpha_t[t] == apple.ONE_STEP["alpha"] and s.sigma_t[t] == apple.ONE_STEP["sigma"]
    assert abs(float(s.alpha_t[t]) - 0.0682648) < 1e-7 and abs(float(s.sigma_t[t]) - 0.9976673) < 1e-7
    assert swift.DPMSolverMultistepScheduler(step_count=25).time_steps[:2] == [999, 959]  # linspace(0, 999, 26), reversed


def test_eps_hat_round_trips_through_the_scheduler():
    """DPM-Solver++'s x0 of ε̂ is x + v to float32 rounding (amplified by 1/α), however large v is."""
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(2, 4, 64, 64, generator=g), 3 * torch.randn(2, 4, 64, 64, generator=g)
    eps = apple.eps_hat(x, v, float(apple.ONE_STEP["alpha"]), float(apple.ONE_STEP["sigma"]))
    s = swift.DPMSolverMultistepScheduler(step_count=1)
    x0 = s.convert_model_output(eps.numpy(), 999, x.numpy())
    err = np.abs(x0 - (x + v).numpy()).max()
    assert err < 40 * np.finfo(np.float32).eps * float((x + v).abs().max())  # a few ulps × 1/α
    assert psnr((x + v).numpy(), x0) > 120


# ---------------------------------------------------------------------------------------------------
# the packages against Apple's contract


def _check_contract(export, pipe_sizes: dict) -> None:
    for file, name in FILES.items():
        got = cc.io(cc.load(export / f"{file}.mlpackage"))
        enumerated = any(f["enumerated"] for f in got["inputs"])
        want = swift.CONTRACT[file]
        for side in ("inputs", "outputs"):
            assert [f["name"] for f in got[side]] == [n for n, _, _ in want[side]], (file, side)
            for f, (n, dims, dtypes) in zip(got[side], want[side]):
                flexible = side == "outputs" and not f["shape"] and enumerated  # sized by the input's shape
                assert flexible or f["shape"] == swift.resolve(dims, pipe_sizes), (file, n, f["shape"])
                assert f["dtype"] in dtypes, (file, n, f["dtype"])
                assert f["dtype"] == "FLOAT32", (file, n)  # our choice within the contract: see coreml_apple.py
    names = {p.name for p in export.iterdir()}
    assert {r.replace(".mlmodelc", ".mlpackage") for r in swift.RESOURCES} <= names


def _sizes(pipe, height: int, width: int) -> dict:
    f = pipe.vae_scale_factor
    return {"B": 1, "S": 77, "C": pipe.text_encoder.config.hidden_size, "h": height // f, "w": width // f,
            "H": height, "W": width}


def test_fp32_packages_meet_apples_contract(apple_fp32, tiny_pipe):
    export, manifest, _ = apple_fp32
    _check_contract(export, _sizes(tiny_pipe, 64, 64))
    assert manifest["layout"] == "apple" and manifest["config"]["options"]["layout"] == "apple"
    assert manifest["scheduler"]["scheduler"] == "dpmpp" and manifest["scheduler"]["step_count"] == 1
    assert manifest["scheduler"]["timestep"] == 999 and manifest["scheduler"]["model_scaling_factor"] == 1.746
    meta = cc.load(export / "Unet.mlpackage").user_defined_metadata
    assert meta["layout"] == "apple" and meta["scheduler"] == "dpmpp" and meta["timestep"] == "999"


def test_fp16_split_einsum_packages_meet_apples_contract(coreml_run, tiny_pipe):
    """The session's default export (fp16, split-einsum, two sizes): the contract at the default size, the
    ε̂ arithmetic kept fp32 inside the fp16 program, and both figures of it in the manifest."""
    export, _, _ = coreml_run
    _check_contract(export, _sizes(tiny_pipe, 64, 64))
    m = json.loads((export / "manifest.json").read_text())
    unet = m["components"]["unet"]
    assert unet["ops"].get("einsum", 0) > 0 and "matmul" not in unet["ops"]
    tail = [t for t in unet["output_tail"] if t["op"] != "cast"]
    assert tail and all(t["dtype"] == "FLOAT32" for t in tail), unet["output_tail"]
    ft = unet["fp16_tail"]
    assert ft["x0_psnr_tail_fp32"] > ft["x0_psnr_tail_fp16"]  # what keeping the tail fp32 buys


# ---------------------------------------------------------------------------------------------------
# the peer: Apple's pipeline arithmetic on the modules as converted, against `generate`


def test_swift_pipeline_on_fp32_modules_matches_generate(apple_fp32, digits_scaled_tiny, tmp_path):
    """≥ 60 dB for fp32 modules, with the model's scaling_factor (1.746) folded into the VAEDecoder: the
    Swift pipeline's own tokenizer, noise (--rng torch), DPM-Solver++ step and 8-bit conversion."""
    export, _, traced = apple_fp32
    assert set(traced) == set(OUTPUTS)
    for prompt, seed in PROMPTS:
        ours = _generate_png(tmp_path, digits_scaled_tiny, prompt, seed)
        theirs = _swift_image(export, traced, Precision.fp32, prompt, seed)
        assert theirs["timesteps"] == [999]
        assert _psnr8(ours, theirs["image"]) >= 60.0, (prompt, _psnr8(ours, theirs["image"]))
        fused = _swift_image(export, traced, Precision.fp32, prompt, seed, fused=True)  # an fma in convertModelOutput
        assert _psnr8(ours, fused["image"]) >= 60.0


def test_swift_image_to_image_on_fp32_modules_matches_generate(apple_fp32, digits_scaled_tiny, tmp_path):
    """Apple's image to image (``--image START --strength S --step-count N`` with one step left): its
    planarRGBShapedArray, Encoder.encode (sampling from our VAEEncoder's floor logvar), addNoise on its VP
    schedule, then the Unet and DPM-Solver++ at timestep t, give ``generate --image START --strength
    σ_t/(α_t + σ_t)``'s image (≥ 40 dB, fp32)."""
    from PIL import Image

    export, _, traced = apple_fp32
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:64, 0:64]
    start = (np.stack([xx * 4, yy * 4, (xx + yy) * 2], -1) % 256 + rng.integers(0, 30, (64, 64, 3))).clip(0, 255).astype(np.uint8)
    path = tmp_path / "start.png"
    Image.fromarray(start).save(path)
    prompt, seed = PROMPTS[0]
    text_to_image = _generate_png(tmp_path, digits_scaled_tiny, prompt, seed)
    for steps, strength, t in ((2, 0.5, 500), (4, 0.3, 250), (5, 0.25, 200)):
        assert apple.img2img_timesteps(steps, strength) == [t]
        theirs = _swift_image(export, traced, Precision.fp32, prompt, seed, starting_image=start, strength=strength,
                              step_count=steps)
        assert theirs["timesteps"] == [t]
        s = apple.straight_strength(t)
        ours = _generate_png(tmp_path, digits_scaled_tiny, prompt, seed, image=str(path), strength=s)
        db = _psnr8(ours, theirs["image"])
        print(f"steps {steps} strength {strength}: t = {t}, generate --strength {s:.6f}: {db:.2f} dB")
        assert db >= 40.0, (steps, strength, t, s, db)
        assert _psnr8(ours, text_to_image) < 40.0  # and the edit is an edit, not the text-to-image picture
    # text to image is untouched by the timestep lookup (t = 999: the noise itself, one step of size 1)
    assert swift.DPMSolverMultistepScheduler(1).calculate_timesteps(None) == [999]


def test_swift_guidance_is_instaflows_guidance(apple_fp32, digits_scaled_tiny, tmp_path):
    """--guidance-scale G ≥ 1 (two Unet calls, guidance on ε̂) is generate --guidance G."""
    export, _, traced = apple_fp32
    prompt, seed = PROMPTS[0]
    ours = _generate_png(tmp_path, digits_scaled_tiny, prompt, seed, guidance=3.0)
    theirs = _swift_image(export, traced, Precision.fp32, prompt, seed, guidance_scale=3.0)
    assert _psnr8(ours, theirs["image"]) >= 60.0


def test_swift_pipeline_on_fp16_modules(coreml_run, tiny_dir, tmp_path):
    """The fp16 export (split-einsum), its modules run in float16 as shipped (ε̂ tail fp32): the figure is
    the fp16 cost, written to the test output; the gate is the export's own (35 dB)."""
    export, _, traced = coreml_run
    figures = []
    for prompt, seed in PROMPTS:
        ours = _generate_png(tmp_path, tiny_dir, prompt, seed)
        theirs = _swift_image(export, traced, Precision.fp16, prompt, seed)
        figures.append(_psnr8(ours, theirs["image"]))
    print(f"fp16 Apple-layout image vs generate (fp32): {', '.join(f'{f:.1f} dB' for f in figures)}")
    assert min(figures) >= 35.0


def test_swift_tokenizer_and_noise_match_ours(tiny_dir, tiny_pipe):
    """What the Swift pipeline makes of a prompt and a seed: the same ids for plain lower-case words (its
    BPE splits on spaces only: punctuation and digits tokenize differently, and a prompt over 75 tokens
    loses its <|endoftext|>), and --rng torch noise within float rounding of generate's."""
    from instaflow_edge.generator import make_noise

    tok = swift.BPETokenizer(tiny_dir / "tokenizer" / "merges.txt", tiny_dir / "tokenizer" / "vocab.json")
    for p in ("a red fox in snow", "  A Lighthouse at NIGHT "):
        assert swift.text_encoder_ids(tok, p) == tiny_pipe.tokenize([p])[0].tolist()
    for p in ("a cat, wearing a hat", "the number 42"):
        assert swift.text_encoder_ids(tok, p) != tiny_pipe.tokenize([p])[0].tolist()
    long = " ".join(["fox"] * 80)
    ids = swift.text_encoder_ids(tok, long)
    assert len(ids) == 77 and ids[-1] != tok.vocabulary[tok.end_token]
    for seed, shape in ((0, (4, 8, 8)), (7, (4, 64, 64))):
        theirs = swift.TorchRandomSource(seed).normal_shaped_array((1, *shape)).astype(np.float32)
        ours = make_noise([seed], shape).numpy()
        assert np.abs(theirs - ours).max() < 4e-6  # Box-Muller in double (Swift) vs float (torch)


@pytest.mark.macos
@pytest.mark.skipif(sys.platform != "darwin", reason="Core ML prediction needs macOS")
def test_macos_swift_pipeline_on_the_packages(coreml_run, tiny_dir, tmp_path):
    """On a Mac: the same transliteration with the real packages predicting (fp16, split-einsum)."""
    import coremltools as ct

    export, _, _ = coreml_run
    models = {}
    for file, name in FILES.items():
        ml = ct.models.MLModel(str(export / f"{file}.mlpackage"))
        models[name] = lambda feed, ml=ml: ml.predict({k: np.asarray(v, dtype=np.float32) for k, v in feed.items()})
    tok = swift.BPETokenizer(export / "merges.txt", export / "vocab.json")
    for prompt, seed in PROMPTS:
        ours = _generate_png(tmp_path, tiny_dir, prompt, seed)
        theirs = swift.generate_images(models["text_encoder"], models["unet"], models["vae_decoder"], tok, prompt,
                                       seed=seed, latent_shape=(1, 4, 8, 8))
        assert _psnr8(ours, theirs["image"]) >= 30.0


# ---------------------------------------------------------------------------------------------------
# bad input


def _with_info(src, dst, **model):
    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    m["model"] = {**m.get("model", {}), **model}
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


@pytest.mark.parametrize("info,needles", [
    ({"default_steps": 32}, ["--layout apple runs one step", "32 steps", "train distill", "--layout native"]),
    ({"flow": "diffusion", "default_steps": 25}, ["diffusion model", "torch2coreml", "--layout native"]),
])
def test_apple_layout_refuses_a_model_it_cannot_run(tmp_path, tiny_dir, info, needles):
    from typer.testing import CliRunner

    from instaflow_edge.cli import app

    model = _with_info(tiny_dir, tmp_path / "m", **info)
    r = CliRunner().invoke(app, ["convert", str(model), "--target", "coreml", "-o", str(tmp_path / "o")])
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
    assert r.exit_code != 0 and len(lines) == 1 and lines[0].startswith("error:"), r.output
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert not (tmp_path / "o").exists()
