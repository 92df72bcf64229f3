"""When does distilling *after* reflow beat distilling the 1-RF directly?

From a finished ``instaflow-edge demo`` folder (its ``teacher-1rf``, ``reflow-2rf``, ``pairs-1rf`` and
``pairs-2rf``), train one-step students under several conditions — the number of pairs (a prefix of
each pair set: ``--max-pairs``), the number of distillation steps, and the training seed — from both
sources:

* ``direct``: ``train distill teacher-1rf --pairs pairs-1rf`` (the 1-RF's own couplings);
* ``instaflow``: ``train distill reflow-2rf --pairs pairs-2rf`` (InstaFlow: reflow first);

and score each with the same ``eval`` (one step, fixed prompts and seeds). The report gives, per
condition, the mean ± standard deviation over training seeds of prompt accuracy and digits-FID for each
source, and the FID difference with its spread. Every run is kept (``WORK/runs/<id>/``, with its eval
JSON), so an interrupted study resumes where it stopped, and two processes with different ``--seeds``
can share one WORK folder (use ``OMP_NUM_THREADS=1`` each on a 2-core machine)::

    python -m studies.distill_study runs/demo --work runs/distill_study \\
        --json studies/results/distill_study.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

SOURCES = {"direct": ("teacher-1rf", "pairs-1rf"), "instaflow": ("reflow-2rf", "pairs-2rf")}


def _conditions(text: str) -> list[tuple[int, int]]:
    """"3000x400,500x400" → [(pairs, distill steps), ...]"""
    out = []
    for part in text.split(","):
        n, s = part.lower().split("x")
        out.append((int(n), int(s)))
    return out


def warmup_steps(steps: int) -> int:
    """The engine's default 50-step LR warm-up; budgets under 60 steps warm up over a fifth of themselves
    (else the LR would never reach its peak)."""
    return 50 if steps >= 60 else max(1, steps // 5)


def run_one(demo: Path, work: Path, source: str, pairs: int, steps: int, seed: int, num_images: int,
            batch_size: int, learning_rate: float) -> dict:
    """Distil one student (or reuse a finished one) and evaluate it at one step."""
    from instaflow_edge.bench.common import save_json
    from instaflow_edge.train.reflow import DistillConfig, train_distill

    from instaflow_edge.digits.evaluate import EvalConfig, evaluate

    model, pair_dir = SOURCES[source]
    run = work / "runs" / f"{source}-n{pairs}-s{steps}-seed{seed}"
    result_path = run / "eval.json"
    if result_path.is_file():
        return json.loads(result_path.read_text())
    run.mkdir(parents=True, exist_ok=True)
    student = run / "student"
    t0 = time.perf_counter()
    warmup = warmup_steps(steps)
    if not (student / "manifest.json").is_file():
        train_distill(DistillConfig(model=str(demo / model), pairs=str(demo / pair_dir), output=str(student),
                                    max_pairs=pairs, max_steps=steps, batch_size=batch_size, warmup_steps=warmup,
                                    learning_rate=learning_rate, seed=seed, cpu=True, checkpoint_every=200,
                                    resume="latest", progress=False))
    t_train = time.perf_counter() - t0
    r = evaluate(EvalConfig(model=str(student), steps=1, num_images=num_images, device="cpu"), progress=False)
    out = {"source": source, "pairs": pairs, "distill_steps": steps, "warmup_steps": warmup, "seed": seed,
           "accuracy": r["generated"]["accuracy"], "fid": r["generated"]["fid"],
           "train_seconds": round(t_train, 1), "ceiling_fid": r["real"]["fid"]}
    save_json(result_path, out)
    return out


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else float("nan"))


def summarize(runs: list[dict]) -> list[dict]:
    """Per condition: mean ± sd over seeds for each source, and the paired FID difference."""
    rows = []
    for n, s in sorted({(r["pairs"], r["distill_steps"]) for r in runs}, key=lambda c: (-c[0], -c[1])):
        by = {src: {r["seed"]: r for r in runs if (r["pairs"], r["distill_steps"], r["source"]) == (n, s, src)}
              for src in SOURCES}
        seeds = sorted(set(by["direct"]) & set(by["instaflow"]))
        if not seeds:
            continue
        row: dict = {"pairs": n, "distill_steps": s, "seeds": seeds}
        for src in SOURCES:
            for key in ("accuracy", "fid"):
                m, sd = _mean_sd([by[src][k][key] for k in seeds])
                row[f"{src}_{key}"], row[f"{src}_{key}_sd"] = round(m, 4), round(sd, 4)
        m, sd = _mean_sd([by["direct"][k]["fid"] - by["instaflow"][k]["fid"] for k in seeds])
        row["fid_gain"], row["fid_gain_sd"] = round(m, 3), round(sd, 3)  # > 0: reflow-first is better
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| pairs | distill steps | seeds | 1-RF + distill: acc | FID | 2-RF + distill (InstaFlow): acc | FID | "
             "FID gain of reflow-first |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['pairs']} | {r['distill_steps']} | {len(r['seeds'])} | "
            f"{r['direct_accuracy']:.3f} ± {r['direct_accuracy_sd']:.3f} | {r['direct_fid']:.2f} ± {r['direct_fid_sd']:.2f} | "
            f"{r['instaflow_accuracy']:.3f} ± {r['instaflow_accuracy_sd']:.3f} | "
            f"{r['instaflow_fid']:.2f} ± {r['instaflow_fid_sd']:.2f} | {r['fid_gain']:+.2f} ± {r['fid_gain_sd']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    from instaflow_edge.bench.common import machine, save_result
    from tqdm.auto import tqdm

    from instaflow_edge.errors import InputError

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("demo", help="a finished `instaflow-edge demo` output folder")
    ap.add_argument("--work", default="runs/distill_study")
    ap.add_argument("--json", default="studies/results/distill_study.json")
    ap.add_argument("--conditions", default="3000x300,500x300,3000x60,500x60,3000x20,500x20,3000x5",
                    help="PAIRSxSTEPS,… : pairs used (a prefix of each set) × distillation steps")
    ap.add_argument("--seeds", default="0,1,2", help="training seeds (the eval's seeds never change)")
    ap.add_argument("--num-images", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--learning-rate", type=float, default=1e-3)
    args = ap.parse_args(argv)
    demo, work = Path(args.demo), Path(args.work)
    for model, pair_dir in SOURCES.values():
        for name in (model, pair_dir):
            if not (demo / name / "manifest.json").is_file():
                raise SystemExit(str(InputError(f"{demo / name} is missing", "run `instaflow-edge demo -o DEMO` first")))
    try:
        conditions, seeds = _conditions(args.conditions), [int(x) for x in args.seeds.split(",")]
    except ValueError:
        ap.error(f"--conditions takes PAIRSxSTEPS,… and --seeds integers, got {args.conditions!r} / {args.seeds!r}")
    jobs = [(src, n, s, seed) for n, s in conditions for seed in seeds for src in SOURCES]
    for src, n, s, seed in tqdm(jobs, desc="distill study", unit="student"):
        r = run_one(demo, work, src, n, s, seed, args.num_images, args.batch_size, args.learning_rate)
        tqdm.write(f"{src:9s} pairs {n:5d} steps {s:4d} seed {seed}: accuracy {r['accuracy']:.3f} FID {r['fid']:.2f}")
    runs = [json.loads(p.read_text()) for p in sorted((work / "runs").glob("*/eval.json"))]
    rows = summarize(runs)
    demo_results = demo / "results.json"
    result = {"machine": machine(),
              "demo": str(demo), "demo_settings": json.loads(demo_results.read_text())["settings"] if demo_results.is_file() else None,
              "num_images": args.num_images, "batch_size": args.batch_size, "learning_rate": args.learning_rate,
              "rows": rows, "runs": runs}
    save_result(args.json, "distill_study", result)
    print(markdown(rows))
    return result


if __name__ == "__main__":
    main()
