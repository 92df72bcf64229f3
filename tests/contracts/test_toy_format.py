"""A format registered inside a test flows through generate, eval, bench and report with no other file
edited: the registry is the only place a format is known.

The toy format (``toy_plugin.py``) runs the pipeline its manifest names, with the UNet's output scaled by
the manifest's ``gain`` (1.0: exact; 1.5: a broken export the report must fail).
"""

from __future__ import annotations

import numpy as np
import pytest
from toy_plugin import FORMAT, write_toy_export

from instaflow_edge import runtime


@pytest.fixture
def toy(tiny_dir, tmp_path):
    fmt = runtime.register(FORMAT)
    yield {gain: write_toy_export(tmp_path / f"toy-{gain:g}", tiny_dir, gain) for gain in (1.0, 1.5)}
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
