"""Reflow data: deterministic shards, skip-on-verify, repair of corrupt shards, no half shards, and an
epsilon-prediction teacher that samples exactly as diffusers' own pipeline."""

import json
import os
import shutil

import pytest
import torch
from instaflow_edge.train.pairs import PairsDataset
from instaflow_edge.train.reflow_data import (
    ReflowDataConfig,
    make_reflow_data,
    pair_seed,
)
from safetensors.torch import load_file

from instaflow_edge.errors import InputError, OutputExistsError


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("p") / "prompts.txt"
    p.write_text("a red fox\n\na blue whale\na castle at night\n")
    return p


def cfg(teacher, out, prompts_path, **kw):
    base = dict(teacher=str(teacher), output=str(out), prompts=str(prompts_path), num_pairs=6, shard_size=4, steps=2,
                batch_size=3, device="cpu")
    base.update(kw)
    return ReflowDataConfig(**base)


def shards(folder):
    return {p.name: {k: v.clone() for k, v in load_file(p).items()} for p in sorted(folder.glob("shard-*.safetensors"))}


def test_shards_are_deterministic_and_match_the_teacher(tmp_path, tiny_dir, tiny_pipe, prompts_file):
    from instaflow_edge.generator import generate_latents, make_noise

    m = make_reflow_data(cfg(tiny_dir, tmp_path / "a", prompts_file, guidance=2.0), progress=False)
    make_reflow_data(cfg(tiny_dir, tmp_path / "b", prompts_file, guidance=2.0), progress=False)
    a, b = shards(tmp_path / "a"), shards(tmp_path / "b")
    assert list(a) == ["shard-00000.safetensors", "shard-00001.safetensors"]
    assert all(torch.equal(a[n][k], b[n][k]) for n in a for k in a[n])
    assert a["shard-00001.safetensors"]["noise"].shape == (2, 4, 8, 8)  # the last shard holds the remainder
    assert m["generated_pairs"] == 6
    side = json.loads((tmp_path / "a" / "shard-00000.json").read_text())
    assert side["count"] == 4 and side["prompts"] == ["a red fox", "a blue whale", "a castle at night", "a red fox"]
    assert side["seeds"] == [pair_seed(0, i) for i in range(4)] and len(set(side["seeds"])) == 4
    # x1 is the teacher's ODE (2 Euler steps, guidance 2) from exactly the stored z
    s0 = a["shard-00000.safetensors"]
    assert torch.equal(s0["noise"], make_noise(side["seeds"], (4, 8, 8)))
    x1 = generate_latents(tiny_pipe, side["prompts"], s0["noise"], 2, 2.0)
    assert torch.allclose(s0["latents"], x1, atol=1e-5)
    ds = PairsDataset(tmp_path / "a")
    assert len(ds) == 6 and torch.equal(ds[5]["noise"], a["shard-00001.safetensors"]["noise"][1])


def test_rerun_skips_verified_and_repairs_corrupt(tmp_path, tiny_dir, prompts_file):
    out = tmp_path / "d"
    make_reflow_data(cfg(tiny_dir, out, prompts_file), progress=False)
    before = shards(out)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}
    assert make_reflow_data(cfg(tiny_dir, out, prompts_file), progress=False)["generated_pairs"] == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")} == mtimes
    bad = out / "shard-00001.safetensors"
    data = bytearray(bad.read_bytes())
    data[-5] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(InputError, match="corrupt"):
        PairsDataset(out)
    assert make_reflow_data(cfg(tiny_dir, out, prompts_file), progress=False)["generated_pairs"] == 2
    after = shards(out)
    diff = [(n, k, (before[n][k].double() - after[n][k].double()).abs().max().item())
            for n in before for k in before[n] if not torch.equal(before[n][k], after[n][k])]
    assert not diff
    assert (out / "shard-00000.safetensors").stat().st_mtime_ns == mtimes["shard-00000.safetensors"]


def test_interrupt_mid_shard_leaves_no_half_shard(tmp_path, tiny_dir, prompts_file, monkeypatch):
    import safetensors.torch as st

    real = st.save_file
    calls = {"n": 0}

    def dying_save(tensors, path, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # die half-way through writing the second shard
            with open(path, "wb") as f:
                f.write(b"\x00" * 100)
            raise KeyboardInterrupt
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(st, "save_file", dying_save)
    out = tmp_path / "k"
    with pytest.raises(KeyboardInterrupt):
        make_reflow_data(cfg(tiny_dir, out, prompts_file), progress=False)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["shard-00000.json", "shard-00000.safetensors"]  # no temp file, no half shard
    monkeypatch.setattr(st, "save_file", real)
    assert make_reflow_data(cfg(tiny_dir, out, prompts_file), progress=False)["generated_pairs"] == 2
    assert len(PairsDataset(out)) == 6


def test_other_settings_need_force(tmp_path, tiny_dir, prompts_file):
    out = tmp_path / "s"
    make_reflow_data(cfg(tiny_dir, out, prompts_file), progress=False)
    with pytest.raises(OutputExistsError, match="sampler"):
        make_reflow_data(cfg(tiny_dir, out, prompts_file, steps=3), progress=False)
    m = make_reflow_data(cfg(tiny_dir, out, prompts_file, steps=3, force=True), progress=False)
    assert m["generated_pairs"] == 6


@pytest.mark.parametrize("bad,match", [
    (dict(prompts=None), "prompt source"),
    (dict(num_pairs=0), "num_pairs"),
    (dict(scheduler="heun"), "scheduler"),
    (dict(prompts="/nonexistent/p.txt"), "does not exist"),
])
def test_bad_config(tmp_path, tiny_dir, prompts_file, bad, match):
    with pytest.raises(InputError, match=match):
        make_reflow_data(cfg(tiny_dir, tmp_path / "x", prompts_file, **bad), progress=False)
    assert not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def eps_teacher(tmp_path_factory, tiny_dir):
    """The tiny pipeline relabelled as an epsilon-prediction diffusion model (its UNet is SD's class)."""
    d = tmp_path_factory.mktemp("eps") / "teacher"
    shutil.copytree(tiny_dir, d)
    m = json.loads((d / "manifest.json").read_text())
    m["model"]["flow"] = "diffusion"
    (d / "manifest.json").write_text(json.dumps(m))
    return d


@torch.no_grad()
def test_epsilon_teacher_pairs_equal_diffusers_pipeline(tmp_path, eps_teacher, prompts_file):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    out = tmp_path / "e"
    make_reflow_data(cfg(eps_teacher, out, prompts_file, scheduler="dpm-solver", steps=5, num_pairs=2), progress=False)
    side = json.loads((out / "shard-00000.json").read_text())
    assert side["identity"]["sampler"]["scheduler"] == "dpm-solver"
    s = load_file(out / "shard-00000.safetensors")
    sd = StableDiffusionPipeline.from_pretrained(eps_teacher, safety_checker=None, requires_safety_checker=False)
    sd.scheduler = DPMSolverMultistepScheduler.from_config(sd.scheduler.config)
    sd.set_progress_bar_config(disable=True)
    ref = sd(side["prompts"], latents=s["noise"].clone(), num_inference_steps=5, guidance_scale=1.0,
             output_type="latent").images
    assert torch.allclose(s["latents"], ref, atol=1e-4)


def test_two_processes_split_shards_and_match_one(tmp_path, tiny_dir, prompts_file):
    """Under `accelerate launch --multi_gpu --num_processes 2` on a machine without GPUs (two gloo CPU
    processes via torchrun; note that accelerate 1.x's `--cpu --num_processes 2` starts ONE process), each
    process makes its own shards and the set is identical to a single process's."""
    import subprocess
    import sys

    one = tmp_path / "one"
    make_reflow_data(cfg(tiny_dir, one, prompts_file), progress=False)
    two = tmp_path / "two"
    import torch as _t

    if _t.cuda.is_available():
        pytest.skip("the 2-process CPU launch is for machines without a GPU")
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "instaflow_edge.cli"]
    r = subprocess.run([*launcher, "train", "reflow-data", str(tiny_dir), "--prompts", str(prompts_file),
                        "-o", str(two), "--num-pairs", "6", "--shard-size", "4", "--steps", "2", "--batch-size", "3",
                        "--no-progress"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = shards(one), shards(two)
    assert list(a) == list(b) == ["shard-00000.safetensors", "shard-00001.safetensors"]
    assert all(torch.equal(a[n][k], b[n][k]) for n in a for k in ("noise", "seeds", "input_ids"))
    assert all(torch.allclose(a[n]["latents"], b[n]["latents"], atol=1e-5) for n in a)
    assert json.loads((two / "manifest.json").read_text())["num_pairs"] == 6
    ranks = [json.loads((two / f"shard-0000{k}.json").read_text())["made_by_rank"] for k in (0, 1)]
    assert ranks == [0, 1]
