"""A format registered inside a test flows through generate, eval, bench and report with no other file
edited: the registry is the only place a format is known.

The toy format's "export" is a folder with a manifest of kind ``toy-export`` naming the pipeline it was
made from; its runtime runs that pipeline's PyTorch modules, with the UNet's output scaled by the
manifest's ``gain`` (1.0: exact; 1.5: a broken export the report must fail).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from instaflow_edge import runtime
from instaflow_edge.runtime.base import ONE_STEP, Export, ExportFacts, RuntimeFormat


def _open_toy(folder, manifest, *, steps=None, guidance=1.0, threads=None, device="cpu"):
    from instaflow_edge.components import Sizes
    from instaflow_edge.pipeline import load_pipeline
    from instaflow_edge.report.runtimes import _torch_calls

    pipe = load_pipeline(manifest["source"]["model"], "cpu", "float32")
    calls = _torch_calls(pipe)
    gain = float(manifest["gain"])
    unet = calls["unet"]
    calls["unet"] = lambda z, h: unet(z, h) * gain
    facts = ExportFacts.of(pipe, Sizes.of(pipe), ONE_STEP)
    return Export(folder=folder, format="toy", label=f"toy x{gain:g}", facts=facts, steps=1,
                  tokenize=lambda prompts: pipe.tokenize(prompts).numpy(), calls=calls, precision="fp32",
                  ran="the toy runtime (PyTorch, UNet output scaled)",
                  gates={c: 60.0 for c in (*ONE_STEP, "end_to_end")},
                  stage_precisions={s: "fp32" for s in (*ONE_STEP, "end_to_end", "generator")})


@pytest.fixture
def toy(tiny_dir, tmp_path):
    fmt = runtime.register(RuntimeFormat(name="toy", kind="toy-export", open=_open_toy, description="a test's toy",
                                         label=lambda m: f"toy x{m['gain']:g}"))
    folders = {}
    for gain in (1.0, 1.5):
        d = tmp_path / f"toy-{gain:g}"
        d.mkdir()
        (d / "manifest.json").write_text(json.dumps({"kind": "toy-export", "gain": gain, "source": {"model": str(tiny_dir)}}))
        folders[gain] = d
    yield folders
    runtime.unregister(fmt.name)


def test_a_toy_format_flows_through_generate_eval_bench_and_report(toy, tiny_dir, tmp_path, monkeypatch):
    from instaflow_edge.bench import peaks
    from instaflow_edge.bench.latency import BenchConfig, bench
    from instaflow_edge.digits.evaluate import EvalConfig, evaluate
    from instaflow_edge.generate import GenerateConfig, generate
    from instaflow_edge.report.build import ReportConfig, make_report

    assert "toy" in runtime.backend_names() and runtime.format_of(toy[1.0]) == "toy"
    g_toy = generate(GenerateConfig(model=str(toy[1.0]), prompts=["a fox"], output=str(tmp_path / "g"), backend="toy"),
                     progress=False)
    g_ref = generate(GenerateConfig(model=str(tiny_dir), prompts=["a fox"], output=str(tmp_path / "t"), device="cpu"),
                     progress=False)
    from PIL import Image

    a = np.asarray(Image.open(tmp_path / "g" / g_toy["images"][0]["file"])).astype(int)
    b = np.asarray(Image.open(tmp_path / "t" / g_ref["images"][0]["file"])).astype(int)
    assert g_toy["sampling"]["backend"] == "toy" and np.abs(a - b).max() <= 1

    r = evaluate(EvalConfig(model=str(toy[1.0]), num_images=20, backend="toy"), progress=False)
    assert r["sampling"]["backend"] == "toy" and r["generated"]["n"] == 20

    monkeypatch.setattr(peaks, "measure_peaks", lambda threads: {
        "threads": threads, "n": 0, "peaks": {"fp32": {"gops": 50.0, "via": "fixed"}}, "candidates": {}})
    b = bench(BenchConfig(model=str(tiny_dir), exports=[str(toy[1.0])], output=str(tmp_path / "b.json"),
                          warmup=0, repeats=1), progress=False)
    assert b["results"]["toy x1"]["end_to_end"]["n"] == 1

    rep = make_report(ReportConfig(model=str(tiny_dir), output=str(tmp_path / "r"), exports=[str(toy[1.0]), str(toy[1.5])]),
                      progress=False)
    assert rep["runtimes"]["toy x1"]["kind"] == "toy" and rep["runtimes"]["toy x1"]["how"].startswith("the toy runtime")
    assert rep["verdicts"]["toy x1"]["pass"] is True
    assert rep["verdicts"]["toy x1.5"]["pass"] is False and "unet" in rep["verdicts"]["toy x1.5"]["failed"]
