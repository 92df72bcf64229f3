"""The digits judge, the Fréchet distance, and `eval` (Python verb and CLI).

The judge is trained once per test session into a session cache (``judge_cache`` in conftest.py).
"""

import importlib.util
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from instaflow_edge.cli import app
from instaflow_edge.digits.metrics import feature_stats, fid, frechet_distance
from instaflow_edge.errors import InputError

runner = CliRunner()


@pytest.fixture(scope="module")
def judge(judge_cache):
    from instaflow_edge.digits.judge import load_judge

    return load_judge(progress=False)


@pytest.fixture(scope="module")
def val_images():
    from instaflow_edge.data import digits_dataset

    ds = digits_dataset("validation")
    return torch.stack([ds[i]["image"] for i in range(len(ds))]), torch.tensor(ds.labels)


def test_judge_accuracy_and_features(judge, val_images):
    x, y = val_images
    acc = float((judge.predict(x) == y).double().mean())
    assert acc >= 0.97 and acc == pytest.approx(judge.val_accuracy)
    f = judge.features(x)
    assert f.shape == (len(x), judge.config.feature_dim) and f.dtype == torch.float64
    assert judge.logits(x[:3]).shape == (3, 10)
    # other sizes and gray images are accepted (resized / repeated)
    big = torch.nn.functional.interpolate(x[:20], size=64, mode="bilinear")
    assert (judge.predict(big) == y[:20]).double().mean() >= 0.9
    assert torch.equal(judge.predict(x[:20, :1]), judge.predict(x[:20]))


def test_judge_is_cached_and_rebuilt_when_corrupt(judge, judge_cache):
    from instaflow_edge.digits.judge import judge_path, load_judge

    path = judge_path()
    assert path.is_file() and path.parent == judge_cache
    again = load_judge(progress=False)
    for k, v in judge.model.state_dict().items():
        assert torch.equal(v, again.model.state_dict()[k])
    assert not [p for p in judge_cache.iterdir() if p.name.startswith(".")]  # no temp file left


def test_judge_is_deterministic():
    """Two trainings with the same config give the same weights (short config: seconds)."""
    from instaflow_edge.digits.judge import JudgeConfig, train_judge

    cfg = JudgeConfig(epochs=1, width=8, feature_dim=16)
    a, b = train_judge(cfg, progress=False), train_judge(cfg, progress=False)
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k]), k
    assert JudgeConfig().key() != cfg.key()


def test_frechet_distance():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 8))
    assert abs(fid(a, a)) < 1e-6
    assert fid(a, a + 0.5) == pytest.approx(8 * 0.25, rel=1e-6)  # a pure mean shift: |Δμ|²
    b = rng.normal(size=(500, 8)) * 2.0
    assert fid(a, b) > 1.0
    # against the closed form for diagonal covariances: Σ (σ1 - σ2)² + |Δμ|²
    mu, s1, s2 = np.zeros(3), np.diag([1.0, 4.0, 9.0]), np.diag([4.0, 4.0, 1.0])
    assert frechet_distance(mu, s1, mu + 1, s2) == pytest.approx(1 + 0 + 4 + 3, rel=1e-9)
    # a singular covariance (a dead feature) still gives a finite, real distance
    c = a.copy()
    c[:, 0] = 0.0
    assert np.isfinite(fid(c, a)) and fid(c, a) > 0.5
    with pytest.raises(ValueError):
        feature_stats(a[:1])


def test_real_ceiling(judge_cache):
    from instaflow_edge.digits.evaluate import EvalConfig, evaluate

    r = evaluate(EvalConfig(real_only=True, num_images=200), progress=False)
    real = r["real"]
    assert real["accuracy"] >= 0.97 and min(real["per_digit"]) >= 0.9
    assert real["n"] == r["reference"]["n"] == 270 and real["fid_n"] == 200
    assert 0 < real["fid"] < 20 and "generated" not in r


def test_eval_tiny_model_cli(tmp_path, tiny_dir, judge_cache):
    out = tmp_path / "e.json"
    r = runner.invoke(app, ["eval", str(tiny_dir), "-n", "40", "--steps", "2", "--guidance", "1.5", "--json", str(out)])
    assert r.exit_code == 0, r.output
    assert "prompt accuracy" in r.output and "ceiling" in r.output
    m = json.loads(out.read_text())
    assert m["kind"] == "eval" and m["config"]["num_images"] == 40
    g = m["generated"]
    assert g["n"] == 40 and len(g["per_digit"]) == 10 and 0 <= g["accuracy"] <= 1
    assert m["sampling"]["steps"] == 2 and m["sampling"]["guidance"] == 1.5
    # a random-weight model draws noise, far from the digits: its FID dwarfs the ceiling's
    assert g["fid"] > 5 * m["real"]["fid"]
    # fixed prompts and seeds: the same call gives the same figures
    r2 = runner.invoke(app, ["eval", str(tiny_dir), "-n", "40", "--steps", "2", "--guidance", "1.5", "--json", str(out)])
    assert r2.exit_code == 0 and json.loads(out.read_text())["generated"] == g


def test_eval_coreml_compression_cli(tmp_path, tiny_dir, judge_cache):
    pytest.importorskip("coremltools")
    out, plain = tmp_path / "c.json", tmp_path / "p.json"
    r = runner.invoke(app, ["eval", str(tiny_dir), "-n", "20", "--coreml-compress", "palettize-4", "--json", str(out)])
    assert r.exit_code == 0, r.output
    assert "Core ML palettize-4" in r.output
    m = json.loads(out.read_text())
    comp = m["coreml_compression"]
    assert comp["scheme"] == "palettize-4" and set(comp["components"]) == {"text_encoder", "unet", "vae_decoder"}
    assert runner.invoke(app, ["eval", str(tiny_dir), "-n", "20", "--json", str(plain)]).exit_code == 0
    p = json.loads(plain.read_text())
    assert "coreml_compression" not in p
    assert m["generated"]["fid"] != p["generated"]["fid"]  # the compressed weights draw other images
    assert m["real"] == p["real"]


def test_eval_onnx_backend_matches_torch(tmp_path, tiny_dir, judge_cache):
    pytest.importorskip("onnxruntime")
    export = tmp_path / "onnx"
    r = runner.invoke(app, ["convert", str(tiny_dir), "--target", "onnx", "-o", str(export)])
    assert r.exit_code == 0, r.output
    out_o, out_t = tmp_path / "o.json", tmp_path / "t.json"
    r = runner.invoke(app, ["eval", str(export), "--backend", "onnx", "--steps", "1", "-n", "20", "--json", str(out_o)])
    assert r.exit_code == 0, r.output
    assert "onnxruntime fp32" in r.output
    assert runner.invoke(app, ["eval", str(tiny_dir), "--steps", "1", "-n", "20", "--json", str(out_t)]).exit_code == 0
    o, t = json.loads(out_o.read_text()), json.loads(out_t.read_text())
    assert o["sampling"]["backend"] == "onnx" and o["sampling"]["export_precision"] == "fp32"
    # the fp32 export draws the same images as PyTorch (parity ≥ 60 dB): the same figures
    assert o["generated"]["per_digit"] == t["generated"]["per_digit"]
    assert o["generated"]["fid"] == pytest.approx(t["generated"]["fid"], rel=1e-3)
    # a one-step export has no velocity UNet to take more steps with
    test_eval_bad_input_is_one_line(tmp_path, tiny_dir, judge_cache,
                                    ["eval", str(export), "--backend", "onnx", "--steps", "2"], "one-step only")


@pytest.mark.parametrize("args,needle", [
    (["eval", "{tiny}", "--backend", "onnx"], "no ONNX export manifest"),
    (["eval", "{tiny}", "--backend", "onnx", "--dtype", "float16"], "--backend onnx"),
    (["eval", "{tiny}", "--backend", "tflite"], "--backend"),
])
def test_eval_onnx_bad_input(tmp_path, tiny_dir, judge_cache, args, needle):
    test_eval_bad_input_is_one_line(tmp_path, tiny_dir, judge_cache, args, needle)


@pytest.mark.parametrize("args,needle", [
    (["eval", "{tiny}", "--coreml-compress", "palettize-3"], "unknown --coreml-compress"),
    (["eval", "{tiny}", "--coreml-compress", "int8", "--steps", "2"], "--steps 1"),
    (["eval", "{tiny}", "--coreml-compress", "mixed-bit"], "--target-bits"),
    (["eval", "--real", "--coreml-compress", "int8"], "needs a model"),
])
def test_eval_coreml_compression_bad_input(tmp_path, tiny_dir, judge_cache, args, needle):
    pytest.importorskip("coremltools")
    test_eval_bad_input_is_one_line(tmp_path, tiny_dir, judge_cache, args, needle)


@pytest.mark.parametrize("args,needle", [
    (["eval"], "no model given"),
    (["eval", "{tiny}", "--real"], "--real"),
    (["eval", "{tmp}/nope"], "does not exist"),
    (["eval", "{tiny}", "-n", "15"], "multiple of 10"),
    (["eval", "{tiny}", "--steps", "0"], "steps"),
    (["eval", "{tiny}", "--guidance", "-1"], "guidance"),
    (["eval", "{tiny}", "--json", "{tmp}/no/such/dir/e.json"], "--json"),
])
def test_eval_bad_input_is_one_line(tmp_path, tiny_dir, judge_cache, args, needle):
    r = runner.invoke(app, [a.format(tmp=tmp_path, tiny=tiny_dir) for a in args])
    assert r.exit_code != 0
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], r.output


def test_eval_config_validation():
    """A config is checked and normalized when it is made; nothing changes it later."""
    from instaflow_edge.quantize.schemes import CoreMLCompression

    from instaflow_edge.digits.evaluate import EvalBackend, EvalConfig
    from instaflow_edge.options import Device, DType

    with pytest.raises(InputError, match="batch_size"):
        EvalConfig(model="m", batch_size=0)
    with pytest.raises(InputError, match="unknown --backend 'tflite'.*torch, onnx"):
        EvalConfig(model="m", backend="tflite")
    with pytest.raises(InputError, match="unknown --device"):
        EvalConfig(model="m", device="tpu")
    cfg = EvalConfig(model="m", device="cpu", dtype="float32", backend="onnx")
    assert (cfg.device, cfg.dtype, cfg.backend) == (Device.cpu, DType.float32, "onnx")
    assert cfg.backend == EvalBackend.onnx.value and type(cfg.device) is Device
    if importlib.util.find_spec("coremltools"):
        from instaflow_edge.quantize.coreml import PyTorchCompression

        assert PyTorchCompression("palettize-4").scheme is CoreMLCompression.palettize_4
        with pytest.raises(InputError, match="unknown --coreml-compress"):
            PyTorchCompression("palettize-3")
