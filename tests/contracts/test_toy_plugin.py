"""An installed plug-in format (an entry point in ``instaflow_edge.formats``) is a ``--backend`` choice of
the command line and its exports open by their manifest's kind, with no file of this package edited.

The plug-in is installed the way pip leaves a package: a module and a ``.dist-info`` folder with an
``entry_points.txt``, on the import path (PYTHONPATH for the subprocess, sys.path in-process).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from toy_plugin import write_toy_export

from instaflow_edge import runtime


def _install(site: Path, name: str, entry: str, module_source: Path | None) -> Path:
    """``site`` holds a distribution ``name`` whose entry point ``toy`` (or ``name``) is ``entry``."""
    info = site / f"{name}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{runtime.ENTRY_POINTS}]\n{entry}\n")
    if module_source is not None:
        shutil.copy(module_source, site / module_source.name)
    return site


@pytest.fixture
def plugin_site(tmp_path):
    return _install(tmp_path / "site", "toy-plugin", "toy = toy_plugin:FORMAT", Path(__file__).with_name("toy_plugin.py"))


@pytest.fixture
def on_path(monkeypatch):
    """Put a site folder on sys.path for this test; the registry forgets its plug-ins before and after."""
    def add(site: Path):
        monkeypatch.syspath_prepend(str(site))
        runtime._plugins.cache_clear()
    yield add
    runtime._plugins.cache_clear()
    runtime.unregister("toy")



def test_an_installed_plugin_is_a_backend_choice_of_the_cli(plugin_site, tiny_dir, tmp_path):
    from PIL import Image

    export = write_toy_export(tmp_path / "toy-export", tiny_dir, 1.0)
    env = {**os.environ, "PYTHONPATH": str(plugin_site)}
    cli = [sys.executable, "-m", "instaflow_edge.cli"]
    r = subprocess.run([*cli, "generate", "--help"], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "toy" in r.stdout
    r = subprocess.run([*cli, "generate", str(export), "a fox", "--backend", "toy", "-o", str(tmp_path / "g")],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    r0 = subprocess.run([*cli, "generate", str(tiny_dir), "a fox", "-o", str(tmp_path / "t")], capture_output=True, text=True)
    assert r0.returncode == 0, r0.stderr
    a, b = (np.asarray(Image.open(next((tmp_path / d).glob("*.png")))).astype(int) for d in ("g", "t"))
    assert np.abs(a - b).max() <= 1  # the plug-in's runtime made it: gain 1 is the pipeline's image
    # without the plug-in on the path, the choice does not exist
    r = subprocess.run([*cli, "generate", str(export), "a fox", "--backend", "toy", "-o", str(tmp_path / "n")],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "toy" in r.stderr and not (tmp_path / "n").exists()


def test_a_plugin_export_opens_by_its_kind_in_bench_and_report(plugin_site, on_path, tiny_dir, tmp_path, monkeypatch):
    from instaflow_edge.bench import peaks
    from instaflow_edge.bench.latency import BenchConfig, bench
    from instaflow_edge.report.build import ReportConfig, make_report

    on_path(plugin_site)
    assert "toy" in runtime.names() and "toy" not in runtime._REGISTERED  # named, not imported, until needed
    assert "toy" in runtime.backend_names()
    good, bad = (write_toy_export(tmp_path / f"toy-{g:g}", tiny_dir, g) for g in (1.0, 1.5))
    assert runtime.format_of(good) == "toy" and not runtime.is_export(tiny_dir)
    monkeypatch.setattr(peaks, "measure_peaks", lambda threads: {
        "threads": threads, "n": 0, "peaks": {"fp32": {"gops": 50.0, "via": "fixed"}}, "candidates": {}})
    b = bench(BenchConfig(model=str(tiny_dir), exports=[str(good)], output=str(tmp_path / "b.json"), warmup=0, repeats=1),
              progress=False)
    assert b["results"]["toy x1"]["end_to_end"]["n"] == 1
    rep = make_report(ReportConfig(model=str(tiny_dir), output=str(tmp_path / "r"), exports=[str(good), str(bad)]),
                      progress=False)
    assert rep["verdicts"]["toy x1"]["pass"] is True and rep["verdicts"]["toy x1.5"]["pass"] is False


@pytest.mark.parametrize("entry, module, says", [
    ("broken = no_such_module:FORMAT", None, "failed to load (ModuleNotFoundError"),
    ("broken = json:dumps", None, "is not a RuntimeFormat named 'broken'"),
])
def test_a_broken_plugin_is_one_line_and_stops_nothing_else(entry, module, says, on_path, tiny_dir, tmp_path):
    from instaflow_edge.errors import ModelError

    on_path(_install(tmp_path / "site", "broken-plugin", entry, module))
    assert "broken" in runtime.names()
    with pytest.raises(ModelError) as e:
        runtime.get("broken")
    assert says in str(e.value) and "\n" not in str(e.value)
    assert not runtime.is_export(tiny_dir)  # a pipeline folder: no plug-in imported to say so
    onnx_like = tmp_path / "other"
    onnx_like.mkdir()
    (onnx_like / "manifest.json").write_text('{"kind": "someone-elses-export"}')
    with pytest.raises(Exception) as e:  # an unknown kind: the usual one-line refusal, the broken plug-in skipped
        runtime.format_of(onnx_like)
    assert "is not an export folder" in str(e.value)
