"""A target added from a test, the way a new target is added (its options dataclass and exporter, and its
format record), works end to end on the command line with no other file edited: ``convert toy MODEL``
exists with the options' own fields, writes an export of the format's kind, and ``generate --backend toy``,
``bench`` and ``report`` run it by the format's runtime."""

from __future__ import annotations

import dataclasses
import enum
import json
from typing import ClassVar

import numpy as np
import pytest
from typer.testing import CliRunner

from instaflow_edge import runtime
from instaflow_edge.artifacts import atomic_dir, make_manifest, write_manifest
from instaflow_edge.cli import app
from instaflow_edge.convert import config as cc
from instaflow_edge.errors import InputError
from instaflow_edge.runtime.base import ONE_STEP, Export, ExportFacts, RuntimeFormat


class Gain(str, enum.Enum):
    one = "1"
    half = "0.5"


@dataclasses.dataclass
class ToyOptions:
    """A toy target: the pipeline's own PyTorch modules, the UNet's output scaled by --gain."""

    target: ClassVar[str] = "toy"
    module: ClassVar[str] = __name__
    gain: Gain = cc.opt(Gain.one, "Scale of the UNet's output.")
    note: str | None = cc.opt(None, "A note recorded in the manifest.")

    def __post_init__(self) -> None:
        self.gain = cc.choice("gain", self.gain, Gain)

    def check(self, cfg) -> None:
        if cfg.fused:
            raise InputError("--fused does not apply to --target toy", "drop --fused")


def export_toy(cfg) -> dict:
    with atomic_dir(cfg.output, cfg.force, (cfg.model,)) as tmp:
        m = make_manifest("toy-export", cfg, source={"model": str(cfg.model)}, gain=float(cfg.options.gain.value))
        write_manifest(tmp, m)
    return {**m, "parity": [], "gates": {}}


def open_toy(folder, manifest, *, steps=None, guidance=1.0, threads=None, device="cpu"):
    from instaflow_edge.components import Sizes
    from instaflow_edge.pipeline import load_pipeline
    from instaflow_edge.report.runtimes import _torch_calls

    pipe = load_pipeline(manifest["source"]["model"], "cpu", "float32")
    calls = _torch_calls(pipe)
    unet, gain = calls["unet"], manifest["gain"]
    calls["unet"] = lambda z, h: unet(z, h) * gain
    return Export(folder=folder, format="toy", label=f"toy {gain:g}", facts=ExportFacts.of(pipe, Sizes.of(pipe), ONE_STEP),
                  steps=1, tokenize=lambda p: pipe.tokenize(p).numpy(), calls=calls, precision="fp32",
                  ran="the toy runtime", gates={c: 60.0 for c in (*ONE_STEP, "end_to_end")},
                  stage_precisions={s: "fp32" for s in (*ONE_STEP, "end_to_end", "generator")})


@pytest.fixture
def toy():
    cc.register_target(ToyOptions, export_toy)
    runtime.register(RuntimeFormat(name="toy", kind="toy-export", open=open_toy, description="a test's toy",
                                   label=lambda m: f"toy {m['gain']:g}"))
    yield
    runtime.unregister("toy")
    cc.unregister_target("toy")


def test_a_target_added_from_a_test_works_on_the_command_line(toy, tiny_dir, tmp_path):
    r = CliRunner().invoke(app, ["convert", "toy", "--help"])
    assert r.exit_code == 0 and "--gain" in r.output and "Scale of the UNet" in r.output
    out = tmp_path / "t"
    r = CliRunner().invoke(app, ["convert", "toy", str(tiny_dir), "-o", str(out), "--gain", "0.5", "--note", "hi"])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "manifest.json").read_text())
    assert m["config"]["target"] == "toy" and m["config"]["options"] == {"gain": "0.5", "note": "hi"}
    # the older spelling, and an option of another target refused by name
    r = CliRunner().invoke(app, ["convert", str(tiny_dir), "--target", "toy", "-o", str(tmp_path / "t2")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["convert", str(tiny_dir), "--target", "toy", "--opset", "17", "-o", str(tmp_path / "t3")])
    assert r.exit_code == 2 and "--opset does not apply to --target toy" in r.output
    # generate's --backend choices are the built-in formats (a Typer enum); a registered one runs from Python
    from instaflow_edge.generate import GenerateConfig, generate

    g = generate(GenerateConfig(model=str(out), prompts=["a fox"], output=str(tmp_path / "g"), backend="toy"), progress=False)
    assert g["sampling"]["backend"] == "toy" and len(g["images"]) == 1
    rep_dir = tmp_path / "r"
    r = CliRunner().invoke(app, ["report", str(tiny_dir), str(tmp_path / "t2"), str(out), "-o", str(rep_dir),
                                 "--digits-images", "0"])
    assert r.exit_code == 0, r.output
    rep = json.loads((rep_dir / "report.json").read_text())
    assert rep["verdicts"]["toy 1"]["pass"] is True and rep["verdicts"]["toy 0.5"]["pass"] is False
    assert np.isfinite(rep["parity"]["toy 0.5"]["unet"]["psnr"])
