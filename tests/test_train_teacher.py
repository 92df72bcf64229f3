"""`instaflow-edge train teacher` through the CLI on the tiny preset and a small image folder: output
that `generate` loads, config files, resume, one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from instaflow_edge.cli import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def make_image_folder(folder, n: int = 8, size: int = 64):
    """``n`` two-colour images with captions naming the colours."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    colours = {"red": (220, 30, 30), "blue": (30, 30, 220)}
    rows = []
    for i in range(n):
        name = list(colours)[i % 2]
        arr = np.zeros((size, size, 3), np.uint8)
        arr[:, : size // 2] = colours[name]
        arr[size // 4:, size // 2:] = (i * 20) % 255
        Image.fromarray(arr).save(folder / f"{i}.png")
        rows.append({"file": f"{i}.png", "text": f"a {name} square"})
    (folder / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("data") / "imgs")


FAST = ["--batch-size", 4, "--warmup-steps", 1, "--no-progress"]


def test_train_teacher_cli_output_generates(tmp_path, tiny_dir, images):
    out = tmp_path / "T"
    r = run("train", "teacher", tiny_dir, "--data", images, "-o", out, "--max-steps", 3, "--checkpoint-every", 2, *FAST)
    assert r.exit_code == 0, r.output
    m = json.loads((out / "manifest.json").read_text())
    assert m["model"]["flow"] == "rectified_flow" and m["model"]["default_steps"] == 32
    assert m["stage"] == "teacher" and m["training"]["steps"] == 3 and m["training"]["weights"] == "ema"
    assert m["config"]["max_steps"] == 3 and m["config"]["cfg_dropout"] == 0.1
    assert m["data"]["samples"] == 8 and m["data"]["unique_prompts"] == 2
    assert m["prompts"] == ["a blue square", "a red square"]  # what its int8 exports calibrate on
    assert isinstance(m["training"]["final_loss"], float)
    work = tmp_path / "T.train"
    assert sorted(p.name for p in work.iterdir()) == ["checkpoint-0000002", "checkpoint-0000003", "metrics.jsonl"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    from instaflow_edge.pipeline import load_pipeline

    trained, base = load_pipeline(out), load_pipeline(tiny_dir)
    assert trained.info.flow == "rectified_flow" and trained.info.default_steps == 32
    assert not torch.equal(trained.unet.conv_in.weight, base.unet.conv_in.weight)
    assert torch.equal(trained.vae.decoder.conv_in.weight, base.vae.decoder.conv_in.weight)  # VAE frozen
    r = run("generate", out, "a red square", "--steps", 2, "--guidance", 2, "-o", tmp_path / "img")
    assert r.exit_code == 0, r.output
    g = json.loads((tmp_path / "img" / "manifest.json").read_text())
    assert g["sampling"]["steps"] == 2 and g["sampling"]["flow"] == "rectified_flow"


def test_config_file_and_flag_override_and_resume(tmp_path, tiny_dir, images):
    (tmp_path / "t.toml").write_text(f'data = "{images}"\nmax-steps = 2\nbatch_size = 4\ncheckpoint-every = 2\n'
                                     'warmup-steps = 1\nlr-schedule = "constant"\n')
    out = tmp_path / "T"
    r = run("train", "teacher", tiny_dir, "--config", tmp_path / "t.toml", "-o", out, "--no-progress")
    assert r.exit_code == 0, r.output
    m = json.loads((out / "manifest.json").read_text())
    assert m["config"]["batch_size"] == 4 and m["config"]["lr_schedule"] == "constant" and m["training"]["steps"] == 2
    # the same file, a flag overriding it, resuming the run: steps 3-4 only
    r = run("train", "teacher", tiny_dir, "--config", tmp_path / "t.toml", "-o", out, "--max-steps", 4,
            "--resume", "latest", "--force", "--no-progress")
    assert r.exit_code == 0, r.output
    m = json.loads((out / "manifest.json").read_text())
    assert m["training"]["steps"] == 4 and m["training"]["resumed_from"].endswith("checkpoint-0000002")
    log = [json.loads(x)["step"] for x in (tmp_path / "T.train" / "metrics.jsonl").read_text().splitlines()]
    assert log == [2, 4]  # logged at each run's last step; the resumed run kept the first line


def _one_line_error(r, *needles):
    assert r.exit_code != 0
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, r.output
    assert lines[0].startswith("error:") and "Traceback" not in r.output, r.output
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_one_line_errors(tmp_path, tiny_dir, images):
    (tmp_path / "bad.toml").write_text("max-stepz = 3\n")
    (tmp_path / "bad.yaml").write_text("learning-rate: [1, 2]\n")
    (tmp_path / "pickle.toml").write_text('allow-pickle = "false"\n')
    cases = [
        (["--data", tmp_path / "missing", "-o", tmp_path / "o"], ["data folder", "missing", "does not exist"]),
        (["--config", tmp_path / "bad.toml", "-o", tmp_path / "o"], ["unknown key 'max-stepz'", "valid keys:", "max-steps"]),
        (["--config", tmp_path / "bad.yaml", "-o", tmp_path / "o"], ["learning_rate must be a finite number"]),
        (["--config", tmp_path / "pickle.toml", "-o", tmp_path / "o"], ["allow_pickle must be true or false"]),
        (["--data", images, "--captions", tmp_path / "none.jsonl", "-o", tmp_path / "o"], ["captions file", "does not exist"]),
        (["--data", "digits", "--captions", tmp_path / "c.jsonl", "-o", tmp_path / "o"], ["--captions"]),
        (["--data", images], ["no output folder"]),
        (["--data", images, "-o", tmp_path / "o", "--batch-size", 6, "--gradient-accumulation-steps", 4], ["not a multiple"]),
        (["--data", images, "-o", tmp_path / "o", "--resume", tmp_path / "nockpt"], ["not a complete checkpoint"]),
        (["--data", images, "-o", tmp_path / "o", "--lr-schedule", "linear"], ["--lr-schedule"]),
    ]
    for args, needles in cases:
        _one_line_error(run("train", "teacher", tiny_dir, *args, "--no-progress"), *needles)
    assert not (tmp_path / "o").exists()


def test_existing_checkpoints_need_resume_or_force_and_nan_stops(tmp_path, tiny_dir, images):
    out = tmp_path / "T"
    args = ["train", "teacher", tiny_dir, "--data", images, *FAST]
    assert run(*args, "-o", out, "--max-steps", 1, "--checkpoint-every", 1).exit_code == 0
    _one_line_error(run(*args, "-o", tmp_path / "T2", "--work-dir", tmp_path / "T.train", "--max-steps", 1),
                    "holds checkpoints", "--resume latest")
    # a learning rate that blows the weights up: the loss turns non-finite and the run stops, naming the step
    r = run(*args, "-o", tmp_path / "T3", "--max-steps", 5, "--learning-rate", 1e30, "--max-grad-norm", 0,
            "--warmup-steps", 0, "--checkpoint-every", 0)
    _one_line_error(r, "training loss is", "at step")
    assert not (tmp_path / "T3").exists()


def test_train_cli_imports_no_click_internals():
    """typer ≥ 0.15 is allowed: the train commands must not reach into click/typer internals."""
    import ast
    from pathlib import Path

    cli = Path(__file__).resolve().parents[1] / "instaflow_edge" / "cli"
    for name in ("train.py", "train_recipe.py"):
        for node in ast.walk(ast.parse((cli / name).read_text(encoding="utf-8"))):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for m in mods:
                assert not (m.startswith("typer._") or m.split(".")[0] == "click"), (name, m)
