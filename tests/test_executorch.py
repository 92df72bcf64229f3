"""``convert --target executorch``: the programs an app loads, their delegation to XNNPACK, and what a
broken or foreign ``.pte`` gets (one line each). The format contracts (tests/contracts/) run generate,
eval, bench and report on the same session export (``tiny_executorch``)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from instaflow_edge import runtime
from instaflow_edge.errors import InputError, ModelError

pytest.importorskip("executorch")


def test_the_export_is_what_an_app_loads(tiny_executorch):
    m = json.loads((tiny_executorch / "manifest.json").read_text())
    block = m["executorch"]
    for name in ("text_encoder", "unet", "vae_decoder", "vae_encoder"):
        assert (tiny_executorch / name / "model.pte").read_bytes()[4:8] == b"ET12"
        assert m["sizes"][name] == (tiny_executorch / name / "model.pte").stat().st_size
    assert (tiny_executorch / "tokenizer" / "vocab.json").is_file() and (tiny_executorch / "torch_randn.mjs").is_file()
    assert block["method"] == "forward" and block["batch"] == 1 and "manual_seed(seed)" in block["noise"]
    rows = {r["component"]: r["psnr"] for r in m["parity"]}
    assert rows["end_to_end"] >= 60 and all(v >= 60 for v in rows.values())


def test_unet_and_decoder_run_entirely_in_xnnpack(tiny_executorch):
    """The rewrites leave nothing of the UNet, the decoder and the encoder on portable kernels but the
    UNet's timestep broadcast (an expand and a dim-order copy of one value): one delegate each, all of
    their FLOPs in XNNPACK; the text encoder keeps only its token gather (and shape ops) outside."""
    d = json.loads((tiny_executorch / "manifest.json").read_text())["executorch"]["delegation"]
    allowed = {"unet": {"aten.expand_copy.default", "dim_order_ops._to_dim_order_copy.default"}, "vae_decoder": set(),
               "vae_encoder": set()}
    for name in ("unet", "vae_decoder", "vae_encoder"):
        assert d[name]["flop_share"] >= 0.99 and set(d[name]["portable_ops"]) <= allowed[name] and d[name]["delegates"] == 1, d[name]
        assert "aten.convolution.default" in d[name]["delegated_ops"]
    assert {"aten.native_group_norm.default", "aten.upsample_nearest2d.vec"}.isdisjoint(d["vae_decoder"]["delegated_ops"])
    assert set(d["text_encoder"]["portable_ops"]) <= {"aten.embedding.default", "aten.expand_copy.default",
                                                      "aten.view_copy.default"}


@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_the_executorch_export_edits_as_generate_does(strength, tiny_executorch, tiny_dir, edit_image):
    """Image to image with ExecuTorch's runtime (vae_encoder/model.pte, the UNet program at timestep
    1000·strength): the torch backend's image within a level; strength 1 is text to image."""
    want = edit_image(tiny_dir, "torch", strength)
    got = edit_image(tiny_executorch, "executorch", strength)
    assert np.abs(want - got).max() <= 1, np.abs(want - got).max()


def test_the_rewrites_keep_the_arithmetic(tiny_pipe):
    """GroupNorm, LayerNorm and nearest upsampling as rewritten equal PyTorch's own to float rounding."""
    import torch

    from instaflow_edge.convert import executorch as ex

    torch.manual_seed(0)
    x = torch.randn(2, 32, 5, 7)
    w, b = torch.randn(32), torch.randn(32)
    torch.testing.assert_close(ex._group_norm(x, 8, w, b, 1e-6), torch.nn.functional.group_norm(x, 8, w, b, 1e-6))
    y = torch.randn(2, 9, 16)
    torch.testing.assert_close(ex._layer_norm(y, [16], w[:16], b[:16]), torch.nn.functional.layer_norm(y, [16], w[:16], b[:16]))
    torch.testing.assert_close(ex._upsample_nearest2d(x, None, [2.0, 3.0]),
                               torch.nn.functional.interpolate(x, scale_factor=(2, 3), mode="nearest"), rtol=0, atol=0)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_a_truncated_or_corrupt_program_is_one_line(tiny_executorch, tmp_path):
    bad = _copy(tiny_executorch, tmp_path / "cut")
    pte = bad / "unet" / "model.pte"
    pte.write_bytes(pte.read_bytes()[: pte.stat().st_size // 2])
    with pytest.raises(ModelError) as e:
        runtime.open_export(bad)
    assert str(pte) in e.value.message and "\n" not in e.value.message and e.value.fix
    pte.write_bytes(b"\0" * 4096)
    with pytest.raises(ModelError, match="no ET12 header"):
        runtime.open_export(bad)
    pte.unlink()
    with pytest.raises(ModelError, match="is missing"):
        runtime.open_export(bad)


def test_a_program_of_another_component_or_model_is_refused(tiny_executorch, tmp_path):
    bad = _copy(tiny_executorch, tmp_path / "swapped")
    shutil.copy(bad / "vae_decoder" / "model.pte", bad / "unet" / "model.pte")
    with pytest.raises(ModelError, match="its inputs .* are not this export's unet inputs"):
        runtime.open_export(bad)
    other = _copy(tiny_executorch, tmp_path / "resized")
    m = json.loads((other / "manifest.json").read_text())
    m["executorch"].update(latent_shape=[4, 16, 16], height=128, width=128)  # the manifest of a larger model
    (other / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ModelError, match="not this export's"):
        runtime.open_export(other)


def test_a_missing_method_and_a_wrong_input_shape(tiny_executorch, tmp_path):
    import torch
    from executorch.exir import to_edge

    bad = _copy(tiny_executorch, tmp_path / "nomethod")
    ep = torch.export.export(torch.nn.Linear(4, 4).eval(), (torch.zeros(1, 4),))
    (bad / "vae_decoder" / "model.pte").write_bytes(to_edge({"run": ep}).to_executorch().buffer)
    with pytest.raises(ModelError, match="has no method 'forward' \\(it has: run\\)"):
        runtime.open_export(bad)
    export = runtime.open_export(tiny_executorch)
    ids = export.tokenize(["a red fox in snow"])
    with pytest.raises(InputError, match="compiled for"):
        export.calls["unet"](np.zeros((1, 4, 9, 9), np.float32), export.calls["text_encoder"](ids))
    with pytest.raises(InputError, match="compiled for"):
        export.sample(np.concatenate([ids, ids]), np.zeros((2, *export.facts.latent_shape), np.float32))


@pytest.mark.parametrize("flags, match", [
    (["--fused"], "--fused does not apply"),
    (["--quantize", "int8", "--precision", "fp16"], "quantizes an fp32 graph"),
    (["--calibration-prompts", "p.txt"], "applies only to a calibrated"),
    (["--quantize-component", "unet"], "needs --quantize"),
    (["--quantize", "int4"], "int4"),
])
def test_bad_options_are_refused_before_any_work(flags, match, tiny_dir, tmp_path):
    from typer.testing import CliRunner

    from instaflow_edge.cli import app

    r = CliRunner().invoke(app, ["convert", str(tiny_dir), "--target", "executorch", "-o", str(tmp_path / "o"), *flags])
    assert r.exit_code != 0 and match in r.output, r.output
    assert not (tmp_path / "o").exists()


def test_the_runtime_prints_only_our_line(tiny_executorch, tmp_path):
    """ExecuTorch's C++ runtime probes cpuinfo on fd 2 when its threadpool starts: a user of `generate`
    sees our one line and nothing else."""
    import subprocess
    import sys

    out = tmp_path / "fox"
    p = subprocess.run([sys.executable, "-m", "instaflow_edge.cli", "generate", str(tiny_executorch), "a red fox",
                        "--backend", "executorch", "-o", str(out)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stderr.strip() == "", p.stderr
    assert p.stdout.strip().splitlines() == [p.stdout.strip()] and p.stdout.startswith("wrote 1 image"), p.stdout
    assert len(list(out.glob("*.png"))) == 1


def test_the_exporter_leaves_the_root_logger_as_it_was():
    """The XNNPACK partitioner's import calls logging.basicConfig and logs through logging.debug: inside
    root_logging_kept neither installs a root handler, so our log lines print once."""
    import logging

    from instaflow_edge.convert.executorch import require_executorch_export, root_logging_kept

    root = logging.getLogger()
    saved, level = list(root.handlers), root.level
    root.handlers[:] = []  # a CLI process: no handler on the root until ours
    try:
        with root_logging_kept():
            require_executorch_export()
            logging.basicConfig(level=logging.DEBUG)  # what an import inside may do
            logging.debug("from inside")
        assert root.handlers == [] and root.level == level
    finally:
        root.handlers[:] = saved
        root.setLevel(level)


def test_shared_provenance_lowers_to_the_same_program():
    """``shared_provenance`` (no deep copy of node provenance per pass) changes the lowering's speed, not
    its program: the same bytes as torch.fx's own deep copies, and the patch is gone afterwards."""
    import io

    import torch
    import torch.fx.traceback as fxtb

    from instaflow_edge.convert.executorch import lower, shared_provenance

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.lin = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Linear(8, 4)

        def forward(self, x):
            return self.lin(torch.relu(self.conv(x)).mean((2, 3)))

    torch.manual_seed(0)
    ep = torch.export.export(Net().eval(), (torch.randn(1, 3, 8, 8),))
    before = fxtb.NodeSource.__init__

    def program(shared: bool) -> bytes:
        import contextlib
        from unittest import mock

        ctx = contextlib.nullcontext() if shared else mock.patch("instaflow_edge.convert.executorch.shared_provenance",
                                                                 contextlib.nullcontext)
        with ctx:
            prog, _ = lower(ep)
        buf = io.BytesIO()
        prog.write_to_file(buf)
        return buf.getvalue()

    assert program(True) == program(False)
    assert fxtb.NodeSource.__init__ is before
    with shared_provenance():
        assert fxtb.NodeSource.__init__ is not before
    assert fxtb.NodeSource.__init__ is before


@pytest.mark.parametrize("quantized", [False, True])
def test_a_cat_of_one_tensor_with_itself_stays_in_xnnpack(quantized):
    """A UNet pruned of its mid-block concatenates a tensor with itself (its own skip): XNNPACK takes only
    distinct inputs, so without ``distinct_cat_inputs`` that cat splits the graph in two delegates (and
    with int8, a pruned tiny UNet's lowering failed inside XNNPACK: KeyError 'val' in its channels-last
    pass, at the split)."""
    import torch

    from instaflow_edge.convert.executorch import exported, lower
    from instaflow_edge.quantize.schemes import get_scheme

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(16, 4, 3, padding=1)

        def forward(self, x):
            h = self.a(x)
            return self.b(torch.cat([h, h], dim=1)) + h[:, :4]

    torch.manual_seed(0)
    net, x = Net().eval(), torch.randn(1, 3, 8, 8)
    module = net
    if quantized:
        module = get_scheme("executorch", "int8").apply(exported(net, (x,), for_quantizer=True).module(), (x,),
                                                         [(torch.randn(1, 3, 8, 8),) for _ in range(4)])
    program, record = lower(exported(module, (x,)))
    assert record["delegates"] == 1 and "aten.cat.default" not in record["portable_ops"], record
    from executorch.runtime import Runtime

    buf = program.buffer
    out = Runtime.get().load_program(buf).load_method("forward").execute([x])[0]
    ref = net(x).detach()
    err = (out - ref).abs().max().item()
    assert err < (0.1 * ref.abs().max().item() if quantized else 1e-5), err
