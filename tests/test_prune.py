"""prune (blocks: BK-SDM small/base/mid; channels) and its recovery by `train distill --teacher`, on the
tiny preset: configs diffusers builds, weights from the surviving blocks, counted MACs, convert (ONNX and
Core ML) and generate on the result, and the bad inputs as one line with nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def tiny2_dir(tmp_path_factory, tiny_dir) -> Path:
    """The tiny preset with two ResNet/attention pairs per stage (BK-SDM's pair removal needs a second)."""
    import torch
    from diffusers import UNet2DConditionModel

    from instaflow_edge.pipeline import load_pipeline

    pipe = load_pipeline(tiny_dir)
    cfg = {k: v for k, v in dict(pipe.unet.config).items() if not k.startswith("_")}
    cfg["layers_per_block"] = 2
    torch.manual_seed(0)
    pipe.unet = UNet2DConditionModel.from_config(cfg)
    out = tmp_path_factory.mktemp("prune") / "tiny2"
    pipe.save(out, pipe.info)
    m = json.loads((tiny_dir / "manifest.json").read_text())
    m["prompts"] = PROMPTS  # as a trained model's manifest has them
    (out / "manifest.json").write_text(json.dumps(m))
    return out


PROMPTS = ["a blue car", "a red fox"]


def test_a_pruned_model_keeps_its_prompts(both_pruned):
    """Its int8 exports calibrate on the prompts the model learnt from, through every derived model."""
    assert json.loads((both_pruned / "manifest.json").read_text())["prompts"] == PROMPTS


def _prune(model, out, **kw) -> dict:
    from instaflow_edge.train.prune import PruneConfig, prune

    return prune(PruneConfig(model=str(model), output=str(out), **kw))


def _unet(folder):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(folder, subfolder="unet", use_safetensors=True)


@pytest.mark.parametrize("variant,layers,mid", [("small", [1, 1], None), ("base", [1, 1], "UNetMidBlock2DCrossAttn"),
                                                ("mid", [2, 2], None)])
def test_blocks_variants(tmp_path, tiny2_dir, variant, layers, mid):
    m = _prune(tiny2_dir, tmp_path / "p", variant=variant)
    cfg = json.loads((tmp_path / "p" / "unet" / "config.json").read_text())
    assert cfg["layers_per_block"] == layers and cfg["mid_block_type"] == mid
    assert [p.suffix for p in (tmp_path / "p" / "unet").glob("*.*") if p.suffix != ".json"] == [".safetensors"]
    new, old = _unet(tmp_path / "p"), _unet(tiny2_dir)
    sd_new, sd_old = new.state_dict(), old.state_dict()
    assert (new.mid_block is None) == (mid is None)
    assert len(new.up_blocks[0].resnets) == layers[-1] + 1  # diffusers: up stages have layers + 1
    # surviving blocks carry their weights: down keeps the first pair, up the first pairs and the last
    for key in ("down_blocks.0.resnets.0.conv1.weight", "down_blocks.0.attentions.0.proj_in.weight", "conv_out.weight"):
        assert sd_new[key].equal(sd_old[key])
    last = layers[-1]
    assert sd_new[f"up_blocks.1.resnets.{last}.conv1.weight"].equal(sd_old["up_blocks.1.resnets.2.conv1.weight"])
    p = m["prune"]
    assert p["method"] == "blocks" and p["variant"] == variant
    assert p["after"]["params"] == sum(t.numel() for t in new.parameters())
    assert 0 < p["after"]["macs_per_image"] < p["before"]["macs_per_image"]
    assert m["model"]["default_steps"] == 1


def test_blocks_removed_pairs_count_macs(tmp_path, tiny2_dir):
    """The counted MACs fall by what the removed blocks cost: small removes more than base or mid."""
    small = _prune(tiny2_dir, tmp_path / "s", variant="small")["prune"]["macs_reduction"]
    mid = _prune(tiny2_dir, tmp_path / "m", variant="mid")["prune"]["macs_reduction"]
    assert 0.3 < small < 0.7 and 0 < mid < small


def test_channels_narrows_by_importance(tmp_path, tiny_dir):
    import torch

    m = _prune(tiny_dir, tmp_path / "c", method="channels", ratio=0.5)
    cfg = json.loads((tmp_path / "c" / "unet" / "config.json").read_text())
    assert cfg["block_out_channels"] == [32, 32]  # 64 → 32; 32 stays (a multiple of the 32 norm groups)
    assert m["prune"]["stage_channels"]["stage0"] == list(range(32)) and len(m["prune"]["stage_channels"]["stage1"]) == 32
    new, old = _unet(tmp_path / "c"), _unet(tiny_dir)
    torch.manual_seed(0)
    x, c, t = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32), torch.full((2,), 1000.0)
    with torch.no_grad():
        a, b = old(x, t, encoder_hidden_states=c).sample, new(x, t, encoder_hidden_states=c).sample
    # the kept channels carry the old function (a wrong index map gives an unrelated output, cosine ≈ 0)
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.5
    assert m["prune"]["macs_reduction"] > 0.2


def test_recovery_with_feature_loss(tmp_path, tiny2_dir):
    from instaflow_edge.errors import InputError
    from instaflow_edge.train.reflow import DistillConfig, train_distill
    from instaflow_edge.train.reflow_data import ReflowDataConfig, make_reflow_data

    pairs = tmp_path / "pairs"
    (tmp_path / "p.txt").write_text("a red fox\na blue cat\n")
    make_reflow_data(ReflowDataConfig(teacher=str(tiny2_dir), output=str(pairs), prompts=str(tmp_path / "p.txt"),
                                      num_pairs=4, shard_size=4, steps=2, device="cpu"), progress=False)
    _prune(tiny2_dir, tmp_path / "small", variant="small")
    engine = dict(max_steps=2, batch_size=2, checkpoint_every=0, cpu=True, progress=False, ema_decay=0.0)
    losses = {}
    for w in (0.0, 1.0):
        out = tmp_path / f"rec{w}"
        train_distill(DistillConfig(model=str(tmp_path / "small"), pairs=str(pairs), output=str(out),
                                    teacher=str(tiny2_dir), feature_weight=w, **engine))
        m = json.loads((out / "manifest.json").read_text())
        assert m["teacher"] == str(tiny2_dir) and m["feature_weight"] == w and m["one_step"]
        losses[w] = m["training"]["final_loss"]
    assert losses[1.0] > losses[0.0]  # the feature term adds to the same task + output loss
    _prune(tiny2_dir, tmp_path / "narrow", method="channels", ratio=0.5)
    with pytest.raises(InputError, match="stage widths"):
        train_distill(DistillConfig(model=str(tmp_path / "narrow"), pairs=str(pairs), output=str(tmp_path / "x"),
                                    teacher=str(tiny2_dir), feature_weight=1.0, **engine))
    assert not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def both_pruned(tmp_path_factory, tiny2_dir) -> Path:
    """Both methods in one model: blocks (small), then channels (0.5)."""
    root = tmp_path_factory.mktemp("both")
    _prune(tiny2_dir, root / "blocks", variant="small")
    _prune(root / "blocks", root / "both", method="channels", ratio=0.5)
    return root / "both"


def test_pruned_model_converts_to_onnx_quantizes_and_generates(tmp_path, both_pruned):
    from typer.testing import CliRunner

    from instaflow_edge.cli import app

    run = lambda *a: CliRunner().invoke(app, [str(x) for x in a])  # noqa: E731
    r = run("convert", both_pruned, "--target", "onnx", "-o", tmp_path / "onnx")
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "onnx" / "manifest.json").read_text())
    parity = {row["component"]: row for row in m["parity"]}
    assert parity["end_to_end"]["psnr"] >= 60 and parity["unet"]["psnr"] >= 60  # gated against the pruned PyTorch model
    r = run("quantize", tmp_path / "onnx", "--scheme", "fp16", "-o", tmp_path / "fp16")
    assert r.exit_code == 0, r.output
    for backend, model in (("torch", both_pruned), ("onnx", tmp_path / "onnx"), ("onnx", tmp_path / "fp16")):
        out = tmp_path / f"g-{model.name}"
        r = run("generate", model, "a red fox", "-o", out, "--backend", backend)
        assert r.exit_code == 0, r.output
        assert len(list(out.glob("*.png"))) == 1


def test_pruned_model_converts_to_coreml(tmp_path, both_pruned):
    from instaflow_edge.convert import export
    from instaflow_edge.convert.config import ConvertConfig

    m = export(ConvertConfig.of("coreml", model=str(both_pruned), output=str(tmp_path / "cml")))
    assert (tmp_path / "cml" / "Unet.mlpackage").is_dir()
    assert m["end_to_end"]["psnr"] >= 35.0


def _copy_with_unet_class(src: Path, dst: Path, cls: str) -> Path:
    shutil.copytree(src, dst)
    index = json.loads((dst / "model_index.json").read_text())
    index["unet"] = ["diffusers", cls]
    (dst / "model_index.json").write_text(json.dumps(index))
    return dst


def test_bad_inputs_are_one_line_and_write_nothing(tmp_path, tiny_dir):
    from typer.testing import CliRunner

    from instaflow_edge.cli import app

    notunet = _copy_with_unet_class(tiny_dir, tmp_path / "notunet", "UNet2DModel")
    (tmp_path / "work").mkdir()
    out = tmp_path / "work" / "out"
    cases = [
        (["prune", notunet, "-o", out], "not a UNet2DConditionModel"),
        (["prune", tmp_path / "work", "-o", out], "no model_index.json"),
        (["prune", tiny_dir, "--method", "channels", "--ratio", 0, "-o", out], "ratio"),
        (["prune", tiny_dir, "--method", "channels", "--ratio", 1, "-o", out], "ratio"),
        (["prune", tiny_dir, "--method", "channels", "--ratio", 1.5, "-o", out], "ratio"),
        (["prune", tiny_dir, "--ratio", 0.5, "-o", out], "--method channels"),
        (["prune", tiny_dir, "--method", "blocks", "--variant", "small", "-o", out], "no stage has a second"),
        (["prune", tiny_dir, "--method", "channels", "--ratio", 0.1, "-o", out], "removes no channels"),
        (["prune", tiny_dir, "--method", "squash", "-o", out], "squash"),
        (["train", "distill", tiny_dir, "-o", out, "--teacher", tiny_dir], "--pairs"),
        (["train", "distill", tiny_dir, "--pairs", tmp_path / "nope", "-o", out, "--teacher", tiny_dir], "pairs folder"),
        (["train", "distill", tiny_dir, "--pairs", tmp_path / "work", "-o", out, "--feature-weight", 1], "--teacher"),
    ]
    for args, needle in cases:
        r = CliRunner().invoke(app, [str(a) for a in args])
        lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
        assert r.exit_code != 0, (args, r.output)
        assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], (args, r.output)
        assert "Traceback" not in r.output
        assert list((tmp_path / "work").iterdir()) == [], (args, list((tmp_path / "work").iterdir()))
