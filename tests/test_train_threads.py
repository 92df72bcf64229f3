"""The thread governor (threads.py) in every CPU-bound loop besides `train`'s engine: reflow-data,
train decoder, prune and the digits preset's VAE and text tower (init digits). Each takes ``threads``
("auto" by default, or a fixed count), re-measures the load in its loop, and gives torch its thread
count back at the end."""

from __future__ import annotations

import json

import pytest
import torch

from instaflow_edge.errors import InputError
from instaflow_edge.threads import Governor


@pytest.fixture
def governed(monkeypatch):
    """Records each governor's setting, its ticks, and torch's thread count inside the loop."""
    seen = []
    real_enter, real_tick = Governor.__enter__, Governor.tick

    def enter(self):
        out = real_enter(self)
        seen.append({"setting": self.setting, "ticks": 0, "threads_inside": None})
        return out

    def tick(self):
        n = real_tick(self)
        seen[-1]["ticks"] += 1
        seen[-1]["threads_inside"] = torch.get_num_threads()
        return n

    monkeypatch.setattr(Governor, "__enter__", enter)
    monkeypatch.setattr(Governor, "tick", tick)
    return seen


def _fixed(seen, count: int, ticks: int = 1):
    assert seen and all(s["setting"] == count for s in seen), seen
    assert all(s["ticks"] >= ticks and s["threads_inside"] == count for s in seen), seen


def test_reflow_data_is_governed(tmp_path, tiny_dir, governed):
    from instaflow_edge.train.reflow_data import ReflowDataConfig, make_reflow_data

    (tmp_path / "p.txt").write_text("a red fox\na blue whale\n")
    before = torch.get_num_threads()
    make_reflow_data(ReflowDataConfig(teacher=str(tiny_dir), output=str(tmp_path / "pairs"), prompts=str(tmp_path / "p.txt"),
                                      num_pairs=4, shard_size=2, steps=1, batch_size=1, device="cpu", threads=1),
                     progress=False)
    _fixed(governed, 1, ticks=4)  # one tick per batch
    assert torch.get_num_threads() == before
    assert json.loads((tmp_path / "pairs" / "manifest.json").read_text())["config"]["threads"] == 1


def test_prune_is_governed(tmp_path, tiny_dir, governed):
    from instaflow_edge.train.prune import PruneConfig, prune

    prune(PruneConfig(model=str(tiny_dir), output=str(tmp_path / "pruned"), variant="mid", threads=1))
    _fixed(governed, 1, ticks=4)  # between its phases


def test_train_decoder_is_governed(tmp_path, tiny_dir, governed):
    from test_train_teacher import make_image_folder

    from instaflow_edge.train.decoder import DecoderConfig, train_decoder

    images = make_image_folder(tmp_path / "imgs", n=4)
    train_decoder(DecoderConfig(model=str(tiny_dir), output=str(tmp_path / "dec"), data=str(images), channels="8,8,8,8",
                                blocks="1,1,1,1", one_step_latents=2, held_out=1, max_steps=3, batch_size=2,
                                progress=False, threads=1))
    _fixed(governed, 1, ticks=3)


def test_init_digits_vae_and_text_tower_are_governed(governed):
    from instaflow_edge.digits.preset import DigitsPresetConfig, build_digits

    build_digits(0, DigitsPresetConfig(vae_steps=3, vae_batch_size=8, text_steps=2, text_batch_size=16, threads=1),
                 progress=False)
    assert len(governed) == 2  # the VAE loop, then the text tower's
    _fixed(governed, 1, ticks=2)


@pytest.mark.parametrize("make", [
    lambda: __import__("instaflow_edge.train.prune", fromlist=["PruneConfig"]).PruneConfig(model="m", output="o", threads=0),
    lambda: __import__("instaflow_edge.train.decoder", fromlist=["DecoderConfig"]).DecoderConfig(model="m", output="o", threads="many"),
    lambda: __import__("instaflow_edge.digits.preset", fromlist=["DigitsPresetConfig"]).DigitsPresetConfig(threads=-1).validate(),
])
def test_a_bad_thread_count_is_a_one_line_error(make):
    with pytest.raises(InputError, match="threads must be 'auto' or a thread count"):
        make()


def test_defaults():
    """"auto" by default where no promise of bit-identical reruns stands in the way (decoder, prune);
    the digits build and reflow-data keep torch's count unless asked (their tests pin same seed → same
    bits, which "auto" on a busy machine breaks: seen here), and take threads="auto" when given."""
    from instaflow_edge.digits.preset import DigitsPresetConfig
    from instaflow_edge.train.decoder import DecoderConfig
    from instaflow_edge.train.prune import PruneConfig
    from instaflow_edge.train.reflow_data import ReflowDataConfig

    for cls in (DecoderConfig, PruneConfig):
        assert cls.__dataclass_fields__["threads"].default == "auto", cls
    for cls in (DigitsPresetConfig, ReflowDataConfig):
        assert cls.__dataclass_fields__["threads"].default is None, cls


def test_init_digits_with_auto_follows_the_load(governed):
    from instaflow_edge.digits.preset import DigitsPresetConfig, build_digits

    build_digits(0, DigitsPresetConfig(vae_steps=2, vae_batch_size=8, text_steps=2, text_batch_size=16, threads="auto"),
                 progress=False)
    assert [g["setting"] for g in governed] == ["auto", "auto"]
