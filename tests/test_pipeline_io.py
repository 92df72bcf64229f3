"""Pipeline folders: save/load round trip, seeded presets, and every way a folder can be bad."""

import json
import shutil

import pytest
import torch

from instaflow_edge.errors import InputError, ModelError, OutputExistsError
from instaflow_edge.pipeline import load_pipeline
from instaflow_edge.presets import (
    InitConfig,
    build_tiny,
    count_params,
    get_preset,
    init,
)


def _state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def test_round_trip_keeps_weights_tokenizer_and_kind(tiny_dir):
    built = build_tiny(0)
    loaded = load_pipeline(tiny_dir)
    for comp in ("text_encoder", "unet", "vae"):
        a, b = _state(getattr(built, comp)), _state(getattr(loaded, comp))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), comp
    prompts = ["a red fox in snow", "an owl, at night!"]
    assert torch.equal(built.tokenize(prompts), loaded.tokenize(prompts))
    assert loaded.info.flow == "rectified_flow" and loaded.info.one_step
    manifest = json.loads((tiny_dir / "manifest.json").read_text())
    assert manifest["model"]["default_steps"] == 1 and len(manifest["content_sha256"]) == 64
    # slow-tokenizer files for older transformers, optimum and Apple's Swift pipeline
    assert (tiny_dir / "tokenizer" / "vocab.json").is_file() and (tiny_dir / "tokenizer" / "merges.txt").is_file()


def test_prompt_words_are_single_tokens(tiny_pipe):
    ids = tiny_pipe.tokenize(["a red fox"])[0]
    assert ids[:5].tolist()[0] == tiny_pipe.tokenizer.bos_token_id
    assert ids[4].item() == tiny_pipe.tokenizer.eos_token_id  # bos a red fox eos


def test_same_seed_same_weights_other_seed_differs():
    a, b, c = build_tiny(3), build_tiny(3), build_tiny(4)
    sa, sb, sc = _state(a.unet), _state(b.unet), _state(c.unet)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_sd15_architecture_counts_on_meta_device():
    """The sd15 preset is exactly SD1.5 / InstaFlow-0.9B (built on the meta device: no memory)."""
    spec = get_preset("sd15")
    with torch.device("meta"):
        pipe = spec.build(0)
    counts = {k: count_params(getattr(pipe, k)) for k in ("text_encoder", "unet", "vae")}
    assert counts == {"text_encoder": 123_060_480, "unet": 859_520_964, "vae": 83_653_863}
    assert pipe.default_size == 512


def test_unknown_preset_lists_known():
    with pytest.raises(InputError, match="sd15.*tiny|tiny.*sd15"):
        init(InitConfig(preset="nope", output="/tmp/never"))


def test_init_refuses_existing_output(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(OutputExistsError, match="--force"):
        init(InitConfig(preset="tiny", output=str(tmp_path / "m")))


@pytest.fixture
def broken(tmp_path, tiny_dir):
    d = tmp_path / "m"
    shutil.copytree(tiny_dir, d)
    return d


def test_missing_path(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_pipeline(tmp_path / "nope")


def test_no_model_index(broken):
    (broken / "model_index.json").unlink()
    with pytest.raises(ModelError, match="model_index.json"):
        load_pipeline(broken)


def test_missing_component(broken):
    shutil.rmtree(broken / "vae")
    with pytest.raises(ModelError, match="vae.*missing"):
        load_pipeline(broken)


def test_truncated_safetensors(broken):
    f = next((broken / "unet").glob("*.safetensors"))
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    with pytest.raises(ModelError, match="truncated or corrupt"):
        load_pipeline(broken)


def test_corrupt_safetensors_header(broken):
    f = next((broken / "text_encoder").glob("*.safetensors"))
    data = bytearray(f.read_bytes())
    data[8:16] = b"\xff" * 8
    f.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="truncated or corrupt"):
        load_pipeline(broken)


def test_pickle_only_weights_need_flag(broken):
    unet = broken / "unet"
    sd = load_pipeline(broken).unet.state_dict()
    for f in unet.glob("*.safetensors"):
        f.unlink()
    torch.save(sd, unet / "diffusion_pytorch_model.bin")
    with pytest.raises(ModelError, match="--allow-pickle"):
        load_pipeline(broken)
    pipe = load_pipeline(broken, allow_pickle=True)
    assert torch.equal(pipe.unet.conv_in.weight, sd["conv_in.weight"])


@pytest.mark.parametrize("name", ["DiffusionPipeline", "StableDiffusionPipeline", "NoSuchScheduler", "os"])
def test_scheduler_class_must_be_a_diffusers_scheduler(broken, name):
    index = json.loads((broken / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", name]
    (broken / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError, match="not a diffusers scheduler"):
        load_pipeline(broken)


def test_missing_scheduler_entry_is_an_error_not_a_default(broken):
    index = json.loads((broken / "model_index.json").read_text())
    del index["scheduler"]
    (broken / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError, match="no .scheduler. component"):
        load_pipeline(broken)


def test_loading_leaves_library_logging_as_it_was(tiny_dir):
    import diffusers
    import transformers

    before = (diffusers.utils.logging.get_verbosity(), transformers.utils.logging.get_verbosity(),
              torch.random.get_rng_state())
    load_pipeline(tiny_dir)
    build_tiny(0)
    after = (diffusers.utils.logging.get_verbosity(), transformers.utils.logging.get_verbosity(),
             torch.random.get_rng_state())
    assert before[:2] == after[:2] and torch.equal(before[2], after[2])


def test_a_model_without_our_manifest_is_guessed_aloud_or_taken_as_told(tiny_dir, tmp_path):
    """InstaFlow's released checkpoints in ./models/iflow have no manifest: the guess (a 25-step diffusion
    model, from the name) is printed once; `--flow rectified-flow --default-steps 1` says what it is."""
    import subprocess
    import sys

    from instaflow_edge.pipeline import assume_model, detect_info

    iflow = tmp_path / "models" / "iflow"
    shutil.copytree(tiny_dir, iflow)
    (iflow / "manifest.json").unlink()
    cli = [sys.executable, "-m", "instaflow_edge.cli"]
    r = subprocess.run([*cli, "generate", str(iflow), "a fox", "-o", str(tmp_path / "a"), "--no-progress"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    told = [ln for ln in r.stderr.splitlines() if "no instaflow-edge manifest" in ln]
    assert len(told) == 1 and "diffusion model with 25 default steps" in told[0] and "--flow" in told[0], r.stderr
    from typer.testing import CliRunner

    from instaflow_edge.cli import app

    r = CliRunner().invoke(app, ["--flow", "rectified-flow", "--default-steps", "1", "generate", str(iflow), "a fox",
                                 "-o", str(tmp_path / "b"), "--no-progress"])
    assert r.exit_code == 0 and "no instaflow-edge manifest" not in r.output and "1 step," in r.output, r.output
    s = json.loads((tmp_path / "b" / "manifest.json").read_text())["sampling"]
    assert s["steps"] == 1
    with assume_model("rectified-flow", 1):
        info = detect_info(str(iflow), iflow, json.loads((iflow / "model_index.json").read_text()))
    assert (info.flow, info.default_steps) == ("rectified_flow", 1)
    assert detect_info(str(iflow), iflow, {}).flow == "diffusion"  # the block is over: guessed again
    with assume_model("diffusion"), pytest.raises(InputError, match="says the model is rectified-flow"):
        detect_info(str(tiny_dir), tiny_dir, {})  # our manifest is not overridden


def test_bench_labels_one_folder_once_and_number_name_collisions(tiny_dir, tmp_path):
    from instaflow_edge.runtime import parse_exports

    made = []
    for i in range(3):  # three exports whose folders share a name and whose manifests share a label
        d = tmp_path / f"p{i}" / "onnx"
        d.mkdir(parents=True)
        (d / "manifest.json").write_text(json.dumps({"kind": "onnx-export", "precision": "fp32"}))
        made.append(str(d))
    labels = list(parse_exports(made))
    assert len(set(labels)) == 3 and labels[0] == "ort fp32", labels
    with pytest.raises(InputError, match="given twice"):
        parse_exports([made[0], str(tmp_path / "p0" / "." / "onnx")])
