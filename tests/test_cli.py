"""The CLI through typer's CliRunner, once as a real subprocess, and the lean-import promise."""

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from instaflow_edge.cli import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_init_and_generate(tmp_path, tiny_dir):
    out = tmp_path / "imgs"
    r = run("generate", tiny_dir, "a red fox", "a blue whale", "-n", "2", "--seed", "5", "-o", out)
    assert r.exit_code == 0, r.output
    assert "s/image" in r.output
    m = json.loads((out / "manifest.json").read_text())
    assert [(i["prompt"], i["seed"]) for i in m["images"]] == [
        ("a red fox", 5), ("a red fox", 6), ("a blue whale", 5), ("a blue whale", 6)]
    assert m["sampling"]["steps"] == 1 and m["sampling"]["height"] == 64
    from PIL import Image

    for rec in m["images"]:
        im = Image.open(out / rec["file"])
        assert im.size == (64, 64) and im.mode == "RGB"


def test_generate_is_deterministic_and_seed_sensitive(tmp_path, tiny_dir):
    import numpy as np
    from PIL import Image

    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        assert run("generate", tiny_dir, "a red fox", "--seed", seed, "-o", tmp_path / name).exit_code == 0
    img = {n: np.asarray(Image.open(next((tmp_path / n).glob("*.png")))) for n in "abc"}
    assert np.array_equal(img["a"], img["b"])
    assert not np.array_equal(img["a"], img["c"])


def test_generate_multi_step_and_guidance(tmp_path, tiny_dir):
    r = run("generate", tiny_dir, "a cat", "--steps", 3, "--guidance", 2.5, "--height", 32, "--width", 48, "-o", tmp_path / "o")
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert m["sampling"]["steps"] == 3 and (m["sampling"]["height"], m["sampling"]["width"]) == (32, 48)


def test_init_cli(tmp_path):
    r = run("init", "tiny", tmp_path / "m", "--seed", 1)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "m" / "model_index.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left behind


def _one_line_error(r, *needles):
    assert r.exit_code != 0
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, r.output
    assert lines[0].startswith("error:"), r.output
    assert "Traceback" not in r.output
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.mark.parametrize(
    "args,needles",
    [
        (["generate", "{tmp}/nope", "a fox", "-o", "{tmp}/o"], ["does not exist"]),
        (["generate", "{tiny}", "", "-o", "{tmp}/o"], ["empty prompt"]),
        (["generate", "{tiny}", "   ", "-o", "{tmp}/o"], ["empty prompt"]),
        (["generate", "{tiny}", "a fox", "--seed", "-3", "-o", "{tmp}/o"], ["seed", "non-negative"]),
        (["generate", "{tiny}", "a fox", "--seed", "1.5", "-o", "{tmp}/o"], ["--seed", "--help"]),
        (["generate", "{tiny}", "a fox", "--steps", "0", "-o", "{tmp}/o"], ["steps", "positive"]),
        (["generate", "{tiny}", "a fox", "--height", "60", "-o", "{tmp}/o"], ["multiple of"]),
        (["generate", "{tiny}", "a fox", "--device", "tpu", "-o", "{tmp}/o"], ["--device"]),
        (["generate", "{tiny}", "a fox", "--device", "cuda", "-o", "{tmp}/o"], ["cuda", "--device cpu"]),
        (["init", "nope", "{tmp}/o"], ["unknown preset", "sd15", "tiny"]),
        (["init", "tiny", "{tmp}/o", "--seed", "-1"], ["seed"]),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, tiny_dir, args, needles):
    import torch

    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    args = [a.format(tmp=tmp_path, tiny=tiny_dir) for a in args]
    before = set(tmp_path.iterdir())
    _one_line_error(run(*args), *needles)
    assert set(tmp_path.iterdir()) == before


def test_existing_output_needs_force(tmp_path, tiny_dir):
    out = tmp_path / "o"
    assert run("generate", tiny_dir, "a fox", "-o", out).exit_code == 0  # a previous output of ours
    (out / "keep.txt").write_text("mine")
    _one_line_error(run("generate", tiny_dir, "a fox", "-o", out), "already exists", "--force")
    assert (out / "keep.txt").read_text() == "mine"
    assert run("generate", tiny_dir, "a fox", "-o", out, "--force").exit_code == 0
    assert not (out / "keep.txt").exists() and (out / "manifest.json").is_file()


def test_debug_shows_traceback(tmp_path):
    r = run("--debug", "generate", tmp_path / "nope", "a fox", "-o", tmp_path / "o")
    assert r.exit_code != 0 and r.exception is not None


def test_env_lists_versions():
    r = run("env")
    assert r.exit_code == 0
    for name in ("torch", "diffusers", "transformers", "onnx", "onnxruntime", "coremltools", "accelerate", "gpu"):
        assert name in r.output
    data = json.loads(run("env", "--json").output)
    assert data["versions"]["torch"] and "cpu" in data


HEAVY = ("onnxruntime", "coremltools", "accelerate", "neural_compressor", "torch", "diffusers")


def test_lean_import_and_help():
    code = (
        "import sys, instaflow_edge, instaflow_edge.cli;"
        f"print([m for m in {HEAVY!r} if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "instaflow_edge.cli", "--help"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "generate" in r.stdout
    imported = {ln.split("|")[-1].strip().split(".")[0] for ln in r.stderr.splitlines() if "|" in ln}
    assert not imported & set(HEAVY), imported & set(HEAVY)


def test_real_subprocess_end_to_end(tmp_path):
    exe = [sys.executable, "-m", "instaflow_edge.cli"]
    r = subprocess.run([*exe, "init", "tiny", str(tmp_path / "m")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    # what it builds and where it wrote: no library chatter (warnings, shard-writing bars) around it
    assert len(r.stdout.strip().splitlines()) == 2 and r.stderr.strip() == "", (r.stdout, r.stderr)
    r = subprocess.run([*exe, "generate", str(tmp_path / "m"), "a red fox", "-o", str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / "o").glob("*.png"))) == 1
    r = subprocess.run([*exe, "generate", str(tmp_path / "m"), "a red fox", "-o", str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "--force" in r.stderr


@pytest.mark.parametrize("args", [
    ["eval", "{tmp}/nope", "--coreml-compress", "int8"],
    ["convert", "{tmp}/nope", "--target", "coreml", "-o", "{tmp}/out"],
])
def test_optional_dependency_import_chatter_stays_out_of_one_line_errors(tmp_path, args):
    """In a fresh process coremltools/torchao log warnings while they are imported; a bad input that
    fails after that import must still print exactly one line."""
    pytest.importorskip("coremltools")
    r = subprocess.run([sys.executable, "-m", "instaflow_edge.cli", *[a.format(tmp=tmp_path) for a in args]],
                       capture_output=True, text=True)
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
    assert r.returncode != 0 and len(lines) == 1 and lines[0].startswith("error:"), lines


def test_onnx_convert_stderr_is_stage_lines_only(tmp_path):
    """A fresh `convert --target onnx` process: stderr says what stage it is in and nothing else (no
    onnxruntime optimizer bars or logger advice); stdout is the parity table."""
    pytest.importorskip("onnxruntime")
    exe = [sys.executable, "-m", "instaflow_edge.cli"]
    assert subprocess.run([*exe, "init", "tiny", str(tmp_path / "m")], capture_output=True).returncode == 0
    r = subprocess.run([*exe, "convert", str(tmp_path / "m"), "--target", "onnx", "-o", str(tmp_path / "x")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.replace("\r", "\n").splitlines() if ln.strip()]
    assert lines and all(ln.startswith("[onnx ") for ln in lines), lines
    assert any("unet: optimizing for cpu" in ln for ln in lines)
    assert "end_to_end" in r.stdout
