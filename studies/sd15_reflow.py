"""Real scale on a CPU: `train reflow-data` + two `train reflow` steps on the sd15 preset (860 M UNet).

Runs the two CLI commands as a user would (256×256, batch 1, gradient checkpointing, SDPA attention,
bf16 autocast when the CPU has bf16 kernels), each under ``/usr/bin/time -v``, and records wall time,
peak RSS and the seconds of each optimizer step (from the engine's metrics log) to JSON.

    python -m studies.sd15_reflow --model runs/sd15 -o studies/results/sd15_reflow_cpu.json

Needs ≈ 15 GiB of RAM; make the preset first with ``instaflow-edge init sd15 runs/sd15``.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from instaflow_edge.bench.common import save_json


def _timed(cmd: list[str]) -> dict:
    r = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", r.stderr).group(1)
    parts = [float(p) for p in wall.split(":")]
    seconds = sum(p * 60 ** i for i, p in enumerate(reversed(parts)))
    cpu = re.search(r"Percent of CPU this job got: (\d+)%", r.stderr).group(1)
    return {"command": " ".join(cmd), "wall_s": round(seconds, 1), "peak_rss_gib": round(rss / 2**20, 2),
            "cpu_percent": int(cpu), "stdout_tail": r.stdout.strip().splitlines()[-1:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="runs/sd15")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("-o", "--output", default="studies/results/sd15_reflow_cpu.json")
    args = ap.parse_args()
    import torch

    from instaflow_edge.envinfo import collect

    bf16 = bool(getattr(torch.backends, "mkldnn", None)) and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    exe = [sys.executable, "-m", "instaflow_edge.cli"]
    with tempfile.TemporaryDirectory(dir=Path(args.output).parent) as tmp:
        tmp = Path(tmp)
        (tmp / "prompts.txt").write_text("a red fox in snow\na lighthouse at night\na cat wearing a hat\n")
        data = _timed([*exe, "train", "reflow-data", args.model, "--prompts", str(tmp / "prompts.txt"), "-o",
                       str(tmp / "pairs"), "--num-pairs", str(args.pairs), "--shard-size", str(args.pairs), "--steps",
                       "2", "--height", str(args.size), "--width", str(args.size), "--batch-size", "2", "--device",
                       "cpu", "--no-progress"])
        train = _timed([*exe, "train", "reflow", args.model, "--pairs", str(tmp / "pairs"), "-o", str(tmp / "rf"),
                        "--max-steps", "2", "--batch-size", "1", "--gradient-checkpointing", "--attention", "sdpa",
                        "--mixed-precision", "bf16" if bf16 else "no", "--checkpoint-every", "0", "--warmup-steps",
                        "0", "--lr-schedule", "constant", "--learning-rate", "1e-5", "--ema-decay", "0",
                        "--log-every", "1", "--cpu", "--no-progress"])
        steps = [json.loads(ln) for ln in (tmp / "rf.train" / "metrics.jsonl").read_text().splitlines()]
        step_s = [round(1.0 / s["samples_per_s"], 1) for s in steps]  # batch 1: seconds per optimizer step
        shutil.rmtree(tmp / "rf", ignore_errors=True)
    result = {"what": "sd15 preset (UNet 859,520,964 params): reflow-data then 2 reflow optimizer steps",
              "size": args.size, "batch_size": 1, "bf16_autocast": bf16, "gradient_checkpointing": True,
              "attention": "sdpa", "reflow_data": data, "reflow": train, "seconds_per_step": step_s,
              "losses": [s["loss"] for s in steps], "machine": collect()}
    save_json(args.output, result)
    print(f"reflow-data: {data['wall_s']} s, peak {data['peak_rss_gib']} GiB; reflow: {train['wall_s']} s, "
          f"peak {train['peak_rss_gib']} GiB, seconds/step {step_s} (first includes warm-up); -> {args.output}")


if __name__ == "__main__":
    main()
