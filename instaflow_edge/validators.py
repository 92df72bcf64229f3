"""Checks of user-supplied values, one home each: integers, numbers, enum choices, image sizes and
prompt files. Every failure is an :class:`InputError` naming the option (``--max-steps``) and the fix.

Configs call these from ``__post_init__`` so a config is checked (and its choices turned into enums)
exactly once, when it is made. This module is imported by ``--help``: keep it free of heavy imports.
"""

from __future__ import annotations

import enum
import math
from pathlib import Path
from typing import Any, TypeVar

from .errors import InputError

E = TypeVar("E", bound=enum.Enum)


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


def optional_choice(name: str, v: Any, cls: type[E]) -> E | None:
    return None if v is None else choice(name, v, cls)


def size_multiple(vae_scale_factor: int, unet_levels: int) -> int:
    """The image side a pipeline accepts must be a multiple of this: the VAE's downsampling times the
    UNet's (each of its ``unet_levels`` resolution levels but the last halves the latent)."""
    return vae_scale_factor * 2 ** (unet_levels - 1)


def image_size(name: str, v: int, multiple: int) -> int:
    """``v`` must be a positive multiple of ``multiple`` (see :func:`size_multiple`)."""
    if isinstance(v, bool) or not isinstance(v, int) or v < multiple or v % multiple:
        raise InputError(f"{name} {_short(v)} is not a positive multiple of {multiple} for this model",
                         f"pass {flag(name)} {max(multiple, (v if isinstance(v, int) else 0) // multiple * multiple)}")
    return v


def prompt_file(path: str | Path | None, default: list[str], what: str = "prompts") -> list[str]:
    """One prompt per non-empty line of ``path``; ``default`` when no file is given."""
    if path is None:
        return list(default)
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{what} file {p} does not exist", "pass a text file with one prompt per line")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{what} file {p} is not UTF-8 text ({e.reason})", "save it as UTF-8") from e
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise InputError(f"{what} file {p} has no prompts", "put one prompt per line")
    return prompts


def _short(v: Any, limit: int = 60) -> str:
    """``repr(v)`` cut to ``limit`` characters: a bad value in an error message stays one short line."""
    r = repr(v)
    return r if len(r) <= limit else r[: limit - 1] + "…"
