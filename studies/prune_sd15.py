"""prune and train decoder at SD1.5 scale (the ``sd15`` preset: random weights, so speed and memory only).

Each step runs in its own process, so its peak RSS is its own: ``prune --method blocks`` (BK-SDM small),
a two-pair reflow-data set of the sd15 model (one Euler step: only its shape matters here), a few
recovery steps of ``train distill --teacher SD15 --feature-weight 1`` on the pruned UNet (batch 1,
gradient checkpointing), and ``train decoder`` (TAESD's architecture) at its default batch size on random
512×512 images (it trains on 256² crops in micro-batches, so its memory does not grow with the batch or
the data). Reported: seconds, seconds per training step, peak RSS (against the 12 GiB a 16 GB laptop
leaves), and the counted MACs per image of the UNet and of the decoder before and after::

    python -m studies.prune_sd15 runs/sd15 --work runs/prune-sd15 \\
        --json studies/results/prune_sd15.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

_STEP = r"""
import json, resource, sys, time
t0 = time.perf_counter()
exec(sys.argv[1])
print("STEP_RESULT " + json.dumps({"seconds": round(time.perf_counter() - t0, 1),
      "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}))
"""


def _run(code: str, figures: Path | None = None) -> dict:
    """Run one step in its own process; its figures are kept in ``figures`` (beside the step's output), so
    a later run that skips the finished step still reports what it measured."""
    p = subprocess.run([sys.executable, "-c", _STEP, code], capture_output=True, text=True)
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("STEP_RESULT ")]
    if p.returncode or not line:
        raise SystemExit(f"step failed ({p.returncode}): {p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ''}")
    out = json.loads(line[-1].split(" ", 1)[1])
    if figures is not None:
        figures.write_text(json.dumps({**out, "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}) + "\n")
    return out


def main(argv: list[str] | None = None) -> dict:
    from instaflow_edge.bench.common import machine, save_result

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="the sd15 preset folder (instaflow-edge init sd15 DIR)")
    ap.add_argument("--work", default="runs/prune-sd15")
    ap.add_argument("--json", default="studies/results/prune_sd15.json")
    ap.add_argument("--recovery-steps", type=int, default=2)
    ap.add_argument("--decoder-steps", type=int, default=1)
    ap.add_argument("--decoder-batch-size", type=int, default=32, help="train decoder's default: 32")
    ap.add_argument("--decoder-images", type=int, default=4, help="random 512² training images")
    ap.add_argument("--limit-gib", type=float, default=12.0)
    args = ap.parse_args(argv)
    model, work = Path(args.model).resolve(), Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    steps: dict[str, dict] = {}

    pruned = work / "blocks-small"
    if not (pruned / "manifest.json").is_file():
        steps["prune"] = _run(figures=work / "prune.figures.json", code=f"from instaflow_edge.train.prune import PruneConfig, prune; "
                              f"prune(PruneConfig(model={str(model)!r}, output={str(pruned)!r}))")
    pairs = work / "pairs"
    if not (pairs / "manifest.json").is_file():
        (work / "prompts.txt").write_text("a red fox in snow\na lighthouse at dusk\n")
        steps["pairs"] = _run(figures=work / "pairs.figures.json", code=
            "from instaflow_edge.train.reflow_data import ReflowDataConfig, make_reflow_data; "
            f"make_reflow_data(ReflowDataConfig(teacher={str(model)!r}, output={str(pairs)!r}, "
            f"prompts={str(work / 'prompts.txt')!r}, num_pairs=2, shard_size=2, steps=1, batch_size=1, device='cpu'), "
            "progress=False)")
    rec = work / "recovered"
    if not (rec / "manifest.json").is_file():
        steps["recovery"] = _run(figures=work / "recovery.figures.json", code=
            "from instaflow_edge.train.reflow import DistillConfig, train_distill; "
            f"train_distill(DistillConfig(model={str(pruned)!r}, pairs={str(pairs)!r}, output={str(rec)!r}, "
            f"teacher={str(model)!r}, feature_weight=1.0, max_steps={args.recovery_steps}, batch_size=1, "
            "warmup_steps=1, gradient_checkpointing=True, ema_decay=0.0, checkpoint_every=0, cpu=True, "
            "progress=False, force=True))")
    images = work / "images"
    if not (images / "captions.jsonl").is_file():
        import numpy as np
        from PIL import Image

        images.mkdir(exist_ok=True)
        rng = np.random.default_rng(0)
        for i in range(args.decoder_images):
            Image.fromarray((rng.random((512, 512, 3)) * 255).astype("uint8")).save(images / f"{i}.png")
        (images / "captions.jsonl").write_text("".join(json.dumps({"file": f"{i}.png", "text": ("a red fox", "a cat")[i % 2]}) + "\n"
                                                       for i in range(args.decoder_images)))
    dec = work / "tiny-decoder"
    if not (dec / "manifest.json").is_file():
        steps["decoder"] = _run(figures=work / "decoder.figures.json", code=
            "from instaflow_edge.train.decoder import DecoderConfig, train_decoder; "
            f"train_decoder(DecoderConfig(model={str(model)!r}, output={str(dec)!r}, data={str(images)!r}, "
            f"one_step_latents=1, held_out=1, max_steps={args.decoder_steps}, batch_size={args.decoder_batch_size}, "
            "progress=False, force=True))")

    for name in ("prune", "pairs", "recovery", "decoder"):  # steps finished by an earlier run
        f = work / f"{name}.figures.json"
        if name not in steps and f.is_file():
            steps[name] = json.loads(f.read_text())
    pm = json.loads((pruned / "manifest.json").read_text())["prune"]
    rm = json.loads((rec / "manifest.json").read_text())["training"]
    dm = json.loads((dec / "manifest.json").read_text())["decoder"]
    unet_b, unet_a = pm["before"]["macs_per_image"], pm["after"]["macs_per_image"]
    dec_b, dec_a = dm["before"]["macs_per_image"], dm["after"]["macs_per_image"]
    result = {
        "machine": {**machine(), "note": "2-core machine, one heavy job at a time"},
        "model": args.model, "steps": steps, "limit_gib": args.limit_gib,
        "within_limit": {k: v["peak_rss_gib"] <= args.limit_gib for k, v in steps.items()},
        "unet": {"params_before": pm["before"]["params"], "params_after": pm["after"]["params"],
                 "macs_before": unet_b, "macs_after": unet_a, "macs_reduction": pm["macs_reduction"]},
        "recovery": {"steps": rm["steps"], "seconds": rm["seconds"], "seconds_per_step": round(rm["seconds"] / rm["steps"], 1),
                     "batch_size": 1, "gradient_checkpointing": True, "feature_weight": 1.0},
        "decoder": {"params_before": dm["before"]["params"], "params_after": dm["after"]["params"],
                    "macs_before": dec_b, "macs_after": dec_a, "macs_ratio": dm["macs_ratio"],
                    "steps": dm["steps"], "seconds_per_step": dm["seconds_per_step"],
                    "batch_size": args.decoder_batch_size, "images": args.decoder_images},
        "one_step_image_macs": {"before": unet_b + dec_b, "after": unet_a + dec_a,
                                "ratio": round((unet_b + dec_b) / (unet_a + dec_a), 2),
                                "note": "UNet + VAE decoder, counted; the text encoder (~6 GMAC) is left out of both"},
    }
    save_result(args.json, "prune_sd15", result)
    print(json.dumps({k: result[k] for k in ("steps", "unet", "recovery", "decoder", "one_step_image_macs")}, indent=1))
    return result


if __name__ == "__main__":
    t = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - t:.0f} s")
