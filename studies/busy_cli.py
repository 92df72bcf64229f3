"""``init digits`` and ``train reflow-data`` on a quiet and on a busy CPU: fixed threads vs ``--threads auto``.

    python -m studies.busy_cli TEACHER [--rounds 1] [--pairs 512] [-o studies/results/busy_cli.json]

TEACHER is a digits pipeline (``instaflow-edge init digits TEACHER``; an untrained one is enough: the
figure is the sampler's speed). Each command runs as a whole process, timed from outside (wall seconds),
with ``--threads N`` (every core, fixed: torch's default) and ``--threads auto`` (the governor of
``instaflow_edge/threads.py``), on the quiet machine and beside one busy core (a spinning Python process,
as another program would be). Rounds alternate the order of policies and conditions. The result: seconds
per command, policy and condition (median over rounds), each policy's busy/quiet slow-down, and auto's
quiet time over the fixed count's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from instaflow_edge.bench.common import machine, save_result

from .threads import BUSY_LOOP

CORES = str(os.cpu_count() or 1)
POLICIES = {f"fixed {CORES} threads": CORES, "auto": "auto"}


def commands(teacher: str, pairs: int, out: Path) -> dict[str, list[str]]:
    cli = [sys.executable, "-m", "instaflow_edge.cli"]
    return {
        "init digits": [*cli, "init", "digits", str(out / "base"), "--force", "--no-progress"],
        "train reflow-data": [*cli, "train", "reflow-data", teacher, "--data", "digits", "--num-pairs", str(pairs),
                              "--shard-size", str(pairs), "--steps", "8", "--batch-size", "64", "--device", "cpu",
                              "-o", str(out / "pairs"), "--force", "--no-progress"],
    }


def run_once(argv: list[str], threads: str, busy: bool) -> float:
    spinner = subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) if busy else None
    try:
        if spinner is not None:
            time.sleep(0.5)  # let it take its core
        t = time.perf_counter()
        r = subprocess.run([*argv, "--threads", threads], capture_output=True, text=True)
        seconds = time.perf_counter() - t
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[3:5])} --threads {threads} failed: {r.stderr.strip().splitlines()[-1:]}")
    return seconds


def bench(teacher: str, rounds: int, pairs: int, only: list[str] | None) -> dict:
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="instaflow-busy-") as d:
        cmds = commands(teacher, pairs, Path(d))
        for name, argv in cmds.items():
            if only and name not in only:
                continue
            runs = {p: {"quiet": [], "busy": []} for p in POLICIES}
            for r in range(rounds):
                order = list(POLICIES) if r % 2 == 0 else list(POLICIES)[::-1]
                for p in order:
                    for cond in (("quiet", "busy") if r % 2 == 0 else ("busy", "quiet")):
                        s = run_once(argv, POLICIES[p], cond == "busy")
                        runs[p][cond].append(round(s, 2))
                        print(f"{name:18s} round {r + 1}/{rounds}  {p:16s} {cond:5s} {s:7.1f} s", file=sys.stderr, flush=True)
            med = {p: {c: statistics.median(v) for c, v in runs[p].items()} for p in POLICIES}
            fixed = next(iter(POLICIES))
            results[name] = {p: {"quiet_s": round(med[p]["quiet"], 2), "busy_s": round(med[p]["busy"], 2),
                                 "busy_slowdown": round(med[p]["busy"] / med[p]["quiet"], 2),
                                 "quiet_vs_fixed": round(med[p]["quiet"] / med[fixed]["quiet"], 3), "runs": runs[p]}
                             for p in POLICIES}
    return {"machine": machine(), "cpu_count": os.cpu_count(), "teacher": teacher, "rounds": rounds, "pairs": pairs,
            "busy": "one spinning Python process", "policies": POLICIES, "results": results}


def markdown(result: dict) -> str:
    out = ["| command | threads | quiet s | busy s | busy slow-down | quiet × fixed |", "|---|---|---:|---:|---:|---:|"]
    for name, rows in result["results"].items():
        for p, r in rows.items():
            out.append(f"| {name} | {p} | {r['quiet_s']:.1f} | {r['busy_s']:.1f} | {r['busy_slowdown']:.2f}× | {r['quiet_vs_fixed']:.2f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("teacher", help="a digits pipeline (instaflow-edge init digits TEACHER)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--pairs", type=int, default=512, help="reflow-data: pairs to make")
    ap.add_argument("--only", action="append", choices=["init digits", "train reflow-data"], help="repeatable (default: both)")
    ap.add_argument("-o", "--output", type=Path, default=None)
    a = ap.parse_args(argv)
    if not (Path(a.teacher) / "model_index.json").is_file():
        ap.error(f"{a.teacher} is not a pipeline folder: make one with `instaflow-edge init digits {a.teacher}`")
    try:
        result = bench(a.teacher, a.rounds, a.pairs, a.only)
    except RuntimeError as e:
        ap.exit(2, f"error: {e}\n")
    print(markdown(result))
    if a.output:
        save_result(a.output, "busy_cli", result)
    return result


if __name__ == "__main__":
    main()
