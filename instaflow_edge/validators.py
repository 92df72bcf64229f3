"""Checks of user-supplied values, one home each: integers, numbers, seeds, enum choices, image sizes,
image counts and prompt files. Every failure is an :class:`InputError` naming the option
(``--max-steps``) and the fix, and quoting at most a short excerpt of the bad value (:func:`_short`).

Configs call these from ``__post_init__`` so a config is checked (and its choices turned into enums)
exactly once, when it is made. This module is imported by ``--help``: keep it free of heavy imports.
"""

from __future__ import annotations

import enum
import json
import math
from pathlib import Path
from typing import Any, TypeVar

from .errors import InputError

E = TypeVar("E", bound=enum.Enum)

# torch.manual_seed and numpy take seeds that fit an int64; a run that uses seeds seed … seed + n − 1
# (one per image) must keep the last one below 2**63 too
MAX_SEED = 2**63 - 1
# the largest image side: SD's VAE decoder at 4096² already needs tens of GB; beyond it a typo
# (--height 100000) would compute for minutes before running out of memory
MAX_IMAGE_SIDE = 4096
# images one command makes: each keeps a record in the manifest (held in memory until it is written)
MAX_IMAGES = 1_000_000
# text files read whole (prompt lists, config files): a bigger file is a mistake, not a prompt list
MAX_TEXT_BYTES = 64 * 2**20
# JSON files we read (manifests, configs, bench results): a tokenizer.json is a few MB; nesting deeper
# than this is a crafted file (the C decoder would raise RecursionError, a traceback)
MAX_JSON_BYTES = 64 * 2**20
MAX_JSON_DEPTH = 64


def flag(name: str) -> str:
    """The command-line spelling of a config field: ``max_steps`` → ``--max-steps``."""
    return "--" + name.replace("_", "-")


def integer(name: str, v: Any, low: int = 0) -> int:
    """``v`` must be an int ≥ ``low`` (bools are refused: ``True`` is not a step count)."""
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        what = {0: "a non-negative integer", 1: "a positive integer"}.get(low, f"an integer ≥ {low}")
        raise InputError(f"{name} must be {what}, got {_short(v)}", f"pass {flag(name)} {low} or larger")
    return v


def optional_integer(name: str, v: Any, low: int = 0) -> int | None:
    return None if v is None else integer(name, v, low)


def seed(name: str, v: Any, count: int = 1, why: str = "image k uses seed + k") -> int:
    """``v`` must be a seed ≥ 0 such that ``v + count − 1`` (the last seed the command derives from it:
    ``why``) stays below 2**63, the range torch and numpy take."""
    integer(name, v, 0)
    if v + count - 1 > MAX_SEED:
        if count == 1:
            raise InputError(f"{name} {_short(v, 30)} is too large: seeds must be below 2**63",
                             f"pass {flag(name)} {MAX_SEED} or less")
        raise InputError(f"{name} {_short(v, 30)} is too large: {why}, and seed + {count - 1:,} must stay below 2**63",
                         f"pass {flag(name)} {MAX_SEED - count + 1} or less")
    return v


def image_side(name: str, v: Any) -> int | None:
    """An optional image height or width: ``None`` (the model's) or an int from 1 to MAX_IMAGE_SIDE."""
    if v is None:
        return None
    integer(name, v, 1)
    if v > MAX_IMAGE_SIDE:
        raise InputError(f"{name} {v} is larger than {MAX_IMAGE_SIDE} pixels, the largest image side supported",
                         f"pass {flag(name)} {MAX_IMAGE_SIDE} or less")
    return v


def image_count(name: str, v: Any, prompts: int = 1) -> int:
    """``v`` images for each of ``prompts`` prompts: at least one, and at most MAX_IMAGES in all (each
    image keeps a record in memory until the manifest is written)."""
    integer(name, v, 1)
    if v * prompts > MAX_IMAGES:
        total = f" × {prompts} prompts = {v * prompts:,} images" if prompts > 1 else " images"
        raise InputError(f"{flag(name)} {v:,}{total} is more than one command makes (at most {MAX_IMAGES:,})",
                         "split the work into several runs (with different --seed)")
    return v


def number(name: str, v: Any, low: float | None = None, high: float | None = None, open_low: bool = False,
           open_high: bool = False) -> float:
    """``v`` must be a finite number in the range (NaN and ±inf are refused)."""
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    ok = ok and (low is None or (v > low if open_low else v >= low))
    ok = ok and (high is None or (v < high if open_high else v <= high))
    if not ok:
        parts = []
        if low is not None:
            parts.append(f"{'>' if open_low else '≥'} {low}")
        if high is not None:
            parts.append(f"{'<' if open_high else '≤'} {high}")
        rng = " and ".join(parts)
        raise InputError(f"{name} must be a finite number{' ' + rng if rng else ''}, got {_short(v)}", f"fix {flag(name)}")
    return float(v)


def boolean(name: str, v: Any) -> bool:
    """``v`` must be a real bool: the string ``"false"`` from a config file is not false."""
    if not isinstance(v, bool):
        raise InputError(f"{name} must be true or false, got {_short(v)}", f"fix {flag(name)}")
    return v


def choice(name: str, v: Any, cls: type[E]) -> E:
    """``v`` (a member or its value) as a member of the ``str`` enum ``cls``; unknown values list the known ones."""
    try:
        return cls(v.value if isinstance(v, enum.Enum) else v)
    except ValueError:
        raise InputError(f"unknown {flag(name)} {_short(v)}", f"choose one of: {', '.join(m.value for m in cls)}") from None


def backend_choice(name: str, v: Any, known: list[str]) -> str:
    """``v`` (an enum member or a name) as one of ``known`` names (choices that a registry fills at run
    time, like the export formats); unknown values list the known ones."""
    v = v.value if isinstance(v, enum.Enum) else v
    if v not in known:
        raise InputError(f"unknown {flag(name)} {_short(v)}", f"choose one of: {', '.join(known)}")
    return v


def optional_choice(name: str, v: Any, cls: type[E]) -> E | None:
    return None if v is None else choice(name, v, cls)


def size_multiple(vae_scale_factor: int, unet_levels: int) -> int:
    """The image side a pipeline accepts must be a multiple of this: the VAE's downsampling times the
    UNet's (each of its ``unet_levels`` resolution levels but the last halves the latent)."""
    return vae_scale_factor * 2 ** (unet_levels - 1)


def image_size(name: str, v: int, multiple: int) -> int:
    """``v`` must be a positive multiple of ``multiple`` (see :func:`size_multiple`), at most
    MAX_IMAGE_SIDE."""
    if isinstance(v, bool) or not isinstance(v, int) or v < multiple or v % multiple:
        raise InputError(f"{name} {_short(v)} is not a positive multiple of {multiple} for this model",
                         f"pass {flag(name)} {max(multiple, min(MAX_IMAGE_SIDE, (v if isinstance(v, int) else 0)) // multiple * multiple)}")
    image_side(name, v)
    return v


def prompt_file(path: str | Path | None, default: list[str], what: str = "prompts") -> list[str]:
    """One prompt per non-empty line of ``path``; ``default`` when no file is given."""
    if path is None:
        return list(default)
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{what} file {p} does not exist", "pass a text file with one prompt per line")
    text = text_file(p, f"{what} file", "save it as UTF-8 text, one prompt per line")
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise InputError(f"{what} file {p} has no prompts", "put one prompt per line")
    return prompts


def text_file(path: Path, what: str, fix: str, limit: int = MAX_TEXT_BYTES) -> str:
    """The UTF-8 text of ``path`` (at most ``limit`` bytes); a binary or huge file is a one-line error."""
    size = path.stat().st_size
    if size > limit:
        raise InputError(f"{what} {path} is too large ({size:,} bytes; at most {limit:,})", fix)
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{what} {path} is not UTF-8 text (byte {e.start}: {e.reason})", fix) from e


def json_file(path: Path, what: str, fix: str, limit: int = MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH,
              error: type[Exception] = InputError) -> Any:
    """The parsed JSON of ``path``, at most ``limit`` bytes and ``max_depth`` levels deep; a huge, binary,
    malformed or too deeply nested file is a one-line ``error`` (an :class:`InputError` unless told)."""
    path = Path(path)
    size = path.stat().st_size
    if size > limit:
        raise error(f"{what} {path} is too large ({size:,} bytes; at most {limit:,})", fix)
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise error(f"{what} {path} is not UTF-8 text (byte {e.start}: {e.reason})", fix) from e
    except RecursionError as e:
        raise error(f"{what} {path} is nested too deeply to be ours (more than {max_depth} levels)", fix) from e
    except ValueError as e:
        raise error(f"{what} {path} is not valid JSON ({str(e)[:100]})", fix) from e
    if json_depth(data) > max_depth:
        raise error(f"{what} {path} is nested too deeply to be ours (more than {max_depth} levels)", fix)
    return data


def json_depth(obj: Any) -> int:
    """How many containers deep ``obj`` goes (0 for a scalar), without recursion."""
    deepest, stack = 0, [(obj, 0)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, dict):
            o = o.values()
        elif not isinstance(o, list):
            deepest = max(deepest, d)
            continue
        deepest = max(deepest, d + 1)
        stack.extend((v, d + 1) for v in o)
    return deepest


def with_article(noun: str) -> str:
    """``noun`` with its indefinite article: ``a list``, ``an AutoencoderTiny``, ``an int``."""
    return f"{'an' if str(noun)[:1].lower() in 'aeiou' else 'a'} {noun}"


def short(v: Any, limit: int = 60) -> str:
    """``repr(v)`` cut to ``limit`` characters: a bad value in an error message stays one short line."""
    r = repr(v)
    return r if len(r) <= limit else r[: limit - 1] + "…"


_short = short
