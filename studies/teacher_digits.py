"""The digits teacher measured: ``init digits`` + ``train teacher`` with default settings (wall
clock, as a user runs them: two fresh CLI processes), then ``eval`` of the teacher at 1, 2, 4, 8 and 32
Euler steps × guidance 1, 2, 3, with the real-image ceiling beside it.

Run it alone on the machine (minutes of CPU)::

    python -m studies.teacher_digits \\
        --work runs/teacher_digits --json studies/results/teacher_digits.json

The JSON is rewritten after every eval, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path


def _cli(*args: str) -> float:
    """Run ``instaflow-edge ARGS`` as a fresh process; return its wall-clock seconds."""
    exe = Path(sys.executable).with_name("instaflow-edge")
    t0 = time.perf_counter()
    subprocess.run([str(exe), *args], check=True)
    return time.perf_counter() - t0


def _table(result: dict) -> str:
    rows = ["| Euler steps | guidance | prompt accuracy | digits-FID |", "|---|---|---|---|"]
    for r in result["table"]:
        rows.append(f"| {r['steps']} | {r['guidance']:g} | {r['accuracy']:.3f} | {r['fid']:.2f} |")
    c = result.get("ceiling")
    if c:
        rows.append(f"| real images (ceiling) | – | {c['accuracy']:.3f} | {c['fid']:.2f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
    from instaflow_edge.bench.common import machine, save_result

    from instaflow_edge.digits.evaluate import EvalConfig, evaluate

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="runs/teacher_digits")
    ap.add_argument("--json", default="studies/results/teacher_digits.json")
    ap.add_argument("--steps", default="32,1,2,4,8")
    ap.add_argument("--guidance", default="1,2,3")
    ap.add_argument("--num-images", type=int, default=1000)
    ap.add_argument("--skip-train", action="store_true", help="evaluate WORK/teacher as it is")
    args = ap.parse_args(argv)
    work = Path(args.work)
    base, teacher = work / "base", work / "teacher"
    result: dict = {"machine": machine()}
    out = Path(args.json)
    if not args.skip_train:
        for p in (base, teacher, Path(str(teacher) + ".train")):
            shutil.rmtree(p, ignore_errors=True)
        work.mkdir(parents=True, exist_ok=True)
        t_init = _cli("init", "digits", str(base))
        t_train = _cli("train", "teacher", str(base), "--data", "digits", "-o", str(teacher))
        result["wall_seconds"] = {"init_digits": round(t_init, 1), "train_teacher": round(t_train, 1),
                                  "total": round(t_init + t_train, 1)}
        print(f"init digits {t_init:.1f} s + train teacher {t_train:.1f} s = {t_init + t_train:.1f} s", flush=True)
    m = json.loads((teacher / "manifest.json").read_text())
    result["teacher"] = {"config": m["config"], "training": m["training"], "params": m["params"]}
    result["table"] = []

    def save() -> None:
        save_result(out, "teacher_digits", result)

    for steps in [int(s) for s in args.steps.split(",")]:
        for g in [float(x) for x in args.guidance.split(",")]:
            t0 = time.perf_counter()
            r = evaluate(EvalConfig(model=str(teacher), steps=steps, guidance=g, num_images=args.num_images,
                                    device="cpu"), progress=False)
            gen = r["generated"]
            result["table"].append({"steps": steps, "guidance": g, "accuracy": gen["accuracy"], "fid": gen["fid"],
                                    "per_digit": gen["per_digit"], "n": gen["n"],
                                    "seconds": round(time.perf_counter() - t0, 1)})
            result["ceiling"] = {"accuracy": r["real"]["accuracy"], "fid": r["real"]["fid"],
                                 **{k: r["real"][k] for k in ("fid_n", "fid_val_halves", "accuracy_source", "fid_source")
                                    if k in r["real"]}}
            result["judge"] = r["judge"]
            print(f"steps {steps} guidance {g:g}: accuracy {gen['accuracy']:.3f} FID {gen['fid']:.2f}", flush=True)
            save()
    result["table"].sort(key=lambda r: (r["steps"], r["guidance"]))
    save()
    print(_table(result))
    return result


if __name__ == "__main__":
    main()
