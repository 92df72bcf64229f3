"""``instaflow-edge report``: a report over tiny with ONNX exports (and, slow, int8 and a Core ML
palettize-6 export), opened in headless Chromium (Debian's package, driven by Playwright through
``executable_path``; never a browser download): no console errors, no request leaves the page, every
image decodes, every figure in the tables equals report.json's; a screenshot is saved as an artifact
(``$INSTAFLOW_EDGE_ARTIFACTS`` or the test's temporary folder)."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from instaflow_edge.cli import app

CHROMIUM = "/usr/bin/chromium"


def _artifacts(tmp_path: Path) -> Path:
    d = Path(os.environ.get("INSTAFLOW_EDGE_ARTIFACTS") or tmp_path / "artifacts")
    d.mkdir(parents=True, exist_ok=True)
    return d


def _walk(obj, path):
    for k in path:
        obj = obj[k]
    return obj


def _matches(text: str, value, scale: float = 1.0) -> bool:
    """Whether the page's ``text`` shows the JSON's ``value`` at the precision the text has."""
    text = text.strip()
    if value is None:
        return text in ("inf", "–")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return text == str(value)
    shown = float(text.replace(",", ""))
    v = value * scale
    m = re.search(r"\.(\d+)", text.split("e")[0])
    decimals = len(m.group(1)) if m else 0
    if "e" in text:  # 1.43e-06: three significant figures
        return math.isclose(shown, v, rel_tol=6e-3)
    return abs(shown - v) <= 0.51 * 10 ** -decimals + 5e-4 * abs(v)


def check_in_browser(folder: Path, shot: Path, n_images: int) -> dict:
    """Open ``folder/report.html`` in headless Chromium and check it; returns what was seen."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip extra 'browser')")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium (.ci/run does, as root)")
    report = json.loads((folder / "report.json").read_text())
    errors, requests = [], []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 390, "height": 844})  # a phone
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: requests.append(r.url))
            page.goto((folder / "report.html").resolve().as_uri())
            page.wait_for_load_state("load")
            widths = page.eval_on_selector_all("img", "els => els.map(e => [e.complete, e.naturalWidth])")
            cells = page.eval_on_selector_all("td[data-path]", "els => els.map(e => [e.dataset.path, e.dataset.scale || '1', e.textContent])")
            verdicts = page.eval_on_selector_all("li[data-verdict]", "els => els.map(e => e.textContent)")
            # the page fits a phone: nothing but the tables' own scrollers is wider than the screen
            overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert errors == []
    assert all(u.startswith(("file:", "data:")) for u in requests), requests  # self-contained
    assert len(widths) == n_images and all(c and w > 0 for c, w in widths), widths
    assert overflow <= 0
    assert len(cells) > 20
    bad = [(p, t, _walk(report, json.loads(p))) for p, s, t in cells if not _matches(t, _walk(report, json.loads(p)), float(s))]
    assert bad == []
    assert verdicts == [v["line"] for v in report["verdicts"].values()]
    assert shot.stat().st_size > 10_000
    return report


def _bench_json(path: Path, labels: list[str]) -> Path:
    """A CPU bench result shaped as `instaflow-edge bench` writes it (figures made up: this tests the
    table and the chart, not a machine)."""
    res = {}
    for i, k in enumerate(labels):
        st = {s: {"median_s": 0.01 * (i + 1), "p90_s": 0.012 * (i + 1), "n": 3, "pct_of_peak": 10.0 + i,
                  "speedup_vs_" + labels[0].replace(" ", "_"): round(1 / (i + 1), 3)}
              for s in ("text_encoder", "unet", "vae_decoder")}
        st["end_to_end"] = {"median_s": 0.03 * (i + 1), "p90_s": 0.036 * (i + 1), "n": 3, "pct_of_peak": 12.0,
                            "speedup_vs_" + labels[0].replace(" ", "_"): round(1 / (i + 1), 3)}
        res[k] = st
    data = {"kind": "bench", "device": "cpu", "threads": 1, "cpu_cores": 2, "gpu": None, "results": res,
            "memory": {k: {"load_mib": 10.0, "run_peak_mib": 5.0, "peak_rss_mib": 15.0} for k in labels},
            "skipped": {}, "machine": {"cpu": {"logical_cores": 2}}}
    path.write_text(json.dumps(data))
    return path


@pytest.fixture(scope="module")
def tiny_exports(tiny_onnx_fp32):
    """The folder holding the shared ``onnx-fp32`` export."""
    return tiny_onnx_fp32.parent


def test_report_tiny_onnx_in_chromium(tiny_dir, tiny_exports, tmp_path):
    out = tmp_path / "rep"
    bench = _bench_json(tmp_path / "bench.json", ["torch eager fp32", "ort fp32"])
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox in snow\na blue house\n")
    r = CliRunner().invoke(app, ["report", str(tiny_dir), str(tiny_exports / "onnx-fp32"), "-o", str(out),
                                 "--bench", str(bench), "--prompts", str(prompts)])
    assert r.exit_code == 0, r.output
    assert "ort fp32: PASS" in r.output
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "heatmap-ort-fp32.png", "latency.png", "manifest.json",
                                                      "report.html", "report.json", "report.md"]
    report = check_in_browser(out, _artifacts(tmp_path) / "report-tiny-onnx.png", n_images=3)
    assert report["prompts"] == ["a red fox in snow", "a blue house"] and report["seeds"] == [0, 1]
    par = report["parity"]["ort fp32"]
    # image to image too: the export's encoder and its edit of the reference's next image (strength 0.6)
    assert set(par) == {"text_encoder", "unet", "vae_decoder", "end_to_end", "vae_encoder", "image_to_image"}
    assert all(row["gate"] == 60.0 and row["pass"] and (row["psnr"] is None or row["psnr"] > 60) for row in par.values()), par
    assert report["image_to_image"]["strength"] == 0.6 and report["image_to_image"]["exports"] == {"ort fp32": True}
    assert report["verdicts"]["ort fp32"]["pass"] is True
    sizes = report["runtimes"]["ort fp32"]["sizes"]["unet"]
    assert sizes["params"] > 0 and 30 < sizes["bits_per_weight"] < 40  # fp32 weights + the graph
    lat = report["latency"]
    assert [r["runtime"] for r in lat["rows"]] == ["torch eager fp32", "ort fp32"]
    assert lat["gpu_missing"] and [m["runtime"] for m in lat["missing"]] == ["torch fp16 eager", "torch fp16 compile",
                                                                            "ort fp32 (CUDA provider)"]
    assert report["digits"] is None  # tiny is not a digits model
    md = (out / "report.md").read_text()
    assert "ort fp32: PASS" in md and "![image grid](grid.png)" in md and "| ort fp32 | image_to_image |" in md
    from instaflow_edge.bench.tables import tables

    rows = tables(report).splitlines()
    assert rows[0].startswith("| runtime | size MB") and rows[3].startswith("| ort fp32 |") and "| pass |" in rows[3]
    assert "missing" in rows[3]  # no GPU result
    # an existing report is replaced only with --force
    r = CliRunner().invoke(app, ["report", str(tiny_dir), "-o", str(out)])
    assert r.exit_code == 2 and "already exists" in r.output
    r = CliRunner().invoke(app, ["report", str(tiny_dir), "-o", str(out), "--force"])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "report.json").read_text())["verdicts"] == {}  # the reference alone now


@pytest.mark.slow
def test_report_tiny_onnx_int8_and_coreml_palettize6(tiny_dir, tiny_exports, tmp_path):
    """The issue's case: ONNX fp32 + int8 and a Core ML palettize-6 export of tiny, in Chromium."""
    pytest.importorskip("coremltools")
    from instaflow_edge.convert import ConvertConfig, export
    from instaflow_edge.quantize.onnx_folder import QuantizeConfig, quantize

    int8 = tmp_path / "onnx-int8"
    quantize(QuantizeConfig(source=str(tiny_exports / "onnx-fp32"), output=str(int8), scheme="int8-static"))
    cm = tmp_path / "coreml-p6"
    export(ConvertConfig.of("coreml", model=str(tiny_dir), output=str(cm), compress="palettize-6"))
    out = tmp_path / "rep"
    r = CliRunner().invoke(app, ["report", str(tiny_dir), str(tiny_exports / "onnx-fp32"), str(int8), str(cm), "-o", str(out)])
    assert r.exit_code == 0, r.output
    report = check_in_browser(out, _artifacts(tmp_path) / "report-tiny.png", n_images=4)
    assert list(report["verdicts"]) == ["ort fp32", "ort int8-static", "coreml palettize-6"]
    assert all(v["pass"] for v in report["verdicts"].values())
    q = report["parity"]["ort int8-static"]
    assert q["unet"]["gate"] == 25.0 and q["vae_decoder"]["gate"] is None and 25 < q["end_to_end"]["psnr"] < 100
    c = report["runtimes"]["coreml palettize-6"]
    assert "exactly as converted" in c["how"] and "Core ML cannot predict" in c["how"]
    assert all(row["gate"] == 20.0 for row in report["parity"]["coreml palettize-6"].values())
    assert 6 <= c["sizes"]["unet"]["bits_per_weight"] < 10  # 6-bit palettes (+ lookup tables, unpalettized layers)
    # the figures agree with what the converter measured on the same modules (different prompts: loosely)
    conv = json.loads((cm / "manifest.json").read_text())["end_to_end"]["psnr"]
    assert abs(report["parity"]["coreml palettize-6"]["end_to_end"]["psnr"] - conv) < 10


def test_report_refusals_are_one_line(tiny_dir, tiny_exports, tmp_path):
    from instaflow_edge.presets import InitConfig, init

    other = tmp_path / "other"
    init(InitConfig(preset="tiny", output=str(other), seed=1))
    bad_bench = tmp_path / "b.json"
    bad_bench.write_text('{"x": 1}')
    cases = [
        ([str(tmp_path), "-o", str(tmp_path / "r")], "not a pipeline folder"),
        ([str(tiny_dir), str(tmp_path), "-o", str(tmp_path / "r")], "not an export folder"),
        ([str(tiny_dir), "-o", str(tmp_path / "r"), "--bench", str(bad_bench)], "not a bench result"),
        ([str(tiny_dir), "-o", str(tmp_path / "r"), "--bench", str(tmp_path / "none.json")], "no such file"),
        ([str(tiny_dir), "-o", str(tmp_path / "r"), "--digits-images", "15"], "--digits-images"),
        ([str(tiny_dir), "-o", str(tiny_dir / "r")], "inside the input"),
        ([str(other), str(tiny_exports / "onnx-fp32"), "-o", str(tmp_path / "r")], "another model"),
    ]
    for args, words in cases:
        r = CliRunner().invoke(app, ["report", *args])
        errs = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
        assert r.exit_code == 2 and len(errs) == 1 and words in errs[0], (args, r.output)
        assert not (tmp_path / "r").exists() and not (tiny_dir / "r").exists()


def test_digits_models_are_recognized_by_their_manifest_chain(tmp_path):
    from instaflow_edge.report.build import is_digits_model

    base, student, other = tmp_path / "base", tmp_path / "student", tmp_path / "other"
    for d in (base, student, other):
        d.mkdir()
    (base / "manifest.json").write_text(json.dumps({"kind": "pipeline", "preset": "digits", "model": {"source": "preset:digits"}}))
    (student / "manifest.json").write_text(json.dumps({"kind": "pipeline", "base_model": str(base)}))
    (other / "manifest.json").write_text(json.dumps({"kind": "pipeline", "model": {"source": "preset:tiny"}}))
    assert is_digits_model(student) and is_digits_model(base)
    assert not is_digits_model(other) and not is_digits_model(tmp_path / "missing")


def test_nan_or_shape_mismatch_is_a_failed_row_not_a_crash():
    import numpy as np

    from instaflow_edge.report.build import _parity, verdict

    ref = np.ones((1, 3, 4, 4))
    out = ref.copy()
    out[0, 0, 0, 0] = np.nan
    nan = _parity("end_to_end", ref, out, 35.0)
    assert nan["pass"] is False and "NaN" in nan["error"]
    shape = _parity("unet", ref, ref[:, :2], 35.0)
    assert shape["pass"] is False and "shape" in shape["error"]
    ok = _parity("text_encoder", ref, ref, 35.0)
    assert ok["pass"] is True and ok["psnr"] is None  # identical: inf, stored as null
    v = verdict("x", {"text_encoder": ok, "unet": shape, "end_to_end": nan})
    assert v["pass"] is False and v["failed"] == ["unet", "end_to_end"] and v["line"].startswith("x: FAIL")
    assert verdict("y", {"unet": _parity("unet", ref, ref, None)})["pass"] is None  # no gate: not judged


def test_summary_table_from_a_report_json():
    from instaflow_edge.bench.tables import summary

    par = {"end_to_end": {"psnr": 48.0, "max_abs": 0.1, "cosine": 0.99, "gate": 25.0, "pass": True}}
    sizes = {"unet": {"bytes": 1000, "params": 1000, "bits_per_weight": 8.0}}
    report = {
        "kind": "report",
        "runtimes": {"torch fp32 (reference)": {"total_bytes": 4_000_000, "sizes": {"unet": {"bits_per_weight": 32.0}}},
                     "ort int8-static": {"total_bytes": 1_000_000, "sizes": sizes}},
        "parity": {"ort int8-static": par},
        "verdicts": {"ort int8-static": {"pass": True, "line": "x"}},
        "digits": {"runtimes": {"torch fp32 (reference)": {"accuracy": 0.5, "fid": 10.0},
                                "ort int8-static": {"accuracy": 0.49, "fid": 10.5}},
                   "real": {"accuracy": 0.99, "fid": 2.0}},
        "latency": {"rows": [{"runtime": "torch eager fp32", "device": "cpu", "end_to_end_s": 0.02, "speedup_vs_first": 1.0},
                             {"runtime": "ort int8-static", "device": "cpu", "end_to_end_s": 0.01, "speedup_vs_first": 2.0},
                             {"runtime": "torch fp16 eager", "device": "cuda", "end_to_end_s": 0.001, "speedup_vs_first": 1.0}]},
    }
    rows = summary(report).splitlines()
    assert rows[0] == ("| runtime | size MB | bits / weight (UNet) | end-to-end PSNR dB (gate) | digits accuracy | "
                       "digits-FID | CPU ms (× torch) | CUDA ms (× torch) | verdict |")
    assert rows[2] == "| torch fp32 (reference) | 4 | 32.00 | reference | 0.500 | 10.00 | 20 (1.00×) | 1 (1.00×) | reference |"
    assert rows[3] == "| ort int8-static | 1 | 8.00 | 48.0 (25) | 0.490 | 10.50 | 10 (2.00×) | – | pass |"
    assert rows[4].startswith("| real digits (ceiling) |") and "0.990 | 2.00" in rows[4]


HOSTILE = "<script>alert(1)</script><img src=x onerror=alert(2)>|`x`[l](javascript:alert(3))"


def test_report_escapes_every_string_from_its_inputs(tiny_dir, tmp_path):
    """Strings of a bench result from someone else (a runtime name, the note, the device, a skip reason)
    and a path reach report.html HTML-escaped and report.md inert: no live tag, link or table break."""
    bench = _bench_json(tmp_path / "bench.json", ["torch eager fp32", HOSTILE])
    data = json.loads(bench.read_text())
    data.update(note=HOSTILE, device="cpu" + HOSTILE, created=HOSTILE, skipped={HOSTILE: HOSTILE})
    bench.write_text(json.dumps(data))
    out = tmp_path / "rep"
    r = CliRunner().invoke(app, ["report", str(tiny_dir), "-o", str(out), "--bench", str(bench)])
    assert r.exit_code == 0, r.output
    page = (out / "report.html").read_text()
    md = (out / "report.md").read_text()
    for text in (page, md):
        assert "<script" not in text and "<img src=x" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in md
    assert not re.search(r"(?<!\\)\]\(javascript:", md)  # the brackets are escaped: no link
    # every markdown table row keeps its column count (a | in a cell is escaped)
    for block in md.split("\n\n"):
        rows = [ln for ln in block.splitlines() if ln.startswith("|")]
        if rows:
            counts = {len(re.findall(r"(?<!\\)\|", ln)) for ln in rows}
            assert len(counts) == 1, rows
