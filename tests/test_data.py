"""The digits as a text-to-image dataset, the prompt set, and the folder loader with its bad inputs."""

import json
import random

import numpy as np
import pytest
import torch

from instaflow_edge.data import (
    DIGIT_WORDS,
    PROMPT_TEMPLATES,
    digit_prompt,
    digits_dataset,
    digits_split_indices,
    eval_prompts,
    folder_dataset,
    prompt_vocabulary,
)
from instaflow_edge.errors import InputError


def names_digit(prompt: str, label: int) -> bool:
    words = prompt.replace(",", " ").split()
    named = [i for i, w in enumerate(DIGIT_WORDS) if w in words] + [int(w) for w in words if w.isdigit()]
    return named == [label]


@pytest.fixture(scope="module")
def train():
    return digits_dataset("train", seed=0)


@pytest.fixture(scope="module")
def val():
    return digits_dataset("validation", seed=0)


def test_digits_items(train, val):
    assert (len(train), len(val)) == (1527, 270)
    item = train[5]
    assert set(item) == {"image", "prompt", "label"}
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    imgs = torch.stack([train[i]["image"] for i in range(len(train))])
    assert imgs.min() == -1.0 and 0.5 < imgs.max() <= 1.0
    assert torch.equal(imgs[:, 0], imgs[:, 1]) and torch.equal(imgs[:, 0], imgs[:, 2])  # gray in RGB
    assert imgs.mean() < -0.3  # dark background, bright strokes, as load_digits is


def test_prompts_name_the_digit_and_use_every_template(train):
    for i in range(len(train)):
        item = train[i]
        assert names_digit(item["prompt"], item["label"]), item
    used = {p.replace(w, "{word}") for p, lab in zip(train.prompts, train.labels) for w in [DIGIT_WORDS[lab]]}
    used |= {p.replace(str(lab), "{n}") for p, lab in zip(train.prompts, train.labels)}
    assert set(PROMPT_TEMPLATES) <= used


def test_split_is_stratified_disjoint_and_fixed_by_seed(train):
    tr, va = digits_split_indices("train", 0), digits_split_indices("validation", 0)
    assert not set(tr) & set(va) and len(tr) + len(va) == 1797
    counts = np.bincount(digits_dataset("validation", 0).labels, minlength=10)
    assert counts.min() >= 26 and counts.max() <= 28  # 15% of ~180 per class
    again = digits_dataset("train", seed=0)
    assert again.prompts == train.prompts and again.labels == train.labels
    assert torch.equal(again[7]["image"], train[7]["image"])
    other = digits_dataset("train", seed=1)
    assert digits_split_indices("validation", 1) != va
    assert other.prompts != train.prompts


def test_digit_prompt_accepts_index_and_generators():
    assert digit_prompt(7, 0) == "a handwritten seven"
    assert digit_prompt(7, 1) == "the digit 7"
    assert digit_prompt(3, len(PROMPT_TEMPLATES)) == digit_prompt(3, 0)
    for rng in (random.Random(0), np.random.default_rng(0), torch.Generator().manual_seed(0)):
        assert names_digit(digit_prompt(4, rng), 4)
    with pytest.raises(ValueError):
        digit_prompt(10, 0)


def test_eval_prompts_cover_digits_and_templates():
    ps = eval_prompts(8)
    assert len(ps) == 80
    assert all(names_digit(p, d) for p, d in ps)
    assert np.bincount([d for _, d in ps]).tolist() == [8] * 10
    assert [d for _, d in ps[:10]] == list(range(10))
    assert len({p for p, _ in ps}) == 80  # every digit meets every template
    assert eval_prompts(8) == ps
    with pytest.raises(InputError):
        eval_prompts(0)


def test_vocabulary_makes_every_prompt_word_one_token(tmp_path):
    from instaflow_edge.tokenizer import build_tokenizer

    tok = build_tokenizer(prompt_vocabulary(), tmp_path)
    for p, _ in eval_prompts(len(PROMPT_TEMPLATES)):
        ids = tok(p).input_ids[1:-1]
        assert len(ids) == len(p.replace(",", " ,").split()), p


# ---------------------------------------------------------------------------------------------------
# folder loader


def _write_images(folder, n=3, size=(20, 12)):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((size[1], size[0], 3), 40 * i, np.uint8)).save(folder / f"im{i}.png")


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_folder_dataset(tmp_path, fmt):
    _write_images(tmp_path / "d")
    rows = [(f"im{i}.png", f"caption, number {i}") for i in range(3)]
    if fmt == "jsonl":
        (tmp_path / "d" / "captions.jsonl").write_text("\n".join(json.dumps({"file": f, "text": t}) for f, t in rows) + "\n\n")
    else:
        (tmp_path / "d" / "captions.csv").write_text("file,text\n" + "".join(f'{f},"{t}"\n' for f, t in rows))
    ds = folder_dataset(tmp_path / "d", size=16)
    assert len(ds) == 3 and ds.prompts == [t for _, t in rows]
    item = ds[2]
    assert item["image"].shape == (3, 16, 16) and item["label"] == -1
    assert torch.allclose(item["image"], torch.full((3, 16, 16), 80 / 127.5 - 1))
    assert ds[0]["image"].min() == -1.0


def _bad(tmp_path, kind):
    d = tmp_path / "d"
    _write_images(d, n=2)
    cap = d / "captions.jsonl"
    cap.write_text('{"file": "im0.png", "text": "a"}\n{"file": "im1.png", "text": "b"}\n')
    if kind == "missing folder":
        return tmp_path / "nope", None, "does not exist"
    if kind == "missing captions":
        cap.unlink()
        return d, None, "no captions file"
    if kind == "named captions missing":
        return d, d / "other.csv", "does not exist"
    if kind == "missing image":
        cap.write_text('{"file": "im0.png", "text": "a"}\n{"file": "gone.png", "text": "b"}\n')
        return d, None, "'gone.png'"
    if kind == "unreadable image":
        (d / "im1.png").write_bytes(b"not a png at all")
        return d, None, "cannot read image"
    if kind == "bad json":
        cap.write_text('{"file": "im0.png", "text": "a"}\n{"file": \n')
        return d, None, "line 2"
    if kind == "csv without columns":
        cap.unlink()
        (d / "captions.csv").write_text("name,caption\nim0.png,a\n")
        return d, None, "'file' and 'text'"
    if kind == "empty captions":
        cap.write_text("\n")
        return d, None, "lists no images"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing folder", "missing captions", "named captions missing", "missing image",
                                  "unreadable image", "bad json", "csv without columns", "empty captions"])
def test_folder_dataset_bad_inputs(tmp_path, kind):
    folder, captions, needle = _bad(tmp_path, kind)
    with pytest.raises(InputError) as e:
        folder_dataset(folder, captions)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg and " — " in msg


def test_truncated_image_fails_at_load_with_one_line(tmp_path):
    d = tmp_path / "d"
    _write_images(d, n=1, size=(64, 64))
    (d / "captions.jsonl").write_text('{"file": "im0.png", "text": "a"}\n')
    raw = (d / "im0.png").read_bytes()
    (d / "im0.png").write_bytes(raw[: len(raw) // 2])
    ds = folder_dataset(d)
    with pytest.raises(InputError, match="cannot read image"):
        ds[0]


def test_digits_at_sd_size_are_upscaled_per_item_with_the_same_numbers(monkeypatch):
    """Above EAGER_BYTES the split is not held at full size (5 GB at 512²): each image is upscaled when read,
    to the very numbers the eager path computes."""
    import instaflow_edge.data as data

    eager = data.digits_dataset("train", size=48)
    monkeypatch.setattr(data, "EAGER_BYTES", 0)
    lazy = data.digits_dataset("train", size=48)
    assert len(lazy) == len(eager) and lazy.prompts == eager.prompts and lazy.labels == eager.labels
    for i in (0, 1, 500, len(eager) - 1):
        assert torch.equal(lazy[i]["image"], eager[i]["image"])
    assert data.digits_dataset("train", size=512)._load.func is data._upscaled_digit  # 512²: lazy at the default bound
