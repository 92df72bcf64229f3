"""Peak memory of the pair trainers' data side, streamed (StreamingPairsSource) against all pairs in
memory (PairsDataset + PairsSource), for tiny pair sets of different sizes.

    python -m instaflow_edge.train.pairs_memory --sizes 1000 100000 --json docs/pairs_memory.json

Each measurement runs in a fresh child process (peak RSS is a process's high-water mark, which never
goes down): it opens the set, builds the source over the tiny preset's text encoder and draws
``steps`` global batches through the engine's sampler, as training does; the child's ``ru_maxrss`` is
the figure. The set is written first (synthetic tiny pairs, 4×8×8 latents, digits prompts) in the
reflow-data format, with the same shards and sidecars ``train reflow-data`` writes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from ..artifacts import make_manifest, write_json, write_manifest
from ..envinfo import cpu_info
from ..pipeline import load_pipeline
from ..presets import InitConfig, init
from .pairs import PairsDataset, PairShards
from .reflow import PairsSource, StreamingPairsSource
from .reflow_data import FORMAT, _write_shard, shard_paths
from .streams import EpochSampler, StepRandom

PROMPTS = [f"a handwritten {w}" for w in ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")]


def write_tiny_pairs(folder: Path, n: int, token_ids, shard_size: int = 500, latent=(4, 8, 8), seed: int = 0) -> Path:
    """A reflow-data folder of ``n`` synthetic pairs (random noise and latents, prompts cycling through
    ``token_ids`` rows), in ``train reflow-data``'s layout: shards + sidecars + manifest."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    identity = {"synthetic": True, "seed": seed, "shard_size": shard_size, "latent_shape": list(latent), "format": FORMAT}
    n_shards = -(-n // shard_size)
    for k in range(n_shards):
        start, end = k * shard_size, min(n, (k + 1) * shard_size)
        idx = torch.arange(start, end)
        tensors = {"noise": torch.randn(end - start, *latent, generator=g),
                   "latents": torch.randn(end - start, *latent, generator=g),
                   "seeds": idx.clone(), "input_ids": token_ids[idx % len(token_ids)]}
        meta = {"format": FORMAT, "count": end - start, "indices": [start, end], "seeds": idx.tolist(),
                "prompts": [PROMPTS[i % len(PROMPTS)] for i in idx.tolist()], "identity": identity}
        _write_shard(folder, k, tensors, meta)
    write_manifest(folder, make_manifest("reflow-data", None, identity=identity, num_pairs=n,
                                         shards=[shard_paths(folder, k)[0].name for k in range(n_shards)]))
    return folder


def _child(mode: str, pairs: str, model: str, steps: int, batch: int, window: int) -> dict:
    """Runs in the child: open, build, draw ``steps`` batches; report peak RSS."""
    import psutil
    import torch

    torch.set_num_threads(1)
    pipe = load_pipeline(model, device="cpu", dtype="float32")
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    now0 = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    if mode == "stream":
        source = StreamingPairsSource(PairShards(pairs), pipe, window=window)
        sampler = source.make_sampler(0)
    else:
        source = PairsSource(PairsDataset(pairs), pipe)
        sampler = EpochSampler(len(source), 0)
    for step in range(steps):
        idx = sampler.take(batch)
        source.get(idx, StepRandom(0, step, 0, batch, batch), "cpu")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    held = psutil.Process().memory_info().rss - now0  # what the data side holds at the end
    return {"mode": mode, "pairs": len(source), "steps": steps, "batch": batch,
            "peak_rss_mib": round(peak / 1024, 1), "peak_rss_before_data_mib": round(base / 1024, 1),
            "data_rss_growth_mib": round(held / 2**20, 1),
            "seconds": round(time.perf_counter() - t0, 2),
            "shards_held_peak": getattr(source, "peak_cached", None)}


def measure(sizes: list[int], work: Path, steps: int = 300, batch: int = 64, window: int = 8,
            modes=("stream", "memory")) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    model = work / "tiny"
    if not model.is_dir():
        init(InitConfig(preset="tiny", output=str(model), seed=0))
    ids = load_pipeline(model, device="cpu", dtype="float32").tokenize(PROMPTS)
    rows = []
    for n in sizes:
        folder = work / f"pairs-{n}"
        if not (folder / "manifest.json").is_file():
            write_tiny_pairs(folder, n, ids)
        for mode in modes:
            cmd = [sys.executable, "-m", "instaflow_edge.train.pairs_memory", "--child", mode, str(folder), str(model),
                   str(steps), str(batch), str(window)]
            p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            if p.returncode != 0:
                raise RuntimeError(p.stderr[-2000:])
            rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    by = {(r["mode"], r["pairs"]): r["peak_rss_mib"] for r in rows}
    lo, hi = min(sizes), max(sizes)
    ratios = {m: round(by[(m, hi)] / by[(m, lo)], 3) for m in modes if (m, hi) in by and (m, lo) in by}
    growth = {m: [r["data_rss_growth_mib"] for r in rows if r["mode"] == m] for m in modes}
    return {"what": "peak RSS of a process that loads the tiny pipeline, opens the pair set, builds the source and "
                    "draws batches as training does (ru_maxrss), and how much its RSS grew from before the set "
                    "was opened to the end (the data side's own footprint)",
            "rows": rows, f"peak_rss_ratio_{hi}_vs_{lo}": ratios, "data_rss_growth_mib": growth,
            "load_average_at_start": os.getloadavg(), "window_shards": window, "shard_size": 500,
            "latent_shape": [4, 8, 8], "machine": {"cpu": cpu_info().get("model") or platform.processor(), "cores": os.cpu_count(),
                                                   "python": platform.python_version()}}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", nargs=6, metavar=("MODE", "PAIRS", "MODEL", "STEPS", "BATCH", "WINDOW"))
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 100000])
    ap.add_argument("--work", type=Path, default=Path("runs/pairs-memory"))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--json", type=Path, default=None, help="also save the result here")
    a = ap.parse_args(argv)
    if a.child:
        mode, pairs, model, steps, batch, window = a.child
        print(json.dumps(_child(mode, pairs, model, int(steps), int(batch), int(window))))
        return
    result = measure(a.sizes, a.work, a.steps)
    print(json.dumps(result, indent=2))
    if a.json:
        write_json(a.json, result)


if __name__ == "__main__":
    main()
