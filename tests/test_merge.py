"""``instaflow-edge merge``: LoRAs (diffusers/peft and kohya layouts) and fine-tune deltas fused into a
pipeline, checked against diffusers' own ``load_lora_weights`` + ``fuse_lora``; bad inputs one line each."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from instaflow_edge.cli import app

pytest.importorskip("peft")

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"]  # attention, a 1×1 conv and 3×3 convs (LoCon)
TEXT_TARGETS = ["q_proj", "v_proj", "fc1"]
PROMPTS = ["a red fox in snow", "a lighthouse at dusk"]


def _cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _sd_pipeline(pipe):
    """diffusers' pipeline object around our modules (they are shared: what it fuses, ``pipe`` has)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
                                   scheduler=pipe.scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def make_peft_lora(model: Path, out: Path, seed: int = 0) -> Path:
    """A LoRA on MODEL made as a diffusers user makes one: peft adapters on the UNet and the text encoder
    (alpha ≠ rank, so the scaling is exercised), random up matrices (a trained LoRA's are not zero), saved
    with ``save_lora_weights`` and its adapter metadata."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    from instaflow_edge.pipeline import load_pipeline

    torch.manual_seed(seed)
    pipe = load_pipeline(model, device="cpu", dtype="float32")
    ucfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=UNET_TARGETS)
    tcfg = LoraConfig(r=2, lora_alpha=3, init_lora_weights="gaussian", target_modules=TEXT_TARGETS)
    inject_adapter_in_model(ucfg, pipe.unet)
    inject_adapter_in_model(tcfg, pipe.text_encoder)
    for m in (pipe.unet, pipe.text_encoder):
        for n, p in m.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.2)
    StableDiffusionPipeline.save_lora_weights(
        out, unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
        unet_lora_adapter_metadata=ucfg.to_dict(), text_encoder_lora_adapter_metadata=tcfg.to_dict(), safe_serialization=True)
    return out / "pytorch_lora_weights.safetensors"


def to_kohya(peft_file: Path, out: Path) -> Path:
    """The same LoRA in kohya's (civitai's) layout: ``lora_unet_…``/``lora_te_text_model_…`` names with
    ``_`` for ``.``, ``lora_down``/``lora_up`` and one ``alpha`` per layer."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(peft_file), "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    out_sd = {}
    for k, t in sd.items():
        comp, rest = k.split(".", 1)
        module, role = rest.rsplit(".lora_", 1)
        prefix = "lora_unet_" if comp == "unet" else "lora_te_text_model_"
        name = prefix + module.replace(".", "_")
        out_sd[f"{name}.{'lora_down' if role.startswith('A') else 'lora_up'}.weight"] = t.contiguous()
        out_sd[f"{name}.alpha"] = torch.tensor(float(meta[f"{comp}.lora_alpha"]))
    save_file(out_sd, str(out))
    return out


@pytest.fixture(scope="module")
def lora_file(tiny_dir, tmp_path_factory) -> Path:
    return make_peft_lora(tiny_dir, tmp_path_factory.mktemp("lora") / "peft")


def _images(pipe):
    from instaflow_edge.generator import decode_latents, generate_latents, make_noise

    noise = make_noise([0, 1], pipe.latent_shape(pipe.default_size, pipe.default_size))
    return decode_latents(pipe, generate_latents(pipe, PROMPTS, noise, 1))


def _max_diff(a, b) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return max((sa[k].float() - sb[k].float()).abs().max().item() for k in sa)


def test_a_peft_lora_fuses_as_diffusers_fuse_lora_does(tiny_dir, lora_file, tmp_path):
    from instaflow_edge.parity import psnr
    from instaflow_edge.pipeline import load_pipeline

    r = _cli("merge", tiny_dir, "--lora", f"{lora_file}:0.7", "-o", tmp_path / "m")
    assert r.exit_code == 0, r.output
    assert "diffusers: 44 unet, 6 text_encoder layers" in r.output, r.output
    ours = load_pipeline(tmp_path / "m", device="cpu", dtype="float32")

    ref = load_pipeline(tiny_dir, device="cpu", dtype="float32")
    base_images = _images(ref)
    sd = _sd_pipeline(ref)
    sd.load_lora_weights(str(lora_file.parent))
    sd.fuse_lora(lora_scale=0.7)
    sd.unload_lora_weights()
    assert _max_diff(ours.unet, ref.unet) < 1e-5 and _max_diff(ours.text_encoder, ref.text_encoder) < 1e-5
    mine, theirs = _images(ours), _images(ref)
    assert psnr(theirs, mine) >= 60
    assert psnr(base_images, mine) < 40  # the LoRA does change the image: the comparison above means something

    m = json.loads((tmp_path / "m" / "manifest.json").read_text())
    rec = m["merge"][0]
    assert m["stage"] == "merge" and rec["layout"] == "diffusers" and rec["scale"] == 0.7 and len(rec["sha256"]) == 64
    assert rec["layers_fused"] == {"unet": 44, "text_encoder": 6} and rec["ranks"] == [2, 4]


def test_a_kohya_lora_fuses_to_the_same_weights(tiny_dir, lora_file, tmp_path):
    from instaflow_edge.pipeline import load_pipeline

    kohya = to_kohya(lora_file, tmp_path / "civitai_style.safetensors")
    assert _cli("merge", tiny_dir, "--lora", lora_file, "-o", tmp_path / "p").exit_code == 0
    r = _cli("merge", tiny_dir, "--lora", kohya, "-o", tmp_path / "k")
    assert r.exit_code == 0, r.output
    assert "(kohya:" in r.output
    p = load_pipeline(tmp_path / "p", device="cpu", dtype="float32")
    k = load_pipeline(tmp_path / "k", device="cpu", dtype="float32")
    assert _max_diff(p.unet, k.unet) < 1e-6 and _max_diff(p.text_encoder, k.text_encoder) < 1e-6

    ref = load_pipeline(tiny_dir, device="cpu", dtype="float32")  # and diffusers' own reading of the kohya file
    sd = _sd_pipeline(ref)
    sd.load_lora_weights(str(kohya.parent), weight_name=kohya.name)
    sd.fuse_lora()
    sd.unload_lora_weights()
    assert _max_diff(k.unet, ref.unet) < 1e-5
    # diffusers 0.42 renames a kohya text encoder's q/k/v/out LoRAs to its old ``to_q_lora`` form, which
    # transformers 5 drops as unexpected keys (a table of warnings): only the MLP layers can be compared
    mine, theirs = k.text_encoder.state_dict(), ref.text_encoder.state_dict()
    mlp = [n for n in mine if ".mlp.fc1." in n]
    assert mlp and max((mine[n] - theirs[n]).abs().max().item() for n in mlp) < 1e-5


def test_two_loras_add_and_a_delta_adds_alpha_times_the_fine_tune(tiny_dir, lora_file, tmp_path):
    from instaflow_edge.pipeline import load_pipeline

    second = make_peft_lora(tiny_dir, tmp_path / "second", seed=1)
    assert _cli("merge", tiny_dir, "--lora", f"{lora_file}:0.5", "--lora", f"{second}:-0.25", "-o", tmp_path / "two").exit_code == 0
    assert _cli("merge", tiny_dir, "--lora", f"{lora_file}:0.5", "-o", tmp_path / "one").exit_code == 0
    assert _cli("merge", tmp_path / "one", "--lora", f"{second}:-0.25", "-o", tmp_path / "chain").exit_code == 0
    two = load_pipeline(tmp_path / "two", device="cpu", dtype="float32")
    chain = load_pipeline(tmp_path / "chain", device="cpu", dtype="float32")
    assert _max_diff(two.unet, chain.unet) < 1e-6

    # a "fine-tune" of tiny (tiny + the LoRA), carried over to another model of the same architecture
    other = tmp_path / "other"
    assert _cli("init", "tiny", other, "--seed", "5").exit_code == 0
    r = _cli("merge", other, "--delta", tmp_path / "one", "--base", tiny_dir, "--alpha", "0.8", "-o", tmp_path / "d")
    assert r.exit_code == 0, r.output
    d = load_pipeline(tmp_path / "d", device="cpu", dtype="float32")
    o = load_pipeline(other, device="cpu", dtype="float32")
    ft, base = load_pipeline(tmp_path / "one", device="cpu", dtype="float32"), load_pipeline(tiny_dir, device="cpu", dtype="float32")
    for comp in ("unet", "text_encoder"):
        got, want = getattr(d, comp).state_dict(), getattr(o, comp).state_dict()
        f, b = getattr(ft, comp).state_dict(), getattr(base, comp).state_dict()
        assert max((got[k] - (want[k] + 0.8 * (f[k] - b[k]))).abs().max().item() for k in got) < 1e-6
    rec = json.loads((tmp_path / "d" / "manifest.json").read_text())["merge"][0]
    assert rec["alpha"] == 0.8 and rec["tensors_changed"] == {"unet": 44, "text_encoder": 6}


def _write_st(path: Path, sd: dict) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


@pytest.mark.parametrize("case, match", [
    ("missing", "no such file"),
    ("pickle", "is a pickle file"),
    ("truncated", "not a sound safetensors"),
    ("no-layer", "matches no layer of MODEL"),
    ("wrong-shape", "a LoRA for another architecture"),
    ("sdxl", "text_encoder_2, which MODEL does not have"),
    ("loha", "LoHa adapter"),
    ("foreign-keys", "in no LoRA layout"),
    ("half-pair", "has no up matrix"),
    ("bad-scale", "scale"),
])
def test_a_bad_lora_is_one_line_and_nothing_is_written(case, match, tiny_dir, lora_file, tmp_path):
    z = torch.zeros
    files = {
        "missing": lambda: tmp_path / "nope.safetensors",
        "pickle": lambda: (torch.save({"a": z(1)}, tmp_path / "l.bin"), tmp_path / "l.bin")[1],
        "truncated": lambda: (tmp_path / "t.safetensors").write_bytes(lora_file.read_bytes()[:500]) and tmp_path / "t.safetensors",
        "no-layer": lambda: _write_st(tmp_path / "x.safetensors", {"lora_unet_down_blocks_9_attn_to_q.lora_down.weight": z(4, 32),
                                                                  "lora_unet_down_blocks_9_attn_to_q.lora_up.weight": z(32, 4)}),
        "wrong-shape": lambda: _write_st(tmp_path / "w.safetensors", {
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": z(4, 320),
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": z(320, 4)}),
        "sdxl": lambda: _write_st(tmp_path / "s.safetensors", {"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": z(4, 32),
                                                              "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": z(32, 4)}),
        "loha": lambda: _write_st(tmp_path / "h.safetensors", {"lora_unet_conv_in.hada_w1_a": z(4, 4)}),
        "foreign-keys": lambda: _write_st(tmp_path / "f.safetensors", {"model.diffusion_model.input_blocks.0.0.weight": z(4)}),
        "half-pair": lambda: _write_st(tmp_path / "p.safetensors", {"unet.conv_in.lora_A.weight": z(4, 4, 3, 3)}),
        "bad-scale": lambda: f"{lora_file}:nan",
    }
    arg = files[case]()
    r = _cli("merge", tiny_dir, "--lora", arg, "-o", tmp_path / "out")
    assert r.exit_code != 0 and match in r.output, r.output
    assert r.output.startswith("error:") and len(r.output.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, match", [
    ([], "nothing to merge"),
    (["--delta", "{tiny}"], "--delta and --base go together"),
    (["--lora", "{lora}", "--alpha", "0.5"], "--alpha scales a --delta"),
    (["--delta", "{tiny}", "--base", "{pruned}"], "another architecture than MODEL's"),
])
def test_bad_merge_options_and_a_delta_of_another_architecture(args, match, tiny_dir, lora_file, tmp_path):
    pruned = tmp_path / "pruned"
    if "{pruned}" in args:
        assert _cli("prune", tiny_dir, "--method", "channels", "--ratio", "0.5", "-o", pruned).exit_code == 0
    args = [a.format(tiny=tiny_dir, lora=lora_file, pruned=pruned) for a in args]
    r = _cli("merge", tiny_dir, *args, "-o", tmp_path / "out")
    assert r.exit_code != 0 and match in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "out").exists()


def test_a_merged_model_exports_with_its_gates(tiny_dir, lora_file, tmp_path):
    """The merged pipeline is an ordinary one: ONNX (the default suite; every target in the slow one)."""
    assert _cli("merge", tiny_dir, "--lora", lora_file, "-o", tmp_path / "m").exit_code == 0
    r = _cli("convert", tmp_path / "m", "--target", "onnx", "-o", tmp_path / "onnx")
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "onnx" / "manifest.json").read_text())
    e2e = next(p for p in m["parity"] if p["component"] == "end_to_end")
    assert e2e["psnr"] >= 60, m["parity"]  # fp32: the gate, met (convert fails otherwise), with room


@pytest.mark.slow
@pytest.mark.parametrize("target, flags", [("openvino", []), ("coreml", []), ("web", []), ("executorch", []),
                                           ("onnx", ["--quantize", "int8-static"])])
def test_a_merged_model_exports_to_every_target(target, flags, tiny_dir, lora_file, tmp_path):
    assert _cli("merge", tiny_dir, "--lora", lora_file, "-o", tmp_path / "m").exit_code == 0
    r = _cli("convert", tmp_path / "m", "--target", target, "-o", tmp_path / target, *flags)
    assert r.exit_code == 0, r.output
    assert (tmp_path / target / "manifest.json").is_file()
