"""Scalar logs of a training run: always ``WORK/metrics.jsonl`` (one JSON object per logged step, no
extra dependency), and accelerate's tensorboard tracker too when tensorboard is installed (it is not
a dependency of this package). Main process only.
"""

from __future__ import annotations

import json
import time
from pathlib import Path


class MetricsLog:
    def __init__(self, work: Path, accelerator, resume_step: int = 0):
        self.accelerator = accelerator
        self.path = Path(work) / "metrics.jsonl"
        self.main = accelerator.is_main_process
        self._f = None
        if not self.main:
            return
        kept = []
        if resume_step and self.path.is_file():  # drop lines past the checkpoint we resume from
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= resume_step:
                        kept.append(line)
                except json.JSONDecodeError:
                    break  # a line cut by a crash ends the usable log
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("".join(line + "\n" for line in kept))
        self._f = open(self.path, "a", buffering=1)
        if accelerator.log_with:
            accelerator.init_trackers("instaflow-edge")
        self.trackers = bool(accelerator.log_with)

    def write(self, step: int, scalars: dict[str, float | int]) -> None:
        if not self.main:
            return
        # counts (threads) stay integers; tensors and numpy scalars become floats
        rec = {"step": step, **{k: v if isinstance(v, int) else float(v) for k, v in scalars.items()},
               "time": round(time.time(), 3)}
        self._f.write(json.dumps(rec) + "\n")
        if self.trackers:
            self.accelerator.log(scalars, step=step)

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        if self.main and self.trackers:
            self.accelerator.end_training()
