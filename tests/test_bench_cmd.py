"""``instaflow-edge bench``: the command's refusals (the cuda path without CUDA in one line), the memory
probe, and a real run on tiny with an ONNX export (structure only: no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from instaflow_edge.cli import app


def _one_error_line(r) -> str:
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    errs = [ln for ln in lines if ln.startswith("error:")]
    assert len(errs) == 1, r.output
    assert "Traceback" not in r.output
    return errs[0]


def test_cuda_without_cuda_is_one_line(tiny_dir, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible: the refusal cannot be shown here")
    out = tmp_path / "gpu.json"
    r = CliRunner().invoke(app, ["bench", str(tiny_dir), "--device", "cuda", "-o", str(out)])
    assert r.exit_code == 2
    line = _one_error_line(r)
    assert "--device cuda" in line and "no CUDA GPU" in line
    assert not out.exists() and list(tmp_path.iterdir()) == []
    # the same as a real process: one line on stderr, nothing written
    p = subprocess.run([sys.executable, "-m", "instaflow_edge.cli", "bench", str(tiny_dir), "--device", "cuda",
                        "-o", str(out)], capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and p.stderr.startswith("error: --device cuda")
    assert not out.exists()


@pytest.mark.parametrize("args, words", [
    (["{tmp}", "-o", "{tmp}/x.json"], "not a pipeline folder"),
    (["{tiny}", "{tmp}", "-o", "{tmp}/x.json"], "not an export folder"),
    (["{tiny}", "-o", "{tmp}/x.txt"], "JSON file"),
    (["{tiny}", "-o", "{tmp}/x.json", "--repeats", "0"], "repeats"),
    (["{tiny}", "-o", "{tmp}/x.json", "--threads", "0"], "threads"),
])
def test_bad_inputs_are_one_line(tiny_dir, tmp_path, args, words):
    args = [a.format(tmp=tmp_path, tiny=tiny_dir) for a in args]
    r = CliRunner().invoke(app, ["bench", *args])
    assert r.exit_code == 2
    assert words in _one_error_line(r)
    assert not (tmp_path / "x.json").exists()


def test_rss_probe_sees_a_run_allocate():
    from instaflow_edge.bench.latency import Rss, _time_interleaved

    rss = Rss()
    if not rss.ok:
        pytest.skip("no /proc/self/clear_refs here")

    def big():
        x = bytearray(64 << 20)  # 64 MiB, touched
        x[::4096] = b"\1" * len(x[::4096])
        return {"s": 0.001}

    memory: dict = {}
    _time_interleaved({"big": big, "small": lambda: {"s": 0.001}}, warmup=0, repeats=2, rss=rss, memory=memory)
    assert memory["big"]["run_peak_mib"] >= 60
    assert memory["small"]["run_peak_mib"] < 30


@pytest.fixture(scope="module")
def tiny_onnx(tiny_onnx_fp32):
    return tiny_onnx_fp32


def test_bench_tiny_records_what_the_issue_asks(tiny_dir, tiny_onnx, tmp_path, monkeypatch):
    from instaflow_edge.bench import peaks
    from instaflow_edge.bench.tables import tables

    # the peaks are measured by bench/peaks.py (tested there); a fixed answer keeps this test fast
    monkeypatch.setattr(peaks, "measure_peaks", lambda threads: {
        "threads": threads, "n": 0, "peaks": {"fp32": {"gops": 50.0, "via": "torch"}, "int8": {"gops": 100.0, "via": "onnxruntime"}},
        "candidates": {}})
    fake_coreml = tmp_path / "coreml"
    fake_coreml.mkdir()
    (fake_coreml / "manifest.json").write_text(json.dumps({"kind": "coreml", "config": {"compress": "palettize-6"}}))
    out = tmp_path / "bench.json"
    r = CliRunner().invoke(app, ["bench", str(tiny_dir), str(tiny_onnx), str(fake_coreml), "-o", str(out),
                                 "--repeats", "3", "--warmup", "1", "--note", "test"])
    assert r.exit_code == 0, r.output
    data = json.loads(out.read_text())
    assert data["kind"] == "bench" and data["note"] == "test" and data["cpu_cores"] >= 1
    assert list(data["results"]) == ["torch eager fp32", "ort fp32"]
    for row in data["results"].values():
        for stage in ("text_encoder", "unet", "vae_decoder", "end_to_end"):
            st = row[stage]
            assert st["n"] == 3 and 0 < st["median_s"] <= st["p90_s"] and st["pct_of_peak"] > 0
            assert st["peak_precision"] == "fp32"
    ort = data["results"]["ort fp32"]["end_to_end"]
    assert len(ort["speedup_vs_torch_eager_fp32_range"]) == 2
    for k in ("torch eager fp32", "ort fp32"):  # peak RSS per runtime
        m = data["memory"][k]
        assert m["load_mib"] >= 0 and m["run_peak_mib"] >= 0 and m["peak_rss_mib"] == pytest.approx(m["load_mib"] + m["run_peak_mib"], abs=0.11)
    assert data["memory"]["ort fp32"]["load_mib"] > 0
    assert data["skipped"] == {"coreml palettize-6": f"Core ML prediction needs macOS (this machine runs {sys.platform})"}
    assert data["runtime_versions"]["onnxruntime"] and data["runtime_versions"]["torch"]
    assert data["matmul_peak_gflops"] == 50.0 and data["gpu"] is None
    assert "coreml palettize-6: not timed" in r.output
    md = tables(data).splitlines()
    assert md[0].startswith("| runtime |") and len(md) == 4 and md[3].startswith("| ort fp32 |")
    # refusing to overwrite without --force; the old entry point still works
    r2 = CliRunner().invoke(app, ["bench", str(tiny_dir), "-o", str(out)])
    assert r2.exit_code == 2 and "already exists" in _one_error_line(r2)
    from instaflow_edge.bench import onnx_latency

    assert onnx_latency.main(["--markdown", str(out)]) == 0


def test_stage_precisions_follow_the_scheme():
    from instaflow_edge.bench.latency import stage_precisions
    from instaflow_edge.runtime.onnx import stage_precisions as onnx_stages

    p = onnx_stages("int8-static", ["text_encoder", "unet"])
    assert p == {"text_encoder": "int8", "unet": "int8", "vae_decoder": "fp32", "end_to_end": "int8", "generator": "int8"}
    assert set(onnx_stages(None, []).values()) == {"fp32"} and onnx_stages("fp16", ["unet"])["unet"] == "fp16"
    assert set(stage_precisions(None, "cuda").values()) == {"fp16"}


def test_readme_tables_are_generated_from_their_json(capsys):
    """The README's headline tables (and the docs' tables written the same way) are blocks regenerated
    from committed JSON, and are up to date."""
    from instaflow_edge.bench.tables import BLOCK, main

    root = Path(__file__).resolve().parents[1]
    readme = root / "README.md"
    assert len(BLOCK.findall(readme.read_text(encoding="utf-8"))) >= 3, \
        "the README's headline tables should be <!-- table: FILE.json --> blocks"
    files = [readme, *(p for p in sorted((root / "docs").glob("*.md")) if BLOCK.search(p.read_text(encoding="utf-8")))]
    assert main([a for f in files for a in ("--readme", str(f))] + ["--check"]) == 0, capsys.readouterr().out


def test_a_stale_readme_table_is_named_and_regenerated(tmp_path, capsys):
    from instaflow_edge.bench.tables import main, tables

    src = Path(__file__).resolve().parents[1] / "docs" / "results" / "bench-tiny-cpu.json"
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "b.json").write_text(src.read_text())
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n<!-- table: r/b.json -->\n| runtime | 1.00 s |\n<!-- /table -->\n\ntail\n")
    assert main(["--readme", str(readme), "--check"]) == 1
    assert "the table from r/b.json is stale" in capsys.readouterr().out
    assert "1.00 s" in readme.read_text()  # --check changes nothing
    assert main(["--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text == "# x\n\n<!-- table: r/b.json -->\n" + tables(json.loads(src.read_text())) + "\n<!-- /table -->\n\ntail\n"
    assert main(["--readme", str(readme), "--check"]) == 0
    readme.write_text("<!-- table: r/missing.json -->\n<!-- /table -->\n")
    with pytest.raises(SystemExit) as e:
        main(["--readme", str(readme)])
    assert e.value.code == 2 and "r/missing.json" in capsys.readouterr().err


def test_source_pipeline_follows_quantized_exports(tmp_path):
    """An export's % of peak counts the FLOPs of the pipeline it was made from: found through the chain
    of manifests (a quantized export names its fp32 export, which names the pipeline)."""
    from instaflow_edge.runtime import source_pipeline

    def folder(name, manifest):
        d = tmp_path / name
        d.mkdir()
        (d / "manifest.json").write_text(json.dumps(manifest))
        return d

    pipe = folder("pruned", {"kind": "pipeline"})
    fp32 = folder("onnx", {"kind": "onnx-export", "source": {"model": str(pipe)}})
    int8 = folder("int8", {"kind": "onnx-export", "source": {"model": str(fp32)}})
    assert source_pipeline(fp32) == pipe and source_pipeline(int8) == pipe
    hub = folder("hub", {"kind": "onnx-export", "source": {"model": "org/model-on-the-hub"}})
    assert source_pipeline(hub) is None and source_pipeline(folder("bare", {"kind": "onnx-export"})) is None


def test_an_export_of_another_pipeline_counts_its_own_flops(tiny_dir, tiny_onnx, tmp_path, monkeypatch):
    """MODEL is a copy of tiny, the export was made from tiny itself: the export's % of peak uses the FLOPs
    of the pipeline it came from (recorded in gflop_by_export), counted once."""
    import shutil

    from instaflow_edge.bench import peaks

    monkeypatch.setattr(peaks, "measure_peaks", lambda threads: {
        "threads": threads, "n": 0, "peaks": {"fp32": {"gops": 50.0, "via": "torch"}}, "candidates": {}})
    other = tmp_path / "model"
    shutil.copytree(tiny_dir, other)
    out = tmp_path / "bench.json"
    r = CliRunner().invoke(app, ["bench", str(other), str(tiny_onnx), "-o", str(out), "--repeats", "1", "--warmup", "0"])
    assert r.exit_code == 0, r.output
    data = json.loads(out.read_text())
    assert list(data["gflop_by_export"]) == ["ort fp32"]
    assert data["gflop_by_export"]["ort fp32"]["unet"] == pytest.approx(data["gflop"]["unet"])  # same architecture
