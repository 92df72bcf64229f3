"""Reflow (2-RF) and distill stages: their losses use the fixed pairs, distillation is at s = 0 on z + v(z),
and both train end to end on the tiny preset into pipelines that generate."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from instaflow_edge.train.engine import StepRandom
from instaflow_edge.train.objectives import OneStepObjective, RectifiedFlowObjective
from instaflow_edge.train.pairs import PairsDataset
from instaflow_edge.train.reflow import (
    DistillConfig,
    PairsSource,
    ReflowConfig,
    train_distill,
    train_reflow,
)
from instaflow_edge.train.reflow_data import ReflowDataConfig, make_reflow_data

from instaflow_edge.errors import InputError


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory, tiny_dir):
    d = tmp_path_factory.mktemp("pairs")
    (d / "p.txt").write_text("a red fox\na blue whale\n")
    make_reflow_data(ReflowDataConfig(teacher=str(tiny_dir), output=str(d / "pairs"), prompts=str(d / "p.txt"),
                                      num_pairs=8, shard_size=8, steps=2, device="cpu"), progress=False)
    return d / "pairs"


class Recorder(torch.nn.Module):
    """A stand-in UNet: v = a·x, recording the times it is called at."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(0.5))
        self.taus = []

    def forward(self, x, tau, encoder_hidden_states=None, return_dict=False):
        self.taus.append(tau.detach().clone())
        return (self.a * x,)


def test_reflow_loss_uses_the_fixed_pairs(pairs_dir, tiny_pipe):
    src = PairsSource(PairsDataset(pairs_dir), tiny_pipe)
    idx = torch.tensor([0, 3, 5])
    rnd = StepRandom(0, 0, 0, 3, 3)
    batch = src.get(idx, rnd, "cpu")
    assert torch.equal(batch["z"], src.z[idx]) and torch.equal(batch["x1"], src.x1[idx])
    model = Recorder()
    loss = RectifiedFlowObjective()(model, batch, StepRandom(0, 0, 0, 3, 3))
    # by hand: the same s draw (the generator's first call after the prompt-dropout draw in get()), stored z
    g = StepRandom(0, 0, 0, 3, 3)
    s = g.uniform()
    z, x1 = batch["z"], batch["x1"]
    xs = s[:, None, None, None] * x1 + (1 - s[:, None, None, None]) * z
    expect = F.mse_loss(0.5 * xs, x1 - z)
    assert torch.allclose(loss, expect, atol=1e-6)
    assert torch.allclose(model.taus[0], 1000 * (1 - s))


def test_distill_loss_is_at_s0_on_z_plus_v(pairs_dir, tiny_pipe):
    src = PairsSource(PairsDataset(pairs_dir), tiny_pipe)
    batch = src.get(torch.tensor([1, 2]), StepRandom(0, 0, 0, 2, 2), "cpu")
    model = Recorder()
    loss = OneStepObjective()(model, batch, StepRandom(0, 0, 0, 2, 2))
    assert torch.equal(model.taus[0], torch.full((2,), 1000.0))
    z, x1 = batch["z"], batch["x1"]
    assert torch.allclose(loss, F.mse_loss(z + 0.5 * z, x1))


def test_reflow_then_distill_end_to_end(tmp_path, tiny_dir, pairs_dir):
    from instaflow_edge.generate import GenerateConfig, generate

    common = dict(max_steps=3, batch_size=4, warmup_steps=1, checkpoint_every=0, progress=False, cpu=True)
    rf = train_reflow(ReflowConfig(model=str(tiny_dir), pairs=str(pairs_dir), output=str(tmp_path / "rf"), **common))
    m = json.loads((tmp_path / "rf" / "manifest.json").read_text())
    assert m["stage"] == "reflow" and m["model"]["flow"] == "rectified_flow" and m["training"]["steps"] == 3
    st = train_distill(DistillConfig(model=rf, pairs=str(pairs_dir), output=str(tmp_path / "st"), loss="pseudo-huber",
                                     **common))
    m = json.loads((tmp_path / "st" / "manifest.json").read_text())
    assert m["one_step"] and m["model"]["default_steps"] == 1 and m["loss"] == "pseudo-huber"
    # the text encoder and VAE were parked during training (not run) and come back unchanged from MODEL
    from safetensors.torch import load_file

    for sub in ("text_encoder", "vae"):
        before, after = (sorted((Path(d) / sub).glob("*.safetensors")) for d in (rf, tmp_path / "st"))
        assert [f.name for f in before] == [f.name for f in after] and before, sub
        a, b = load_file(before[0]), load_file(after[0])
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub
    # the prompts it learnt from are kept, and its int8 export calibrates on them (not on generic prompts)
    from instaflow_edge.artifacts import prompt_sample
    from instaflow_edge.convert import ConvertConfig, export

    assert m["prompts"] == prompt_sample(PairsDataset(pairs_dir).prompts) and m["prompts"]
    e = export(ConvertConfig.of("onnx", model=st, output=str(tmp_path / "int8"), quantize="int8-static"))
    assert e["quantize"]["calibration_prompts"] == len(m["prompts"]) and e["prompts"] == m["prompts"]
    g = generate(GenerateConfig(model=st, prompts=["a red fox"], output=str(tmp_path / "img"), device="cpu"), progress=False)
    assert g["sampling"]["steps"] == 1
    # the student's UNet moved away from its init
    from instaflow_edge.pipeline import load_pipeline

    a, b = load_pipeline(rf).unet.conv_in.weight, load_pipeline(st).unet.conv_in.weight
    assert not torch.equal(a, b)


def test_prompt_sample_is_distinct_sorted_and_spread():
    from instaflow_edge.artifacts import prompt_sample

    assert prompt_sample(["b", "a", "", "  ", "b", None]) == ["a", "b"]
    many = [f"p{i:03d}" for i in range(100)] * 2
    got = prompt_sample(many, k=10)
    assert got == [f"p{i:03d}" for i in range(0, 100, 10)]  # every tenth of the sorted list
    assert prompt_sample(many) == prompt_sample(list(reversed(many)))  # order-free


def test_max_pairs_trains_on_a_prefix(tmp_path, tiny_dir, pairs_dir, monkeypatch):
    """--max-pairs N: the stage sees the first N pairs only (and says so in its manifest)."""
    from instaflow_edge.train import reflow

    seen = []
    real = reflow.PairsSource.__init__

    def spy(self, pairs, pipe, cfg_dropout=0.0):
        seen.append(pairs.noise.clone())
        real(self, pairs, pipe, cfg_dropout)

    monkeypatch.setattr(reflow.PairsSource, "__init__", spy)
    common = dict(max_steps=1, batch_size=2, checkpoint_every=0, progress=False, cpu=True)
    out = train_distill(DistillConfig(model=str(tiny_dir), pairs=str(pairs_dir), output=str(tmp_path / "st"),
                                      max_pairs=3, **common))
    assert torch.equal(seen[0], PairsDataset(pairs_dir).noise[:3])
    assert json.loads((tmp_path / "st" / "manifest.json").read_text())["data"]["num_pairs"] == 3 and out
    with pytest.raises(InputError, match="holds 8 pairs"):
        train_reflow(ReflowConfig(model=str(tiny_dir), pairs=str(pairs_dir), output=str(tmp_path / "rf"),
                                  max_pairs=9, **common))
    with pytest.raises(InputError, match="max_pairs"):
        train_reflow(ReflowConfig(model=str(tiny_dir), pairs=str(pairs_dir), output=str(tmp_path / "rf"),
                                  max_pairs=0, **common))
    assert not (tmp_path / "rf").exists()


def test_bad_inputs(tmp_path, tiny_dir, pairs_dir):
    with pytest.raises(InputError, match="pairs folder"):
        train_reflow(ReflowConfig(model=str(tiny_dir), pairs=str(tmp_path / "nope"), output=str(tmp_path / "o")))
    with pytest.raises(InputError, match="--lpips-weights"):
        train_distill(DistillConfig(model=str(tiny_dir), pairs=str(pairs_dir), output=str(tmp_path / "o"), loss="lpips"))
    with pytest.raises(InputError, match="unknown --loss"):
        train_distill(DistillConfig(model=str(tiny_dir), pairs=str(pairs_dir), output=str(tmp_path / "o"), loss="l1"))
    (tmp_path / "notpairs").mkdir()
    with pytest.raises(InputError, match="not a reflow-data folder"):
        train_reflow(ReflowConfig(model=str(tiny_dir), pairs=str(tmp_path / "notpairs"), output=str(tmp_path / "o"),
                                  progress=False, cpu=True))
    assert not (tmp_path / "o").exists()


def test_recipe_cli(tmp_path, tiny_dir):
    from typer.testing import CliRunner

    from instaflow_edge.cli import app

    run = lambda *a: CliRunner().invoke(app, [str(x) for x in a])  # noqa: E731
    (tmp_path / "p.txt").write_text("a red fox\n")
    r = run("train", "reflow-data", tiny_dir, "--prompts", tmp_path / "p.txt", "-o", tmp_path / "pairs",
            "--num-pairs", 4, "--shard-size", 2, "--steps", 2, "--device", "cpu", "--no-progress")
    assert r.exit_code == 0, r.output
    assert "4 pairs in 2 shards" in r.output
    engine = ["--max-steps", 2, "--batch-size", 2, "--checkpoint-every", 0, "--cpu", "--no-progress"]
    r = run("train", "reflow", tiny_dir, "--pairs", tmp_path / "pairs", "-o", tmp_path / "rf", *engine)
    assert r.exit_code == 0, r.output
    (tmp_path / "d.toml").write_text('loss = "pseudo-huber"\nmax-steps = 2\n')
    r = run("train", "distill", tmp_path / "rf", "--pairs", tmp_path / "pairs", "-o", tmp_path / "st",
            "--config", tmp_path / "d.toml", "--batch-size", 2, "--checkpoint-every", 0, "--cpu", "--no-progress")
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "st" / "manifest.json").read_text())
    assert m["loss"] == "pseudo-huber" and m["training"]["steps"] == 2
    r = run("train", "distill", tmp_path / "rf", "--pairs", tmp_path / "nope", "-o", tmp_path / "x", "--cpu")
    assert r.exit_code != 0 and r.output.strip().startswith("error:") and "pairs folder" in r.output
