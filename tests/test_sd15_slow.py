"""Full SD1.5 / InstaFlow-0.9B scale on the CPU (≈ 4 GB on disk, ≈ 6 GiB RAM, a few minutes)."""

import json

import pytest

pytestmark = pytest.mark.slow


def test_sd15_init_and_one_512_generate(tmp_path):
    from instaflow_edge.generate import GenerateConfig, generate
    from instaflow_edge.presets import InitConfig, init

    init(InitConfig(preset="sd15", output=str(tmp_path / "sd15")))
    manifest = json.loads((tmp_path / "sd15" / "manifest.json").read_text())
    assert manifest["params"] == {"text_encoder": 123_060_480, "unet": 859_520_964, "vae": 83_653_863}
    m = generate(GenerateConfig(model=str(tmp_path / "sd15"), prompts=["a red fox in snow"], output=str(tmp_path / "o"),
                                device="cpu"), progress=False)
    assert (m["sampling"]["height"], m["sampling"]["width"], m["sampling"]["steps"]) == (512, 512, 1)
    assert (tmp_path / "o" / m["images"][0]["file"]).is_file()
