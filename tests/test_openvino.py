"""OpenVINO: the measured peaks (bench/peaks.py), convert --target openvino, generate --backend openvino."""

from __future__ import annotations

import pytest


def test_measure_peaks_small_gemm_every_precision_has_a_peak():
    from instaflow_edge.bench.peaks import PRECISIONS, measure_peaks, pct_of_peak

    res = measure_peaks(1, n=128, seconds=0.01)
    assert res["threads"] == 1 and res["n"] == 128
    for p in PRECISIONS:
        assert p in res["candidates"]
    # torch runs all three on any x86 CPU: every precision has a positive peak from some runtime
    for p in PRECISIONS:
        peak = res["peaks"][p]
        assert peak["gops"] > 0 and peak["via"] in res["candidates"][p]
        assert res["candidates"][p][peak["via"]] == peak["gops"]
    assert pct_of_peak(res["peaks"]["fp32"]["gops"] * 1e9, 1.0, res, "fp32") == pytest.approx(100.0)
    assert pct_of_peak(1.0, 1.0, res, "f4") is None


def test_measure_peaks_refuses_bad_threads():
    from instaflow_edge.bench.peaks import measure_peaks

    with pytest.raises(ValueError, match="threads must be a positive integer"):
        measure_peaks(0)


# --- convert --target openvino, generate/eval --backend openvino (tiny preset) ---------------------

import json  # noqa: E402
import shutil  # noqa: E402
import re  # noqa: E402

import numpy as np  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from instaflow_edge.cli import app  # noqa: E402

runner = CliRunner()
ov = pytest.importorskip("openvino")


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def manifest(folder):
    return json.loads((folder / "manifest.json").read_text())


def assert_one_line_error(r, code, *words, nothing_at=None):
    assert r.exit_code == code, r.output
    err = (r.stderr if r.stderr_bytes is not None else r.output).strip().splitlines()
    err = [line for line in err if not re.match(r"\[openvino +\d+s\] ", line)]  # stage lines may precede it
    assert len(err) == 1 and err[0].startswith("error:"), err
    for w in words:
        assert w in err[0], err[0]
    if nothing_at is not None:
        assert not nothing_at.exists()
        assert not [p for p in nothing_at.parent.iterdir() if p.name.startswith(f".{nothing_at.name}.")]


def _convert(tiny_dir, out, *opts):
    r = run("convert", tiny_dir, "--target", "openvino", "-o", out, *opts)
    assert r.exit_code == 0, r.output
    m = manifest(out)
    for row in m["parity"]:  # the gate held for every component and end to end (asserted here, not only inside)
        assert row["psnr"] is None or row["psnr"] >= m["gates"][row["component"]], row
    return m


@pytest.fixture(scope="session")
def ov_f32(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("openvino") / "f32"
    _convert(tiny_dir, out, "--precision", "f32")
    return out


def test_convert_f32_layout_parity_and_manifest(ov_f32):
    m = manifest(ov_f32)
    for name in ("text_encoder", "unet", "vae_decoder", "vae_encoder"):
        assert (ov_f32 / name / "model.xml").is_file() and (ov_f32 / name / "model.bin").is_file()
        assert not (ov_f32 / name / "model.onnx").exists()
    assert not (ov_f32 / ".onnx").exists()  # the scratch ONNX export is gone
    assert (ov_f32 / "tokenizer").is_dir()
    assert m["kind"] == "openvino-export" and m["openvino"]["precision"] == "f32"
    assert set(m["parity_ran_in"].values()) == {"f32"}
    psnr = {r["component"]: r["psnr"] for r in m["parity"]}
    assert set(psnr) == {"text_encoder", "unet", "vae_decoder", "vae_encoder", "end_to_end"}
    assert all(p is None or p >= 60 for p in psnr.values()), psnr  # f32 is the fp32 gate
    assert m["gates"]["end_to_end"] == 60.0
    # static shapes: the IR is compiled for the export's size, batch 1
    model = ov.Core().read_model(str(ov_f32 / "unet" / "model.xml"))
    assert all(i.get_partial_shape().is_static for i in model.inputs)


def test_generate_openvino_matches_torch(ov_f32, tiny_dir, tmp_path):
    from PIL import Image

    from instaflow_edge.parity import psnr

    outs = {}
    for name, model, backend in (("torch", tiny_dir, "torch"), ("ov", ov_f32, "openvino")):
        r = run("generate", model, "a red fox in snow", "a cat wearing a hat", "--backend", backend, "-o", tmp_path / name)
        assert r.exit_code == 0, r.output
        m = manifest(tmp_path / name)
        outs[name] = np.stack([np.asarray(Image.open(tmp_path / name / i["file"]), dtype=np.float64) / 255 for i in m["images"]])
    assert m["sampling"]["backend"] == "openvino" and m["sampling"]["ran_precision"] == "f32"
    assert psnr(outs["torch"], outs["ov"]) >= 40
    assert np.abs(outs["torch"] - outs["ov"]).max() <= 1.5 / 255


@pytest.mark.parametrize("strength", [0.6, 0.25])
def test_the_openvino_export_edits_as_generate_does(strength, ov_f32, tiny_dir, edit_image):
    """Image-to-image through OpenVINO (vae_encoder/ and the straight-path UNet graph, compiled static):
    the torch backend's image, within a level (f32)."""
    want = edit_image(tiny_dir, "torch", strength)
    got = edit_image(ov_f32, "openvino", strength)
    assert np.abs(want - got).max() <= 1, np.abs(want - got).max()


def test_bench_times_an_openvino_export(ov_f32, tiny_dir, tmp_path, monkeypatch):
    """``instaflow-edge bench`` takes an OpenVINO export beside the torch row: every stage timed, its
    precision (what it ran in) used for the % of peak, the OpenVINO version recorded."""
    from instaflow_edge.bench import peaks
    from instaflow_edge.runtime.openvino import open_openvino

    monkeypatch.setattr(peaks, "measure_peaks", lambda threads: {  # measured in test_measure_peaks_*; fixed here
        "threads": threads, "n": 0, "peaks": {"fp32": {"gops": 50.0, "via": "torch"}, "bf16": {"gops": 80.0, "via": "openvino"}},
        "candidates": {}})
    out = tmp_path / "bench.json"
    r = run("bench", tiny_dir, ov_f32, "-o", out, "--repeats", "2", "--warmup", "1")
    assert r.exit_code == 0, r.output
    data = json.loads(out.read_text())
    assert list(data["results"]) == ["torch eager fp32", "openvino f32"]
    for stage in ("text_encoder", "unet", "vae_decoder", "end_to_end"):
        st = data["results"]["openvino f32"][stage]
        assert st["n"] == 2 and 0 < st["median_s"] <= st["p90_s"] and st["peak_precision"] == "fp32"
        assert st["speedup_vs_torch_eager_fp32"] > 0
    assert data["runtime_versions"]["openvino"]
    # an export that ran in bf16 is held against the bf16 peak; NNCF int8 against int8, weight-only not
    # the stage precisions are what the compiled models run in (f32 here), an NNCF int8 UNet held
    # against int8, a weight-only one against the precision it computes in
    m = manifest(ov_f32)
    for scheme, want in ((None, "fp32"), ("int8", "int8"), ("int8-weights", "fp32")):
        m2 = {**m, "quantize": {"scheme": scheme, "components": ["text_encoder", "unet"] if scheme else []}}
        p = open_openvino(ov_f32, m2).stage_precisions
        assert p["unet"] == want and p["vae_decoder"] == "fp32" and p["end_to_end"] == want


def test_runtime_recompiles_in_each_precision_against_torch(ov_f32, tiny_pipe):
    """The f32 IR compiled with each precision hint: the end-to-end image still meets the gate of the
    precision the CPU ran (bf16/f16 hints run bf16 or f16 where the CPU has them, else f32)."""
    from instaflow_edge.components import EXAMPLE_PROMPTS
    from instaflow_edge.convert.openvino import gate_for
    from instaflow_edge.generator import OneStepGenerator, make_noise
    from instaflow_edge.parity import compare
    from instaflow_edge.runtime import openvino as ovrt

    import torch

    facts, _ = ovrt.export_facts(ov_f32)
    ids = tiny_pipe.tokenize(EXAMPLE_PROMPTS[:1])
    noise = make_noise([0], facts.latent_shape)
    with torch.no_grad():
        ref = OneStepGenerator.from_pipeline(tiny_pipe)(ids, noise).numpy()
    for p in ovrt.OvPrecision:
        export = ovrt.open_openvino(ov_f32, manifest(ov_f32), precision=p)
        ran = export.details["ran_precision"]
        assert ran in ("f32", "bf16", "f16")
        if p is ovrt.OvPrecision.f32:
            assert ran == "f32"
        row = compare("end_to_end", ref, export.sample(ids.numpy(), noise.numpy()))
        assert row.psnr >= gate_for(ran, None), (p, ran, row)


@pytest.mark.slow
@pytest.mark.parametrize("opts", [("--precision", "auto"), ("--precision", "bf16"), ("--precision", "f16"),
                                  ("--precision", "f32", "--quantize", "int8"),
                                  ("--precision", "f32", "--quantize", "int8-hybrid"),
                                  ("--precision", "f32", "--quantize", "int8-weights"),
                                  ("--precision", "f32", "--quantize", "int4-weights")],
                         ids=lambda o: "-".join(o[1::2]))
def test_convert_every_precision_and_scheme(tiny_dir, ov_f32, tmp_path, opts):
    m = _convert(tiny_dir, tmp_path / "out", *opts)
    scheme = opts[3] if len(opts) > 2 else None
    assert m["openvino"]["precision"] == opts[1] and m["quantize"]["scheme"] == scheme
    if scheme:
        assert m["quantize"]["components"] == ["text_encoder", "unet"]
        assert m["quantize"]["calibration_prompts"] == (8 if scheme in ("int8", "int8-hybrid") else 0)
        model = ov.Core().read_model(str(tmp_path / "out" / "unet" / "model.xml"))
        ops = {o.get_type_name() for o in model.get_ops()}
        low = {o.get_element_type().get_type_name() for o in model.get_ops() if o.get_type_name() == "Constant"}
        if scheme in ("int8", "int8-hybrid"):
            assert "FakeQuantize" in ops  # activations quantized (int8-hybrid: at the convolutions)
        if scheme != "int8":
            assert low & {"u8", "i8", "u4", "i4"}, low  # weights stored compressed
        assert m["sizes"]["unet"] < 0.5 * manifest(ov_f32)["sizes"]["unet"]
    if opts[1] == "f16":  # weights stored f16: about half the f32 IR
        assert m["sizes"]["unet"] < 0.6 * manifest(ov_f32)["sizes"]["unet"]
    r = run("generate", tmp_path / "out", "a red fox", "--backend", "openvino", "-o", tmp_path / "img")
    assert r.exit_code == 0, r.output


@pytest.mark.slow
def test_failed_gate_writes_nothing(tiny_dir, tmp_path):
    out = tmp_path / "ov"
    r = run("convert", tiny_dir, "--target", "openvino", "--precision", "f32", "--min-psnr", "1000", "-o", out)
    assert_one_line_error(r, 3, "1000.0 dB", "end_to_end", nothing_at=out)
    assert "component" in r.stdout and "≥1000" in r.stdout


@pytest.mark.parametrize("args,words", [
    (("--precision", "fp32"), ("precision", "auto")),
    (("--quantize", "int8-static"), ("quantize", "int8-hybrid")),
    (("--fused",), ("--fused does not apply to --target openvino",)),
    (("--calibration-prompts", "p.txt"), ("--calibration-prompts applies only to --quantize int8",)),
    (("--opset", "17"), ("--opset does not apply to --target openvino",)),
    (("--layout", "native"), ("--layout does not apply to --target openvino",)),
    (("--quantize-component", "unet"), ("--quantize-component needs --quantize",)),
    (("--quantize", "int8", "--quantize-component", "generator"), ("unknown --quantize-component 'generator'",)),
])
def test_bad_convert_options_are_one_line(tiny_dir, tmp_path, args, words):
    out = tmp_path / "ov"
    r = run("convert", tiny_dir, "--target", "openvino", "-o", out, *args)
    assert_one_line_error(r, 2, *words, nothing_at=out)


def test_openvino_precision_does_not_apply_to_onnx(tiny_dir, tmp_path):
    from instaflow_edge.convert import ConvertConfig
    from instaflow_edge.errors import InputError

    with pytest.raises(InputError, match="does not apply to --target onnx"):
        ConvertConfig.of("onnx", model=str(tiny_dir), output=str(tmp_path / "o"), precision="bf16")
    r = run("convert", tiny_dir, "--target", "onnx", "--precision", "bf16", "-o", tmp_path / "o")
    assert_one_line_error(r, 2, "precision", nothing_at=tmp_path / "o")


def test_bad_openvino_folders_are_one_line(ov_f32, tiny_dir, tmp_path):
    r = run("generate", tiny_dir, "a fox", "--backend", "openvino", "-o", tmp_path / "a")
    assert_one_line_error(r, 2, "has no OpenVINO export manifest", nothing_at=tmp_path / "a")
    broken = tmp_path / "broken"
    shutil.copytree(ov_f32, broken)
    (broken / "unet" / "model.bin").unlink()
    r = run("generate", broken, "a fox", "--backend", "openvino", "-o", tmp_path / "b")
    assert_one_line_error(r, 2, "model.bin is missing", nothing_at=tmp_path / "b")
    (broken / "unet" / "model.bin").write_bytes(b"")
    (broken / "unet" / "model.xml").write_text("<net>not ir")
    r = run("generate", broken, "a fox", "--backend", "openvino", "-o", tmp_path / "c")
    assert_one_line_error(r, 2, "is not a model OpenVINO can load", nothing_at=tmp_path / "c")
    r = run("generate", ov_f32, "a fox", "--backend", "openvino", "--height", "128", "-o", tmp_path / "d")
    assert_one_line_error(r, 2, "compiled for 64x64", nothing_at=tmp_path / "d")
    r = run("generate", ov_f32, "a fox", "--backend", "openvino", "--dtype", "float16", "-o", tmp_path / "e")
    assert_one_line_error(r, 2, "--dtype float16 does not apply to --backend openvino", nothing_at=tmp_path / "e")
    m = manifest(ov_f32)
    m["openvino"]["precision"] = "f8"
    swapped = tmp_path / "swapped"
    shutil.copytree(ov_f32, swapped)
    (swapped / "manifest.json").write_text(json.dumps(m))
    r = run("generate", swapped, "a fox", "--backend", "openvino", "-o", tmp_path / "f")
    assert_one_line_error(r, 2, "openvino.precision must be one of", nothing_at=tmp_path / "f")


def test_cpu_paths_ratios_and_table_from_a_report():
    from studies import cpu_paths as cp

    assert cp._paired([2.0, 3.0, 4.0], [1.0, 2.0, 1.0]) == {"median": 2.0, "min": 1.5, "max": 4.0}

    def comp(times, prec="fp32", psnr=50.0):
        return {"median_s": sorted(times)[1], "times_s": times, "precision": prec, "psnr_db": psnr}

    res = {cp.BASE: {c: comp([2.0, 2.0, 2.0]) for c in cp.COMPONENTS},
           cp.PEER: {c: comp([1.0, 1.0, 3.0], "bf16") for c in cp.COMPONENTS}}
    for r in res.values():
        r["end_to_end"] = {"median_s": 0, "times_s": [sum(r[c]["times_s"][k] for c in cp.COMPONENTS) for k in range(3)],
                           "psnr_db": None}
    peaks = {"peaks": {"fp32": {"gops": 100.0, "via": "torch"}, "bf16": {"gops": 200.0, "via": "torch"}}}
    flops = {c: 100e9 for c in cp.COMPONENTS}
    cp.derive(res, flops, peaks)
    assert res[cp.PEER]["unet"]["vs_ort_fp32"] == {"median": 2.0, "min": 0.667, "max": 2.0}
    assert res[cp.BASE]["unet"]["pct_of_peak"] == 50.0  # 100 GFLOP in 2 s at a 100 GOP/s fp32 peak
    assert res[cp.PEER]["unet"]["pct_of_peak"] == 50.0  # 100 GFLOP in 1 s at the 200 GOP/s bf16 peak
    report = {"image": [64, 64], "rounds": 3, "by_threads": {"1": {"results": res}}}
    rows = cp.markdown(report).splitlines()
    assert rows[2].startswith("| runtime | UNet s |")
    assert f"| {cp.PEER} | 1 | 2.00 (0.67–2.00) | 1.00 (1.00–1.00) | 50.0 dB | 50% bf16 |" in rows[5]
    # the target: ORT fp32 (our only row here, end-to-end PSNR unknown = exact) is 0.5× the peer per round
    v = cp.verdict(report)["1"]
    assert v["unet"] == {"row": cp.BASE, "vs_peer": 0.5, "met": False}
    assert any("NOT met" in line for line in rows)


def test_truncated_weights_name_the_bin_and_openvino_reasons_keep_their_message(ov_f32, tmp_path):
    from instaflow_edge.runtime.openvino import openvino_reason

    cut = tmp_path / "cut"
    shutil.copytree(ov_f32, cut)
    b = cut / "unet" / "model.bin"
    size = b.stat().st_size
    with open(b, "r+b") as f:
        f.truncate(size // 2)
    r = run("generate", cut, "a fox", "--backend", "openvino", "-o", tmp_path / "a")
    assert_one_line_error(r, 2, "model.bin is truncated", f"{size // 2:,} bytes", nothing_at=tmp_path / "a")
    e = RuntimeError("Exception from src/inference/src/cpp/core.cpp:84:\nCheck 'is_valid_weights_range(x)' failed at "
                     "src/core/xml_util/src/xml_deserialize_util.cpp:900:\nIncorrect weights in bin file!\n\n")
    assert openvino_reason(e) == "Incorrect weights in bin file!"
