"""`instaflow-edge demo --quick`: the whole recipe on digits, end to end, with every row of the table."""

import json

import pytest
from typer.testing import CliRunner

from instaflow_edge.cli import app


@pytest.fixture(scope="module")
def demo_quick(tmp_path_factory):
    """``demo --quick`` run once for this module: (its output folder, the command's result)."""
    out = tmp_path_factory.mktemp("demo") / "demo"
    return out, CliRunner().invoke(app, ["demo", "--quick", "-o", str(out), "--no-progress"])


def test_demo_quick_has_every_row(demo_quick):
    out, r = demo_quick
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    rows = [(row["model"], row["steps"]) for row in res["rows"]]
    assert rows == [
        ("1-RF teacher", 1), ("1-RF teacher", 4), ("2-RF (reflow)", 1), ("2-RF (reflow)", 4),
        ("1-RF + distill", 1), ("2-RF + distill (InstaFlow)", 1), ("InstaFlow, pruned + recovered", 1),
        ("InstaFlow + tiny decoder", 1), ("real validation digits (ceiling)", None),
    ]
    for row in res["rows"]:
        assert 0.0 <= row["prompt_accuracy"] <= 1.0 and row["digits_fid"] >= 0.0
    assert res["rows"][-1]["prompt_accuracy"] > 0.9  # the judge reads real digits
    for stage in ("base", "teacher-1rf", "pairs-1rf", "reflow-2rf", "pairs-2rf", "distill-1rf", "instaflow",
                  "pruned-blocks", "pruned", "pruned-recovered", "tiny-decoder"):
        assert (out / stage / "manifest.json").is_file(), stage
    student = json.loads((out / "instaflow" / "manifest.json").read_text())
    assert student["one_step"] and student["base_model"] == str(out / "reflow-2rf")
    assert "| 2-RF + distill (InstaFlow) | 1 |" in (out / "results.md").read_text()
    assert "2-RF + distill (InstaFlow)" in r.output
    pruned = json.loads((out / "pruned" / "manifest.json").read_text())["prune"]
    assert pruned["method"] == "channels" and pruned["after"]["macs_per_image"] < pruned["before"]["macs_per_image"]
    assert json.loads((out / "pruned-recovered" / "manifest.json").read_text())["teacher"] == str(out / "instaflow")
    assert json.loads((out / "tiny-decoder" / "manifest.json").read_text())["decoder"]["macs_ratio"] > 10


def test_the_demo_student_runs_in_executorch(demo_quick, tmp_path):
    """The trained digits student exports to ExecuTorch, passes its gates, and ``generate --backend
    executorch`` gives PyTorch's image (to a level of 8-bit rounding)."""
    pytest.importorskip("executorch")
    import numpy as np
    from PIL import Image

    from instaflow_edge.convert import ConvertConfig, export
    from instaflow_edge.generate import GenerateConfig, generate

    out, r = demo_quick
    assert r.exit_code == 0, r.output
    student = out / "instaflow"
    m = export(ConvertConfig.of("executorch", model=str(student), output=str(tmp_path / "et")))
    assert all(r["psnr"] >= m["gates"][r["component"]] for r in m["parity"])
    assert m["executorch"]["delegation"]["unet"]["flop_share"] >= 0.99 and "unet_velocity" not in m["sizes"]
    images = {}
    for backend, model in (("executorch", tmp_path / "et"), ("torch", student)):
        g = generate(GenerateConfig(model=str(model), prompts=["a handwritten seven"], output=str(tmp_path / backend),
                                    seed=1, backend=backend), progress=False)
        images[backend] = np.asarray(Image.open(tmp_path / backend / g["images"][0]["file"])).astype(int)
    assert np.abs(images["executorch"] - images["torch"]).max() <= 1


def test_the_demo_student_compiles_whole_for_the_htp(demo_quick, tmp_path):
    """The trained digits student's W8A16 QNN export: compiled for two HTP architectures with every compute
    node on the HTP, its QDQ graphs within their gates, its text response ≥ 0.9 of PyTorch's, and
    digits-FID (QDQ on the CPU provider) within 10% of the fp32 student's on the same prompts and seeds."""
    pytest.importorskip("onnxruntime_qnn", reason="the QNN provider's host wheel (x86-64 Linux, Windows) is not installed")
    from instaflow_edge.convert import ConvertConfig, export
    from instaflow_edge.convert.qnn import qnn_session
    from instaflow_edge.digits.evaluate import EvalConfig, evaluate
    from instaflow_edge.runtime.qnn import context_model

    out, r = demo_quick
    assert r.exit_code == 0, r.output
    student = out / "instaflow"
    m = export(ConvertConfig.of("qnn", model=str(student), output=str(tmp_path / "qnn"), htp_arch=["73", "79"]))
    assert all(row["psnr"] >= m["gates"][row["component"]] for row in m["parity"])
    assert m["conditioning"]["ratio"] >= 0.9
    for arch, comps in m["htp"]["archs"].items():
        for name, row in comps.items():
            assert row["all_compute_on_htp"], (arch, name, row["on_cpu"])
            assert row["htp_emulated"]["psnr"] >= m["gates"][name], (arch, name, row["htp_emulated"])
            qnn_session(context_model(tmp_path / "qnn", arch, name), arch)  # loads back
    scores = {b: evaluate(EvalConfig(model=str(model), num_images=500, backend=b), progress=False)["generated"]
              for b, model in (("torch", student), ("qnn", tmp_path / "qnn"))}
    assert scores["qnn"]["fid"] <= 1.1 * scores["torch"]["fid"], scores
    assert scores["qnn"]["accuracy"] >= scores["torch"]["accuracy"] - 0.05, scores
