"""The contract every registered export format keeps, checked for each entry of ``runtime.names()``.

A format's export of the ``tiny`` preset (made by its ``convert`` target with the defaults) opens through
``runtime.open_export`` with its facts; ``generate``'s image is the opened export's own image; ``eval``,
``bench`` (one round) and ``report`` accept it; and ``report``'s parity is computed by that format's own
runtime: it equals the parity of the opened export's chain, and a planted export whose UNet weights were
perturbed fails its gate in the report. A format whose runtime cannot run here (Core ML on Linux) is
refused in one line by ``open_export``, skipped with its reason by ``bench``, and stood in for (and
labelled so) by ``report`` where the report knows a stand-in. A format with no runtime in Python (a web
site) is recognized and refused in one line.

A new format gets these tests by being registered; only the planted perturbation needs an entry in
``PERTURB`` (the test names the format that lacks one).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from instaflow_edge import runtime
from instaflow_edge.errors import DeviceError, InputError

PROMPT = "a red fox in snow"
SEED = 3


def _perturb_onnx(folder: Path) -> None:
    import onnx
    from onnx import numpy_helper

    path = folder / "unet" / "model.onnx"
    model = onnx.load(str(path))
    big = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    w = numpy_helper.to_array(big)
    big.CopyFrom(numpy_helper.from_array((w + np.random.default_rng(0).normal(0, 0.5, w.shape) * np.abs(w).mean()).astype(w.dtype), big.name))
    onnx.save(model, str(path))


def _perturb_openvino(folder: Path) -> None:
    import openvino as ov
    from openvino import opset13 as ops

    path = folder / "unet" / "model.xml"
    model = ov.Core().read_model(str(path))
    consts = [op for op in model.get_ops() if op.get_type_name() == "Constant"
              and op.get_element_type() in (ov.Type.f32, ov.Type.f16)]
    big = max(consts, key=lambda c: int(np.prod(c.get_output_shape(0))))
    w = big.get_data().astype(np.float32)
    w = w + np.random.default_rng(0).normal(0, 0.5, w.shape).astype(np.float32) * np.abs(w).mean()
    big.output(0).replace(ops.constant(w.astype(big.get_data().dtype)).output(0))
    tmp = folder / "unet" / "perturbed.xml"
    ov.save_model(model, str(tmp), compress_to_fp16=False)
    del model
    tmp.replace(path)
    tmp.with_suffix(".bin").replace(path.with_suffix(".bin"))


def _perturb_executorch(folder: Path) -> None:
    """The largest UNet convolution weight of the source pipeline, found in the .pte (XNNPACK keeps it
    in OHWI order) and perturbed in place."""
    from safetensors.numpy import load_file

    src = runtime.source_pipeline(folder)
    weights = load_file(str(next((src / "unet").glob("*.safetensors"))))
    path = folder / "unet" / "model.pte"
    data = bytearray(path.read_bytes())
    for w in sorted((w for w in weights.values() if w.ndim == 4), key=lambda w: -w.size):
        packed = np.ascontiguousarray(w.transpose(0, 2, 3, 1), np.float32)
        at = data.find(packed.tobytes())
        if at >= 0:
            noisy = packed + np.random.default_rng(0).normal(0, 0.5, packed.shape).astype(np.float32) * np.abs(packed).mean()
            data[at: at + packed.nbytes] = noisy.tobytes()
            path.write_bytes(bytes(data))
            return
    raise AssertionError("no UNet convolution weight found in the .pte")


# how to plant a broken export of each format (its UNet weights perturbed, everything else as shipped)
PERTURB = {"onnx": _perturb_onnx, "openvino": _perturb_openvino, "executorch": _perturb_executorch,
           "qnn": _perturb_onnx}  # the QDQ UNet's largest weight (uint8), as the CPU provider runs it
# session fixtures that already hold a default-enough export of a format (saves converting twice)
REUSE = {"coreml": "coreml_run", "executorch": "tiny_executorch", "qnn": "tiny_qnn"}


def _runnable_here(name: str) -> bool:
    fmt = runtime.get(name)
    return fmt.open is not None and not fmt.unavailable("cpu")


@pytest.fixture(scope="session")
def exports(tiny_dir, tmp_path_factory, request):
    """``name -> export folder of tiny`` (made on first use, by the format's convert target)."""
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            if name in REUSE:
                held = request.getfixturevalue(REUSE[name])
                made[name] = held[0] if isinstance(held, tuple) else held
            else:
                from instaflow_edge.convert import ConvertConfig, export

                out = tmp_path_factory.mktemp("contract") / name
                try:
                    export(ConvertConfig.of(name, model=str(tiny_dir), output=str(out)))
                except Exception as e:  # a missing optional dependency (openvino, coremltools) skips the format
                    if type(e).__name__ == "MissingDependencyError":
                        pytest.skip(f"{name}: {e}")
                    raise
                made[name] = out
        return made[name]

    return get


def _runnable() -> list[str]:
    return [n for n in runtime.names() if runtime.get(n).open is not None]


@pytest.mark.parametrize("name", runtime.names())
def test_every_convert_target_is_a_registered_format(name):
    from instaflow_edge.convert import Target

    assert name in {t.value for t in Target}, f"format {name} has no convert target"
    fmt = runtime.get(name)
    assert fmt.name == name and runtime.manifest_kind(name) == fmt.kind
    assert runtime.format_of(Path("."), {"kind": fmt.kind}) == name


def test_every_convert_target_has_a_format():
    from instaflow_edge.convert import Target

    assert {t.value for t in Target} <= set(runtime.names())


@pytest.mark.parametrize("name", [n for n in runtime.names() if runtime.get(n).open is None])
def test_a_format_without_a_python_runtime_is_refused_in_one_line(name, tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"kind": runtime.manifest_kind(name)}))
    with pytest.raises(InputError) as e:
        runtime.open_export(tmp_path)
    assert "no runtime here" in e.value.message and e.value.fix
    assert name not in runtime.backend_names()


def test_an_unknown_folder_lists_the_formats(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"kind": "tflite-export"}))
    with pytest.raises(InputError) as e:
        runtime.open_export(tmp_path)
    assert all(runtime.manifest_kind(n) in e.value.message for n in runtime.names())
    with pytest.raises(InputError, match="choose one of"):
        runtime.get("tflite")


@pytest.mark.parametrize("name", _runnable())
def test_the_export_passed_the_conditioning_check(name, exports):
    """Every export's manifest carries its UNet's conditioning figures (the text response against
    PyTorch's, tests/test_conditioning.py), and they clear the gate."""
    m = json.loads((exports(name) / "manifest.json").read_text())
    c = m["conditioning"]
    assert c["gate"] == 0.9 and c["ratio"] >= c["gate"] and c["reference_std"] > 0, c


@pytest.mark.parametrize("name", _runnable())
def test_open_export_facts_and_generate(name, exports, tiny_pipe, tmp_path):
    folder = exports(name)
    if not _runnable_here(name):
        with pytest.raises(DeviceError):
            runtime.open_export(folder)
        return
    from instaflow_edge.generate import GenerateConfig, generate
    from instaflow_edge.generator import make_noise

    export = runtime.open_export(folder)
    assert export.format == name and export.label == runtime.export_label(folder)
    f = export.facts
    assert f.latent_shape == tiny_pipe.latent_shape(*tiny_pipe.image_size())
    assert (f.height, f.width) == tiny_pipe.image_size() and f.scaling_factor == pytest.approx(tiny_pipe.scaling_factor)
    assert f.flow == "rectified_flow" and export.steps == 1
    assert {"text_encoder", "unet", "vae_decoder", "end_to_end"} <= set(export.gates)
    m = generate(GenerateConfig(model=str(folder), prompts=[PROMPT], output=str(tmp_path / "g"), seed=SEED,
                                backend=name), progress=False)
    assert m["sampling"]["backend"] == name and m["sampling"]["export_precision"] == export.precision
    from PIL import Image

    img = np.asarray(Image.open(tmp_path / "g" / m["images"][0]["file"]))
    own = export.sample(export.tokenize([PROMPT]), make_noise([SEED], f.latent_shape).numpy())
    np.testing.assert_array_equal(img, (own[0].transpose(1, 2, 0) * 255).round().astype("uint8"))


@pytest.mark.parametrize("name", _runnable())
def test_generate_edits_an_image_with_the_formats_own_runtime(name, exports, edit_image, source_image):
    """``generate --image --strength`` on an export is the opened export's own ``edit`` of that picture
    (every format with a runtime here ships its VAE encoder), and differs from its text-to-image image."""
    if not _runnable_here(name):
        pytest.skip(f"{name} cannot run here: {runtime.get(name).unavailable('cpu')}")
    from instaflow_edge.data import load_image
    from instaflow_edge.generator import make_noise

    folder = exports(name)
    export = runtime.open_export(folder)
    assert "vae_encoder" in export.facts.components, f"{name} exports no vae_encoder"
    got = edit_image(folder, name, 0.6, prompt=PROMPT, seed=SEED)
    f = export.facts
    picture = load_image(source_image, f.height, f.width)[None].numpy()
    noise = make_noise([SEED], f.latent_shape).numpy()
    own = export.edit(export.tokenize([PROMPT]), picture, noise, 0.6)
    np.testing.assert_array_equal(got, (own[0].transpose(1, 2, 0) * 255).round().astype("uint8"))
    text = export.sample(export.tokenize([PROMPT]), noise)
    assert np.abs(own - text).max() > 0.05  # the picture changed the result


@pytest.mark.parametrize("name", _runnable())
def test_eval_scores_the_export_with_its_runtime(name, exports):
    if not _runnable_here(name):
        pytest.skip(f"{name} cannot run here: {runtime.get(name).unavailable('cpu')}")
    from instaflow_edge.digits.evaluate import EvalConfig, evaluate

    r = evaluate(EvalConfig(model=str(exports(name)), num_images=20, backend=name, batch_size=8), progress=False)
    assert r["sampling"]["backend"] == name and r["generated"]["n"] == 20
    assert 0.0 <= r["generated"]["accuracy"] <= 1.0


@pytest.mark.parametrize("name", _runnable())
def test_bench_times_or_skips_the_export(name, exports, tiny_dir, tmp_path, monkeypatch):
    from instaflow_edge.bench import peaks
    from instaflow_edge.bench.latency import BenchConfig, bench

    monkeypatch.setattr(peaks, "measure_peaks", lambda threads: {
        "threads": threads, "n": 0, "peaks": {p: {"gops": 50.0, "via": "fixed"} for p in ("fp32", "bf16", "int8", "fp16")},
        "candidates": {}})
    folder = exports(name)
    label = runtime.export_label(folder)
    r = bench(BenchConfig(model=str(tiny_dir), exports=[str(folder)], output=str(tmp_path / "b.json"),
                          warmup=0, repeats=1), progress=False)
    if not _runnable_here(name):
        assert label in r["skipped"] and label not in r["results"]
        return
    row = r["results"][label]
    for stage in ("text_encoder", "unet", "vae_decoder", "end_to_end"):
        assert row[stage]["n"] == 1 and row[stage]["median_s"] > 0 and row[stage]["pct_of_peak"] > 0


def _own_parity(export, pipe, prompts, seed):
    """The end-to-end PSNR of the export's own chain vs PyTorch, computed as the report computes it."""
    from instaflow_edge.generator import make_noise
    from instaflow_edge.parity import compare
    from instaflow_edge.report.runtimes import _torch_calls

    ref_calls = _torch_calls(pipe)
    refs, outs = [], []
    sf = pipe.scaling_factor
    for i, p in enumerate(prompts):
        ids = pipe.tokenize([p]).numpy()
        z = make_noise([seed + i], export.facts.latent_shape).numpy()
        refs.append(ref_calls["vae_decoder"](ref_calls["unet"](z, ref_calls["text_encoder"](ids)) / sf))
        outs.append(export.calls["vae_decoder"](np.asarray(export.calls["unet"](z, export.calls["text_encoder"](ids))) / sf))
    return compare("end_to_end", np.concatenate(refs), np.concatenate([np.asarray(o) for o in outs])).psnr


@pytest.mark.parametrize("name", _runnable())
def test_report_runs_the_format_and_fails_a_planted_export(name, exports, tiny_dir, tiny_pipe, tmp_path):
    from instaflow_edge.report.build import DEFAULT_PROMPTS, ReportConfig, make_report
    from instaflow_edge.report.runtimes import STAND_INS

    folder = exports(name)
    label = runtime.export_label(folder)
    if not _runnable_here(name):
        if name not in STAND_INS:
            with pytest.raises(DeviceError):
                make_report(ReportConfig(model=str(tiny_dir), output=str(tmp_path / "r"), exports=[str(folder)]),
                            progress=False)
            return
        rep = make_report(ReportConfig(model=str(tiny_dir), output=str(tmp_path / "r"), exports=[str(folder)]),
                          progress=False)
        assert rep["runtimes"][label]["emulated"] is True and "cannot predict" in rep["runtimes"][label]["how"]
        return
    assert name in PERTURB, f"add a way to plant a perturbed {name} export to PERTURB in {__file__}"
    planted = tmp_path / "planted"
    shutil.copytree(folder, planted)
    PERTURB[name](planted)
    rep = make_report(ReportConfig(model=str(tiny_dir), output=str(tmp_path / "r"),
                                   exports=[str(folder), f"planted={planted}"]), progress=False)
    info = rep["runtimes"][label]
    assert info["kind"] == name and info["emulated"] is False
    assert info["how"] == runtime.open_export(folder).ran  # what the report says ran is the format's runtime
    # the report's figures are the format's own runtime's: the same PSNR as the opened export's chain
    own = _own_parity(runtime.open_export(folder), tiny_pipe, DEFAULT_PROMPTS, 0)
    assert rep["parity"][label]["end_to_end"]["psnr"] == pytest.approx(own, abs=1e-3)
    assert rep["verdicts"][label]["pass"] is True
    # image to image, by the same runtime: the encoder and the edited image have rows of their own
    assert {"vae_encoder", "image_to_image"} <= set(rep["parity"][label]), sorted(rep["parity"][label])
    assert rep["image_to_image"]["exports"][label] is True
    planted_label = next(k for k in rep["verdicts"] if k.endswith("planted"))
    assert rep["verdicts"][planted_label]["pass"] is False and "unet" in rep["verdicts"][planted_label]["failed"]


def test_no_manifest_kind_outside_the_registry():
    """Which format a folder is gets decided in runtime/ only: no module elsewhere spells a manifest kind
    (a format's writer takes its kind from the format's module; readers ask ``runtime.format_of``)."""
    import ast

    root = Path(__file__).resolve().parents[2]
    kinds = {runtime.manifest_kind(n) for n in runtime.names()} - set(runtime.names()) | {"onnx-export-partial"}
    found = []
    for top in ("instaflow_edge", "convert", "quantize", "bench", "train", "studies"):
        for path in sorted((root / top).rglob("*.py")):
            if path.parent.name == "runtime":
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Constant) and node.value in kinds:
                    found.append(f"{path.relative_to(root)}:{node.lineno} {node.value!r}")
    assert not found, found


def test_report_of_an_openvino_export_is_openvinos_own(exports, tiny_dir, tmp_path):
    """The defect that started the registry: ``report`` once ran PyTorch for an OpenVINO export (inf dB,
    "Core ML cannot predict"). Now its rows are OpenVINO's: what ran says OpenVINO, the figures are finite
    and differ from the ONNX export's, which onnxruntime computed."""
    pytest.importorskip("openvino")
    from instaflow_edge.report.build import ReportConfig, make_report

    onnx, ov = exports("onnx"), exports("openvino")
    rep = make_report(ReportConfig(model=str(tiny_dir), output=str(tmp_path / "r"), exports=[str(onnx), str(ov)]),
                      progress=False)
    lo, lv = runtime.export_label(onnx), runtime.export_label(ov)
    assert rep["runtimes"][lv]["how"].startswith("OpenVINO") and "cannot predict" not in rep["runtimes"][lv]["how"]
    assert rep["runtimes"][lo]["how"].startswith("onnxruntime")
    po, pv = rep["parity"][lo]["end_to_end"]["psnr"], rep["parity"][lv]["end_to_end"]["psnr"]
    assert pv is not None and np.isfinite(pv) and pv != po


def test_export_facts_are_checked_and_never_assumed(tmp_path):
    """A manifest's runtime facts are typed once; a bad value is a one-line error naming it, and a size
    multiple that is not recorded is derived from the export's UNet config or refused, never guessed."""
    from instaflow_edge.errors import ModelError
    from instaflow_edge.runtime.base import ExportFacts

    block = {"latent_shape": [4, 8, 8], "height": 64, "width": 64, "scaling_factor": 0.18215,
             "flow": "rectified_flow", "default_steps": 1, "components": ["text_encoder", "unet", "vae_decoder"]}
    with pytest.raises(ModelError, match="records no size_multiple"):
        ExportFacts.from_block(block, tmp_path / "manifest.json", fixed_size=True)
    (tmp_path / "config.json").write_text(json.dumps({"block_out_channels": [32, 64]}))
    f = ExportFacts.from_block(block, tmp_path / "manifest.json", unet_config=tmp_path / "config.json")
    assert f.size_multiple == 16 and f.latent_for(96, 64) == (4, 12, 8)
    with pytest.raises(ModelError, match="latent_shape must be 3 positive integers"):
        ExportFacts.from_block({**block, "latent_shape": [4, "8", 8], "size_multiple": 8}, tmp_path / "manifest.json")
