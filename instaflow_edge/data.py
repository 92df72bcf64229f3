"""Text-image datasets: the bundled handwritten digits as a text-to-image task, and user folders.

Every dataset is a :class:`TextImageDataset` whose items are ``{"image": (3, S, S) float32 in [-1, 1],
"prompt": str, "label": int}`` — the range and channel count SD's VAE expects.

* :func:`digits_dataset` — scikit-learn's ``load_digits()`` (1,797 real 8×8 scans, shipped in the
  wheel, no network), upscaled bilinearly to 32×32 and repeated over 3 channels; a fixed stratified
  85/15 train/validation split per ``seed``; item ``i``'s prompt is one of :data:`PROMPT_TEMPLATES`
  chosen by a fixed function of ``(seed, split, i)``.
* :func:`folder_dataset` — a folder of images plus a captions file (JSONL ``{"file", "text"}`` or CSV
  with ``file,text`` columns); images resized to ``size``; ``label`` is -1.
* :func:`eval_prompts` — the fixed (prompt, digit) set that ``instaflow-edge eval`` samples.
"""

from __future__ import annotations

import csv
import functools
import json
import random
import re
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import Dataset

from .errors import InputError

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

# {word}: the digit's English name; {n}: the numeral. Each names the digit unambiguously.
PROMPT_TEMPLATES = [
    "a handwritten {word}",
    "the digit {n}",
    "number {word}, written by hand",
    "a handwritten digit {n}",
    "the number {word}",
    "a scan of a handwritten {n}",
    "digit {word}",
    "a {word} drawn by hand",
]

SPLITS = ("train", "validation")
VALIDATION_FRACTION = 0.15
DIGITS_SIZE = 32
EAGER_BYTES = 256 * 2**20  # a digits split up to this size is upscaled once, up front; a bigger one per item
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def prompt_vocabulary() -> list[str]:
    """Every word the digit prompts use (for the offline tokenizer of the ``digits`` preset)."""
    words = re.findall(r"[a-z]+", " ".join(PROMPT_TEMPLATES).replace("{word}", "").replace("{n}", ""))
    return list(dict.fromkeys([*DIGIT_WORDS, *words]))


def digit_prompt(label: int, rng_or_index) -> str:
    """A prompt naming digit ``label``: template ``index % len(PROMPT_TEMPLATES)`` for an int, a random
    template for a ``random.Random``, ``numpy.random.Generator`` or ``torch.Generator``."""
    if isinstance(label, bool) or not 0 <= int(label) <= 9:
        raise ValueError(f"label must be a digit 0-9, got {label!r}")
    n = len(PROMPT_TEMPLATES)
    if isinstance(rng_or_index, int) and not isinstance(rng_or_index, bool):
        k = rng_or_index % n
    elif isinstance(rng_or_index, random.Random):
        k = rng_or_index.randrange(n)
    elif isinstance(rng_or_index, torch.Generator):
        k = int(torch.randint(n, (), generator=rng_or_index))
    elif hasattr(rng_or_index, "integers"):  # numpy Generator
        k = int(rng_or_index.integers(n))
    else:
        raise TypeError(f"rng_or_index must be an int or a random generator, got {type(rng_or_index).__name__}")
    label = int(label)
    return PROMPT_TEMPLATES[k].format(word=DIGIT_WORDS[label], n=label)


class TextImageDataset(Dataset):
    """(image, prompt, label) items; images come from ``load(i)`` as (3, size, size) in [-1, 1]."""

    def __init__(self, prompts: list[str], labels: list[int], load: Callable[[int], torch.Tensor], size: int,
                 name: str):
        if len(prompts) != len(labels):
            raise ValueError("prompts and labels differ in length")
        self.prompts = list(prompts)
        self.labels = list(labels)
        self.size = int(size)
        self.name = name
        self._load = load

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i = i % len(self)
        return {"image": self._load(i), "prompt": self.prompts[i], "label": self.labels[i]}

    def __repr__(self) -> str:
        return f"TextImageDataset({self.name!r}, {len(self)} items, {self.size}×{self.size})"


# ---------------------------------------------------------------------------------------------------
# digits


def digits_arrays(size: int = DIGITS_SIZE):
    """All 1,797 digits as ``(images (N, 3, size, size) float32 in [-1, 1], labels (N,) int64)``."""
    x, labels = _digits_8x8()
    return _upscale(x, size), labels


def _digits_8x8():
    """``(images (N, 1, 8, 8) float32 in [0, 1], labels (N,) int64)``: scikit-learn's digits as they are."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.from_numpy(d.images).float().div_(16.0).unsqueeze(1), torch.from_numpy(d.target).long()


def _upscale(x: torch.Tensor, size: int) -> torch.Tensor:
    """(N, 1, 8, 8) in [0, 1] → (N, 3, size, size) in [-1, 1]; each image on its own (bilinear is a convex
    combination of its pixels, so the range stays [0, 1])."""
    import torch.nn.functional as F

    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x * 2 - 1).clamp_(-1, 1).expand(-1, 3, -1, -1).contiguous()


def _upscaled_digit(small: torch.Tensor, size: int, i: int) -> torch.Tensor:
    """Item ``i`` of ``digits_arrays(size)``, upscaled from its 8×8 original when it is read."""
    return _upscale(small[i:i + 1], size)[0]


def digits_split_indices(split: str, seed: int = 0) -> list[int]:
    """Indices into ``load_digits()`` of ``split``: a stratified 85/15 split, fixed by ``seed``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if split not in SPLITS:
        raise InputError(f"unknown digits split {split!r}", f"use one of {', '.join(SPLITS)}")
    target = load_digits().target
    train, val = train_test_split(list(range(len(target))), test_size=VALIDATION_FRACTION, random_state=seed,
                                  stratify=target)
    return sorted(train if split == "train" else val)


def digits_dataset(split: str = "train", seed: int = 0, size: int = DIGITS_SIZE) -> TextImageDataset:
    """The digits as text-to-image data: 32×32×3 in [-1, 1], a prompt naming each digit."""
    import numpy as np

    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed!r}", "pass a seed of 0 or larger")
    idx = digits_split_indices(split, seed)
    if len(idx) * 3 * size * size * 4 <= EAGER_BYTES:
        images, labels = digits_arrays(size)
        images, labels = images[idx], labels[idx].tolist()
        load = images.__getitem__
    else:  # at SD's 512² the split would be 5 GB in memory: each image is upscaled when it is read
        small, labels = _digits_8x8()
        small, labels = small[idx], labels[idx].tolist()
        load = functools.partial(_upscaled_digit, small, size)
    # the template of item i: a fixed function of (seed, split, i)
    rng = np.random.default_rng([seed, SPLITS.index(split), 0xD161])
    templates = rng.integers(0, len(PROMPT_TEMPLATES), size=len(idx)).tolist()
    prompts = [digit_prompt(lab, t) for lab, t in zip(labels, templates)]
    return TextImageDataset(prompts, labels, load, size, f"digits:{split}:seed{seed}")


def eval_prompts(num_per_digit: int) -> list[tuple[str, int]]:
    """The fixed evaluation set: ``num_per_digit`` prompts per digit cycling through the templates,
    interleaved by digit (any prefix of 10·k items covers every digit k times)."""
    if isinstance(num_per_digit, bool) or not isinstance(num_per_digit, int) or num_per_digit < 1:
        raise InputError(f"num_per_digit must be a positive integer, got {num_per_digit!r}", "pass 1 or more")
    return [(digit_prompt(d, j + d), d) for j in range(num_per_digit) for d in range(10)]


# ---------------------------------------------------------------------------------------------------
# user data


def read_captions(path: Path) -> list[tuple[str, str]]:
    """(file, text) rows of a JSONL or CSV captions file."""
    rows: list[tuple[str, str]] = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"captions file {path} is not UTF-8 text ({e.reason})", "save it as UTF-8") from e
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines())
        if not reader.fieldnames or not {"file", "text"} <= set(reader.fieldnames):
            raise InputError(f"captions file {path} has no 'file' and 'text' columns",
                             "its first line must be a header naming the columns file,text")
        for n, row in enumerate(reader, start=2):
            if not row.get("file") or row.get("text") is None:
                raise InputError(f"{path} line {n}: empty 'file' or missing 'text'", "give every row a file and a text")
            rows.append((row["file"], row["text"]))
    elif path.suffix.lower() in (".jsonl", ".json"):
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path} line {n} is not valid JSON ({e.msg})", 'write one {"file": ..., "text": ...} object per line') from e
            if not isinstance(rec, dict) or not isinstance(rec.get("file"), str) or not isinstance(rec.get("text"), str):
                raise InputError(f"{path} line {n} lacks string 'file' and 'text' fields",
                                 'write one {"file": ..., "text": ...} object per line')
            rows.append((rec["file"], rec["text"]))
    else:
        raise InputError(f"captions file {path} is neither .jsonl nor .csv", "use JSONL with file/text keys or CSV with file,text columns")
    if not rows:
        raise InputError(f"captions file {path} lists no images", "add one row per image")
    return rows


def _load_image(path: Path, size: int) -> torch.Tensor:
    return load_image(path, size, size, "replace or remove it from the captions file")


def load_image(path: Path, height: int, width: int, fix: str = "pass a PNG or JPEG image") -> torch.Tensor:
    """An image file as a (3, height, width) tensor in [-1, 1], resized (bicubic) when its size differs;
    an unreadable or oversized file is a one-line error."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if im.size != (width, height):
                im = im.resize((width, height), Image.Resampling.BICUBIC)
            arr = np.asarray(im, dtype=np.float32)
    except Image.DecompressionBombError as e:
        raise _too_large(path, e) from e
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise InputError(f"cannot read image {path} ({type(e).__name__}: {str(e)[:150]})", fix) from e
    return torch.from_numpy(arr).permute(2, 0, 1).div(127.5).sub(1.0).contiguous()


def folder_dataset(folder: str | Path, captions: str | Path | None = None, size: int = DIGITS_SIZE) -> TextImageDataset:
    """A folder of images with a captions file; ``captions`` defaults to ``captions.jsonl`` or
    ``captions.csv`` inside the folder. Every listed image is opened now, so a bad file fails here,
    not an hour into training; pixels are decoded lazily, per item."""
    from PIL import Image, UnidentifiedImageError

    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"data folder {folder} does not exist or is not a folder", "pass a folder of images, or --data digits")
    if isinstance(size, bool) or not isinstance(size, int) or size < 8:
        raise InputError(f"size must be an integer ≥ 8, got {size!r}", "pass an image size such as 32 or 512")
    if captions is None:
        found = [folder / n for n in ("captions.jsonl", "captions.csv") if (folder / n).is_file()]
        if not found:
            raise InputError(f"no captions file in {folder}", "add captions.jsonl ({\"file\", \"text\"} per line) or captions.csv (file,text)")
        captions = found[0]
    captions = Path(captions)
    if not captions.is_file():
        raise InputError(f"captions file {captions} does not exist", "pass a JSONL or CSV file listing file and text")
    rows = read_captions(captions)
    paths = []
    for file, _ in rows:
        p = folder / file
        if not p.is_file():
            raise InputError(f"{captions} names {file!r}, which is not in {folder}", "fix the captions file or add the image")
        try:
            with Image.open(p) as im:
                im.size  # header read: not an image → fails here
        except Image.DecompressionBombError as e:  # not an OSError: PIL refuses to decode that many pixels
            raise _too_large(p, e) from e
        except (UnidentifiedImageError, OSError) as e:
            raise InputError(f"cannot read image {p} ({type(e).__name__})", "replace or remove it from the captions file") from e
        paths.append(p)
    return TextImageDataset([t for _, t in rows], [-1] * len(rows), _FolderImages(paths, size), size, f"folder:{folder}")


def _too_large(path: Path, e: Exception) -> InputError:
    """PIL's decompression-bomb guard: an image whose header claims more pixels than PIL will decode."""
    return InputError(f"image {path} is too large to decode safely ({str(e)[:120]})",
                      "replace it by a smaller image, or remove it from the captions file")


class _FolderImages:
    """``load(i)`` of a folder dataset (a class, not a lambda, so DataLoader workers can pickle it)."""

    def __init__(self, paths: list[Path], size: int):
        self.paths, self.size = paths, size

    def __call__(self, i: int) -> torch.Tensor:
        return _load_image(self.paths[i], self.size)
