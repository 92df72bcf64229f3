"""Training throughput on a quiet and on a busy CPU, for several thread policies.

    python -m studies.threads BASE [--steps 60] [--rounds 2] [--policy NAME ...] \
        [-o threads-cpu.json]

BASE is a digits base pipeline (``instaflow-edge init digits BASE``). For every policy, ``train
teacher`` runs ``--steps`` steps in a fresh process (OpenMP reads its settings when torch loads) twice:
on the quiet machine, and beside one busy core (a pure-Python spin loop pinned to nothing, as another
program would be). "torch default" fixes one thread per core (``--threads N``), "auto" is ``train``'s
default (the count follows the other processes' CPU use). Steps/s come from the run's own ``metrics.jsonl`` (one record per step), after
the first ``--skip`` steps (warm-up). Rounds interleave the policies and both conditions, so a slow
phase of the machine hits all of them. The result: steps/s per policy and condition (median over
rounds), and each policy's busy/quiet slow-down and its quiet speed relative to torch's default.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from instaflow_edge.bench.common import machine, save_result

# name -> the environment of the training process (None: unset, so the library default applies).
# "auto" is the default of `train` (instaflow_edge/threads.py); the others fix the count at start.
_CORES = str(os.cpu_count() or 1)
POLICIES: dict[str, dict[str, str | None]] = {
    "torch default": {"INSTAFLOW_EDGE_THREADS": _CORES, "OMP_NUM_THREADS": None, "OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": None},
    "auto (default)": {"INSTAFLOW_EDGE_THREADS": "auto", "OMP_NUM_THREADS": None, "OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": None},
    "1 thread": {"INSTAFLOW_EDGE_THREADS": "1", "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": None},
    "passive wait": {"INSTAFLOW_EDGE_THREADS": _CORES, "OMP_NUM_THREADS": None, "OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": None},
    "short spin (10k)": {"INSTAFLOW_EDGE_THREADS": _CORES, "OMP_NUM_THREADS": None, "OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": "10000"},
}

BUSY_LOOP = "import time\nt = time.time()\nwhile True:\n    pass\n"


def _env(policy: dict[str, str | None]) -> dict[str, str]:
    env = dict(os.environ)
    for k, v in policy.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


def run_once(base: str, policy: str, steps: int, skip: int, busy: bool, work: Path) -> float:
    """Steps/s of one ``train teacher`` run (after ``skip`` warm-up steps)."""
    out = work / f"run-{time.monotonic_ns()}"
    cmd = [sys.executable, "-m", "instaflow_edge.cli", "train", "teacher", base, "--data", "digits", "-o", str(out),
           "--max-steps", str(steps), "--log-every", "1", "--checkpoint-every", "0", "--warmup-steps", "0",
           "--no-progress"]
    spinner = subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) if busy else None
    try:
        if spinner is not None:
            time.sleep(0.5)  # let it take its core
        r = subprocess.run(cmd, env=_env(POLICIES[policy]), capture_output=True, text=True)
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()
    if r.returncode != 0:
        raise RuntimeError(f"{policy}: train teacher failed: {r.stderr.strip().splitlines()[-1:]}")
    recs = [json.loads(line) for line in (Path(str(out) + ".train") / "metrics.jsonl").read_text().splitlines()]
    t = {rec["step"]: rec["time"] for rec in recs}
    first, last = skip, max(t)
    return (last - first) / (t[last] - t[first])


def bench(base: str, policies: list[str], steps: int, skip: int, rounds: int) -> dict:
    runs: dict[str, dict[str, list[float]]] = {p: {"quiet": [], "busy": []} for p in policies}
    with tempfile.TemporaryDirectory(prefix="instaflow-threads-") as d:
        for r in range(rounds):
            order = policies[r % len(policies):] + policies[:r % len(policies)]
            for p in order:
                for cond in (("quiet", "busy") if r % 2 == 0 else ("busy", "quiet")):
                    sps = run_once(base, p, steps, skip, cond == "busy", Path(d))
                    runs[p][cond].append(sps)
                    print(f"round {r + 1}/{rounds}  {p:24s} {cond:5s} {sps:6.2f} steps/s", file=sys.stderr, flush=True)
    table = {}
    ref = statistics.median(runs[policies[0]]["quiet"])
    for p in policies:
        q, b = statistics.median(runs[p]["quiet"]), statistics.median(runs[p]["busy"])
        table[p] = {"quiet_steps_per_s": round(q, 3), "busy_steps_per_s": round(b, 3),
                    "busy_slowdown": round(q / b, 2), "quiet_vs_first_policy": round(q / ref, 3),
                    "runs": runs[p]}
    return {"machine": machine(), "cpu_count": os.cpu_count(), "base": base, "steps": steps, "skip": skip,
            "rounds": rounds, "busy": "one spinning Python process", "policies": {p: POLICIES[p] for p in policies},
            "results": table}


def markdown(result: dict) -> str:
    out = ["| policy | quiet steps/s | busy steps/s | busy slow-down | quiet vs " + next(iter(result["results"])) + " |",
           "|---|---:|---:|---:|---:|"]
    for p, r in result["results"].items():
        out.append(f"| {p} | {r['quiet_steps_per_s']:.2f} | {r['busy_steps_per_s']:.2f} | {r['busy_slowdown']:.2f}× | "
                   f"{r['quiet_vs_first_policy']:.2f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base", help="a digits base pipeline (instaflow-edge init digits BASE)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--skip", type=int, default=10, help="warm-up steps left out of the rate")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--policy", action="append", choices=list(POLICIES), help="repeatable (default: all)")
    ap.add_argument("-o", "--output", type=Path, default=None)
    a = ap.parse_args(argv)
    if a.steps <= a.skip + 1:
        ap.error("--steps must exceed --skip + 1")
    if not (Path(a.base) / "model_index.json").is_file():
        ap.error(f"{a.base} is not a pipeline folder: make one with `instaflow-edge init digits {a.base}`")
    try:
        result = bench(a.base, a.policy or list(POLICIES), a.steps, a.skip, a.rounds)
    except RuntimeError as e:  # a training run failed: its last error line says why
        ap.exit(2, f"error: {e}\n")
    print(markdown(result))
    if a.output:
        save_result(a.output, "threads", result)
    return result


if __name__ == "__main__":
    main()
