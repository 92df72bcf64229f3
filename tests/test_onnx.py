"""ONNX export, optimization, quantization, parity gates, the onnx generate backend and bad inputs
(tiny preset). Exported folders are shared per session: exports take seconds each."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from instaflow_edge.cli import app

pytest.importorskip("onnxruntime")
runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def manifest(folder):
    return json.loads((folder / "manifest.json").read_text())


def assert_one_line_error(r, code, *words, nothing_at=None):
    assert r.exit_code == code, r.output
    err = (r.stderr if r.stderr_bytes is not None else r.output).strip().splitlines()
    # stage messages (``[onnx  12s] unet: exporting``) may precede it; the error itself is one line, last
    err = [line for line in err if not re.match(r"\[(onnx|quantize) +\d+s\] ", line)]
    assert len(err) == 1 and err[0].startswith("error:"), err
    for w in words:
        assert w in err[0], err[0]
    if nothing_at is not None:
        assert not nothing_at.exists()
        assert not [p for p in nothing_at.parent.iterdir() if p.name.startswith(f".{nothing_at.name}.")]


@pytest.fixture(scope="session")
def fp32_export(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "fp32"
    r = run("convert", tiny_dir, "--target", "onnx", "--fused", "-o", out)
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="session")
def int8_export(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "int8"
    r = run("convert", tiny_dir, "--target", "onnx", "--quantize", "int8-static", "-o", out)
    assert r.exit_code == 0, r.output
    return out


def _ops(path):
    import onnx

    return {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}


def test_fp32_export_layout_and_gates(fp32_export):
    m = manifest(fp32_export)
    names = ["text_encoder", "unet", "vae_decoder", "vae_encoder", "generator"]
    assert m["onnx"]["components"] == names
    for n in names:
        assert (fp32_export / n / "model.onnx").is_file() and (fp32_export / n / "config.json").is_file()
        assert m["sizes"][n] > 0
    for sub in ("tokenizer", "scheduler"):
        assert (fp32_export / sub).is_dir()
    assert "unet" in json.loads((fp32_export / "model_index.json").read_text())
    rows = {p["component"]: p for p in m["parity"]}
    assert set(rows) == {*names, "end_to_end"}
    for name, p in rows.items():
        assert p["psnr"] is None or p["psnr"] >= m["gates"][name] >= 60, (name, p)
    # --optimize cpu (the default): CPU-safe fusions only, none of the CUDA-only ops
    assert m["optimize"]["text_encoder"]["fused_ops"].get("SkipLayerNormalization", 0) > 0
    for n in names:
        assert not _ops(fp32_export / n / "model.onnx") & {"GroupNorm", "NhwcConv", "BiasSplitGelu", "BiasAdd"}


def test_fp32_export_dynamic_batch_matches_torch(fp32_export, tiny_pipe):
    import torch
    from instaflow_edge.convert.onnx import onnx_spec

    from instaflow_edge.components import Sizes
    from instaflow_edge.parity import compare
    from instaflow_edge.runtime import onnx_io

    sizes = Sizes.of(tiny_pipe, batch=2)
    for name in ("unet", "generator"):
        spec = onnx_spec(name)
        inputs = spec.example_inputs(tiny_pipe, sizes, seed=7)
        with torch.no_grad():
            ref = spec.module(tiny_pipe)(*inputs)
        sess = onnx_io.session(fp32_export / name / "model.onnx")
        out = sess.run(None, {t.name: x.numpy() for t, x in zip(spec.inputs, inputs)})[0]
        assert compare(name, ref, out).psnr > 60


def test_export_ships_the_one_step_pipeline_scheduler(fp32_export):
    """scheduler/ is the DDIM config under which diffusers'/optimum's StableDiffusionPipeline reproduces the
    one-step image (docs/optimum.md). Here with our own diffusers: the config loads, one step is τ = 1000,
    and the pipeline's arithmetic on our sessions (init_noise_sigma, scale_model_input, float32 timestep,
    step, ÷ the VAE config's scaling_factor) gives run_one_step's image bitwise. tests/test_optimum.py
    (slow) runs optimum's own pipeline."""
    import torch
    from diffusers import DDIMScheduler

    from instaflow_edge.generator import make_noise
    from instaflow_edge.runtime import onnx_io
    from instaflow_edge.runtime.onnx import export_facts, run_one_step, tokenize

    cfg = json.loads((fp32_export / "scheduler" / "scheduler_config.json").read_text())
    chosen = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1001, "timestep_spacing": "trailing",
              "prediction_type": "sample", "set_alpha_to_one": True, "clip_sample": False, "thresholding": False}
    assert {k: cfg.get(k) for k in chosen} == chosen
    assert json.loads((fp32_export / "model_index.json").read_text())["scheduler"] == ["diffusers", "DDIMScheduler"]
    record = manifest(fp32_export)["onnx"]["pipeline_scheduler"]
    assert record["class"] == "DDIMScheduler" and record["reproduces"]["num_inference_steps"] == 1
    assert record["other_steps"] is None  # a one-step model: nothing else to reproduce

    sched = DDIMScheduler.from_pretrained(fp32_export / "scheduler")
    sched.set_timesteps(1)
    assert sched.timesteps.tolist() == [1000] and sched.init_noise_sigma == 1.0
    facts = export_facts(fp32_export)
    ids = tokenize(fp32_export, ["a red fox in snow"])
    noise = make_noise([0], facts.latent_shape).numpy()
    s = {n: onnx_io.session(fp32_export / n / "model.onnx") for n in ("text_encoder", "unet", "vae_decoder")}
    ehs = s["text_encoder"].run(None, {"input_ids": ids})[0]
    t = sched.timesteps[0]
    z = sched.scale_model_input(torch.from_numpy(noise) * sched.init_noise_sigma, t)
    out = s["unet"].run(None, {"sample": z.numpy(), "timestep": np.array([t], np.float32), "encoder_hidden_states": ehs})[0]
    latents = sched.step(torch.from_numpy(out), t, z, return_dict=False)[0]
    assert torch.equal(latents, torch.from_numpy(out))  # the DDIM step returns the x0 prediction, bit for bit
    factor = json.loads((fp32_export / "vae_decoder" / "config.json").read_text())["scaling_factor"]
    img = s["vae_decoder"].run(None, {"latent_sample": (latents / factor).numpy()})[0]
    np.testing.assert_array_equal(np.clip(img / 2 + 0.5, 0, 1), run_one_step(fp32_export, ids, noise, facts))


def test_convert_int8_static(int8_export):
    m = manifest(int8_export)
    assert m["quantize"]["scheme"] == "int8-static" and m["quantize"]["components"] == ["text_encoder", "unet"]
    assert m["gates"]["unet"] == 25.0 and m["gates"]["vae_decoder"] == 60.0
    assert "QuantizeLinear" in _ops(int8_export / "unet" / "model.onnx")
    assert "QuantizeLinear" not in _ops(int8_export / "vae_decoder" / "model.onnx")
    rows = {p["component"]: p["psnr"] for p in m["parity"]}
    assert rows["unet"] >= 25 and rows["end_to_end"] >= 25


# every ONNX scheme this file runs end to end (test_standalone_quantize; int8-static also through convert)
TESTED_SCHEMES = ["fp16", "int8-dynamic", "int8-static"]


def test_every_onnx_scheme_is_tested():
    """Adding a scheme to the registry (or its enum) without adding it to TESTED_SCHEMES fails here."""
    from instaflow_edge.quantize.schemes import OnnxScheme, all_schemes

    assert {s.name for s in all_schemes(("onnx",))} == set(TESTED_SCHEMES) == {m.value for m in OnnxScheme}


@pytest.mark.parametrize("scheme", TESTED_SCHEMES)
def test_standalone_quantize(fp32_export, tmp_path, scheme):
    out = tmp_path / scheme
    r = run("quantize", fp32_export, "--scheme", scheme, "-o", out)
    assert r.exit_code == 0, r.output
    m = manifest(out)
    assert m["quantize"]["scheme"] == scheme
    # the CLI prints the parity table from the returned manifest, then what it wrote
    from instaflow_edge.parity import format_table

    assert r.stdout.startswith(format_table(m["parity"], m["gates"]) + "\n") and f"wrote {out} ({scheme}:" in r.stdout
    for p in m["parity"]:
        assert p["psnr"] >= m["gates"][p["component"]], p
    ops = _ops(out / "unet" / "model.onnx")
    expected = {"fp16": "Cast", "int8-dynamic": "DynamicQuantizeLinear", "int8-static": "QuantizeLinear"}[scheme]
    assert expected in ops
    assert _ops(out / "vae_decoder" / "model.onnx") == _ops(fp32_export / "vae_decoder" / "model.onnx")
    if scheme == "int8-static":
        # quantized MatMuls hand fp32 on (bias Add, attention): no requantize right after them
        import onnx

        for comp in ("text_encoder", "unet"):
            g = onnx.load(str(out / comp / "model.onnx"), load_external_data=False).graph
            made_by = {o: n for n in g.node for o in n.output}
            qmm = [n for n in g.node if n.op_type == "MatMul"
                   and all(made_by.get(i) is not None and made_by[i].op_type == "DequantizeLinear" for i in n.input)]
            assert qmm, comp
            consumers = {n.op_type for n in g.node for i in n.input if i in {m.output[0] for m in qmm}}
            assert "QuantizeLinear" not in consumers, (comp, consumers)


def test_relative_paths(fp32_export, tiny_dir, tmp_path, monkeypatch):
    """onnxruntime's optimizer and quantizer run in a scratch working directory: relative output and
    source folders must still work (they once failed with a traceback)."""
    shutil.copytree(fp32_export, tmp_path / "src")
    monkeypatch.chdir(tmp_path)
    r = run("convert", tiny_dir, "--target", "onnx", "-o", "rel-export")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "rel-export" / "unet" / "model.onnx").is_file()
    for scheme in ("int8-dynamic", "int8-static"):
        r = run("quantize", "src", "--scheme", scheme, "-o", f"rel-{scheme}")
        assert r.exit_code == 0, r.output
        assert manifest(tmp_path / f"rel-{scheme}")["quantize"]["scheme"] == scheme


def test_generate_onnx_matches_torch(fp32_export, int8_export, tiny_dir, tmp_path):
    from PIL import Image

    from instaflow_edge.parity import psnr

    prompts = ["a red fox in snow", "a cat wearing a hat"]
    outs = {}
    for name, model, backend in (("torch", tiny_dir, "torch"), ("onnx", fp32_export, "onnx"), ("int8", int8_export, "onnx")):
        r = run("generate", model, *prompts, "-n", "2", "--backend", backend, "-o", tmp_path / name)
        assert r.exit_code == 0, r.output
        m = manifest(tmp_path / name)
        outs[name] = np.stack([np.asarray(Image.open(tmp_path / name / i["file"]), dtype=np.float64) / 255 for i in m["images"]])
    assert psnr(outs["torch"], outs["onnx"]) >= 40  # 8-bit PNG rounding bounds it (~±1 level)
    assert psnr(outs["torch"], outs["int8"]) >= 25
    assert np.abs(outs["torch"] - outs["onnx"]).max() <= 1.5 / 255


def test_failed_gate_leaves_nothing(fp32_export, tiny_dir, tmp_path):
    """A missed gate: the whole parity table, then one error line naming every miss; nothing written."""
    out = tmp_path / "q"
    r = run("quantize", fp32_export, "--scheme", "int8-dynamic", "--min-psnr", "200", "-o", out)
    assert_one_line_error(r, 3, "3 of 3 outputs miss their gate", "text_encoder: PSNR", "unet: PSNR", "end_to_end: PSNR",
                          "200.0 dB", nothing_at=out)
    assert "component" in r.stdout and "≥200" in r.stdout
    out = tmp_path / "c"
    r = run("convert", tiny_dir, "--target", "onnx", "--optimize", "none", "--min-psnr", "1000", "-o", out)
    assert_one_line_error(r, 3, "outputs miss their gate", "text_encoder: PSNR", "unet: PSNR", "1000.0 dB", nothing_at=out)
    assert "vae_decoder" in r.stdout and "≥1000" in r.stdout


def test_bad_inputs(tiny_dir, fp32_export, tmp_path):
    out, empty = tmp_path / "o", tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(run("convert", empty, "--target", "onnx", "-o", out), 2, "model_index.json", nothing_at=out)
    r = run("convert", tiny_dir, "--target", "onnx", "--quantize", "int4", "-o", out)
    assert_one_line_error(r, 2, "int4", "fp16, int8-dynamic, int8-static", nothing_at=out)
    assert_one_line_error(run("convert", tiny_dir, "--target", "onnx", "--opset", "9", "-o", out), 2, "opset", nothing_at=out)
    assert_one_line_error(run("convert", tiny_dir, "--target", "onnx", "--height", "40", "-o", out), 2, "height 40", "--height 32", nothing_at=out)
    assert_one_line_error(run("convert", tiny_dir, "--target", "onnx", "--engine", "inc", "-o", out), 2, "int8-static", nothing_at=out)
    r = run("convert", tiny_dir, "--target", "onnx", "--quantize", "int8-static", "--engine", "inc", "--opset", "17", "-o", out)
    assert_one_line_error(r, 2, "--opset", nothing_at=out)
    r = run("convert", tiny_dir, "--target", "onnx", "--quantize", "int8-static", "--calibration-prompts", tmp_path / "nope.txt", "-o", out)
    assert_one_line_error(r, 2, "nope.txt", nothing_at=out)
    assert_one_line_error(run("convert", tiny_dir, "--target", "onnx", "-o", fp32_export), 2, "--force")
    assert_one_line_error(run("quantize", fp32_export, "--scheme", "int3", "-o", out), 2, "int3", "int8-static", nothing_at=out)
    assert_one_line_error(run("quantize", tiny_dir, "--scheme", "fp16", "-o", out), 2, "manifest", nothing_at=out)
    r = run("convert", tiny_dir, "--target", "onnx", "--quantize-component", "vae_decoder", "-o", out)
    assert_one_line_error(r, 2, "--quantize", nothing_at=out)
    r = run("convert", tiny_dir, "--target", "onnx", "--quantize", "fp16", "--quantize-component", "vae", "-o", out)
    assert_one_line_error(r, 2, "'vae'", "vae_decoder", nothing_at=out)


def test_convert_quantizes_the_named_components(tiny_dir, tmp_path):
    """--quantize-component picks what --quantize applies to: here the VAE decoder alone."""
    out = tmp_path / "vae8"
    r = run("convert", tiny_dir, "--target", "onnx", "--quantize", "int8-static", "--quantize-component", "vae_decoder", "-o", out)
    assert r.exit_code == 0, r.output
    m = manifest(out)
    assert m["quantize"]["components"] == ["vae_decoder"]
    assert m["gates"]["vae_decoder"] == 25.0 and m["gates"]["unet"] == 60.0
    assert "QuantizeLinear" in _ops(out / "vae_decoder" / "model.onnx")
    assert "QuantizeLinear" not in _ops(out / "unet" / "model.onnx")


def _escaping_copy(fp32_export, tmp_path, how):
    """A copy of the export whose UNet keeps one weight in external data outside the folder."""
    import onnx

    bad = tmp_path / f"bad-{how}"
    shutil.copytree(fp32_export, bad)
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\0" * 4096)
    model = onnx.load(str(bad / "unet" / "model.onnx"))
    t = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    t.ClearField("raw_data")
    t.data_location = onnx.TensorProto.EXTERNAL
    if how == "absolute":
        loc = str(secret)
    elif how == "dotdot":
        loc = "../../secret.bin"
    else:  # a symlink inside the folder that points out of it
        (bad / "unet" / "weights.bin").symlink_to(secret)
        loc = "weights.bin"
    t.external_data.add(key="location", value=loc)
    onnx.save(model, str(bad / "unet" / "model.onnx"))
    return bad


@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlink"])
def test_external_data_escaping_the_folder_is_refused(fp32_export, tmp_path, how):
    bad = _escaping_copy(fp32_export, tmp_path, how)
    out = tmp_path / "o"
    assert_one_line_error(run("generate", bad, "a red fox", "--backend", "onnx", "-o", out), 2, "outside the model folder", nothing_at=out)
    assert_one_line_error(run("quantize", bad, "--scheme", "fp16", "-o", out), 2, "outside the model folder", nothing_at=out)


def test_corrupt_onnx_is_refused(fp32_export, tmp_path):
    bad = tmp_path / "corrupt"
    shutil.copytree(fp32_export, bad)
    data = (bad / "unet" / "model.onnx").read_bytes()
    (bad / "unet" / "model.onnx").write_bytes(data[: len(data) // 3])
    out = tmp_path / "o"
    assert_one_line_error(run("generate", bad, "a red fox", "--backend", "onnx", "-o", out), 2, "unet", nothing_at=out)
    assert_one_line_error(run("quantize", bad, "--scheme", "int8-static", "-o", out), 2, "unet", nothing_at=out)


def test_generate_onnx_refuses_torch_folder(tiny_dir, tmp_path):
    out = tmp_path / "o"
    assert_one_line_error(run("generate", tiny_dir, "a red fox", "--backend", "onnx", "-o", out), 2, "manifest", nothing_at=out)


@pytest.mark.slow
def test_convert_int8_static_with_inc(tiny_dir, tmp_path):
    pytest.importorskip("neural_compressor")
    out = tmp_path / "inc"
    r = run("convert", tiny_dir, "--target", "onnx", "--quantize", "int8-static", "--engine", "inc", "-o", out)
    assert r.exit_code == 0, r.output
    m = manifest(out)
    assert m["quantize"]["engine"] == "inc" and m["quantize"]["components"] == ["text_encoder", "unet"]
    assert "QuantizeLinear" in _ops(out / "unet" / "model.onnx")
    assert all(p["psnr"] >= m["gates"][p["component"]] for p in m["parity"])


@pytest.mark.slow
def test_multi_step_flow_exports_velocity_unet(tiny_dir, tmp_path):
    """A rectified flow sampled with N steps also gets unet_velocity/, which generate runs with Euler."""
    from PIL import Image

    src = tmp_path / "rf4"
    shutil.copytree(tiny_dir, src)
    m = manifest(src)
    m["model"]["default_steps"] = 4
    (src / "manifest.json").write_text(json.dumps(m))
    out = tmp_path / "export"
    r = run("convert", src, "--target", "onnx", "--optimize", "none", "-o", out)
    assert r.exit_code == 0, r.output
    assert manifest(out)["onnx"]["components"][-1] == "unet_velocity"
    assert any(p["component"] == "unet_velocity" and p["psnr"] >= 60 for p in manifest(out)["parity"])
    assert manifest(out)["onnx"]["pipeline_scheduler"]["other_steps"]  # the manifest says optimum does 1 step only
    imgs = {}
    for backend, model in (("torch", src), ("onnx", out)):
        r = run("generate", model, "a red fox in snow", "--backend", backend, "-o", tmp_path / backend)
        assert r.exit_code == 0, r.output
        assert manifest(tmp_path / backend)["sampling"]["steps"] == 4
        imgs[backend] = np.asarray(Image.open(next((tmp_path / backend).glob("*.png"))), dtype=np.float64)
    assert np.abs(imgs["torch"] - imgs["onnx"]).max() <= 1.5


@pytest.mark.parametrize("bias", [False, True])
def test_attention_rewritten_to_multihead_attention(bias):
    """--optimize cpu turns packed-QKV Attention into 3 MatMuls + MultiHeadAttention: same outputs,
    fewer dead weights; causal (unidirectional) Attention is left alone."""
    import onnx
    import onnxruntime as ort
    from instaflow_edge.convert.onnx import attention_to_mha
    from onnx import TensorProto, helper, numpy_helper

    c, heads, s = 32, 4, 10
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((c, 3 * c)) / np.sqrt(c)).astype(np.float32)
    b = (rng.standard_normal(3 * c) if bias else np.zeros(3 * c)).astype(np.float32)

    def model(**attrs):
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", c])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", c])
        node = helper.make_node("Attention", ["x", "w", "b"], ["y"], name="att", domain="com.microsoft",
                                num_heads=heads, **attrs)
        m = helper.make_model(helper.make_graph([node], "g", [x], [y], [numpy_helper.from_array(w, "w"),
                                                                         numpy_helper.from_array(b, "b")]),
                              opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
        m.ir_version = 9
        return m

    def run(m, x):
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    x = rng.standard_normal((2, s, c)).astype(np.float32)
    m = model()
    ref = run(m, x)
    assert attention_to_mha(m) == 1
    onnx.checker.check_model(m)
    ops = [n.op_type for n in m.graph.node]
    assert ops == ["MatMul", "MatMul", "MatMul", "MultiHeadAttention"]
    assert {t.name for t in m.graph.initializer} == {"att_q_weight", "att_k_weight", "att_v_weight"} | ({"b"} if bias else set())
    np.testing.assert_allclose(run(m, x), ref, atol=1e-5)
    causal = model(unidirectional=1)
    assert attention_to_mha(causal) == 0 and [n.op_type for n in causal.graph.node] == ["Attention"]
