"""``report --bench FILE``: a bench result read once, bounded and checked field by field before any work.

A bench JSON may come from someone else: it is at most ``MAX_BYTES`` and ``MAX_DEPTH`` levels deep, and
every field the report reads has the type ``instaflow-edge bench`` writes (a number where a number
belongs, a string where a string does). Anything else is a one-line error naming the field, so nothing
unexpected reaches the page (and the page escapes what does).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..validators import json_file, short

MAX_BYTES = 8 * 2**20  # a bench result of 50 runtimes is ~100 kB
MAX_DEPTH = 16
MAX_RESULTS = 500
FIX = "pass a JSON file written by `instaflow-edge bench`"
STAGES = ("text_encoder", "unet", "vae_decoder", "end_to_end", "generator")
STAGE_NUMBERS = ("median_s", "p90_s", "pct_of_peak")


def _number(v: Any) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v))


def _count(v: Any) -> bool:
    return v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 0)


def _text(v: Any) -> bool:
    return v is None or (isinstance(v, str) and len(v) <= 2000)


def _flag(v: Any) -> bool:
    return v is None or isinstance(v, bool)


def _object(v: Any) -> bool:
    return v is None or isinstance(v, dict)


_WANT = {_number: "a finite number", _count: "a non-negative integer", _text: "a string (≤ 2000 characters)",
         _flag: "true or false", _object: "an object"}
TOP = {"kind": _text, "device": _text, "created": _text, "note": _text, "threads": _count, "repeats": _count,
       "interleaved": _flag, "cpu_cores": _count, "gpu": _object, "machine": _object, "memory": _object,
       "skipped": _object}


def read_bench(path: str | Path) -> dict:
    """The checked bench result at ``path``."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"--bench {path}: no such file", FIX)
    data = json_file(p, "--bench", FIX, limit=MAX_BYTES, max_depth=MAX_DEPTH)

    def need(ok: bool, where: str, value: Any, want: str) -> None:
        if not ok:
            raise InputError(f"--bench {path}: {where} is {short(value, 40)}, not {want}", FIX)

    need(isinstance(data, dict), "the file", type(data).__name__, "an object")
    need(data.get("kind") in ("bench", None), "'kind'", data.get("kind"), "'bench'")
    res = data.get("results")
    if not isinstance(res, dict):
        raise InputError(f"--bench {path} is not a bench result (no 'results')", FIX)
    need(len(res) <= MAX_RESULTS, "'results'", f"{len(res)} entries", f"at most {MAX_RESULTS}")
    for key, check in TOP.items():
        need(check(data.get(key)), f"'{key}'", data.get(key), _WANT[check])
    for name, r in res.items():
        need(len(name) <= 200, "a result name", name, "a name of at most 200 characters")
        need(isinstance(r, dict), f"results[{short(name, 40)}]", r, "an object")
        for stage in STAGES:
            s = r.get(stage)
            need(_object(s), f"results[{short(name, 40)}].{stage}", s, "an object")
            for k, v in (s or {}).items():
                if k in STAGE_NUMBERS or (k.startswith("speedup_vs_") and not k.endswith("_range")):
                    need(_number(v), f"results[{short(name, 40)}].{stage}.{k}", v, "a finite number")
    for name, m in (data.get("memory") or {}).items():
        need(isinstance(m, dict), f"memory[{short(name, 40)}]", m, "an object")
        need(_number(m.get("peak_rss_mib")), f"memory[{short(name, 40)}].peak_rss_mib", m.get("peak_rss_mib"), "a finite number")
    for name, why in (data.get("skipped") or {}).items():
        need(_text(why) and why is not None, f"skipped[{short(name, 40)}]", why, "a string")
    gpu = data.get("gpu") or {}
    need(_text(gpu.get("name")), "gpu.name", gpu.get("name"), "a string")
    cpu = (data.get("machine") or {}).get("cpu")
    need(_object(cpu), "machine.cpu", cpu, "an object")
    need(_count((cpu or {}).get("logical_cores")), "machine.cpu.logical_cores", (cpu or {}).get("logical_cores"), "a non-negative integer")
    return data
