"""Pruning and the tiny decoder on the digits one-step student: params, counted MACs, quality.

From a folder holding the digits one-step student (``instaflow``) and the pairs it was distilled on
(``pairs-2rf``) — an ``instaflow-edge demo`` output — this study:

1. evaluates the unpruned student (one step, the fixed eval: ``num_images`` images, prompt accuracy and
   digits-FID);
2. prunes it (``prune``: blocks ``mid`` — the digits UNet has one pair per stage, so the mid-block is the
   one BK-SDM removal it can take —, channels, and blocks then channels) and evaluates each before recovery;
3. recovers each with ``train distill --teacher STUDENT`` on the student's pairs (the demo's distill
   settings), the feature loss off and — where the widths match (block pruning) — on, for each training
   seed, and evaluates each;
4. distils a tiny decoder (``train decoder``) from the student, and from the recovered pruned student,
   and evaluates each.

Every run is kept under WORK (its pipeline and eval JSON), so an interrupted study resumes::

    python -m studies.prune_digits runs/prune-full --work runs/prune-full/study \\
        --json studies/results/prune_digits.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def _done(folder: Path) -> bool:
    return (folder / "manifest.json").is_file()


def _eval(model: Path, num_images: int, path: Path) -> dict:
    from instaflow_edge.bench.common import save_json
    from instaflow_edge.digits.evaluate import EvalConfig, evaluate

    if path.is_file():
        return json.loads(path.read_text())
    t0 = time.perf_counter()
    r = evaluate(EvalConfig(model=str(model), steps=1, num_images=num_images, device="cpu"), progress=False)
    out = {"accuracy": r["generated"]["accuracy"], "fid": r["generated"]["fid"], "ceiling_fid": r["real"]["fid"],
           "ceiling_accuracy": r["real"]["accuracy"], "num_images": num_images,
           "eval_seconds": round(time.perf_counter() - t0, 1)}
    save_json(path, out)
    return out


def _sizes(model: Path) -> dict:
    """UNet and decoder params and counted MACs per image of a pipeline folder."""
    from instaflow_edge.pipeline import load_pipeline
    from instaflow_edge.presets import count_params
    from instaflow_edge.train.macs import decoder_macs, unet_macs

    pipe = load_pipeline(model)
    shape = pipe.latent_shape(pipe.default_size, pipe.default_size)
    dec = pipe.vae.decoder
    extra = getattr(pipe.vae, "post_quant_conv", None)
    return {"unet_params": count_params(pipe.unet), "unet_macs": unet_macs(pipe.unet, shape, pipe.tokenizer.model_max_length),
            "decoder_params": count_params(dec) + (count_params(extra) if extra is not None else 0),
            "decoder_macs": decoder_macs(pipe.vae, shape), "vae": type(pipe.vae).__name__}


def main(argv: list[str] | None = None) -> dict:
    from instaflow_edge.bench.common import machine, save_result
    from instaflow_edge.digits.demo import PROFILES
    from instaflow_edge.train.decoder import DecoderConfig, train_decoder
    from instaflow_edge.train.prune import PruneConfig, prune
    from instaflow_edge.train.reflow import DistillConfig, train_distill

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("demo", help="a folder with the student (instaflow) and its pairs (pairs-2rf)")
    ap.add_argument("--work", default="runs/prune_digits")
    ap.add_argument("--json", default="studies/results/prune_digits.json")
    ap.add_argument("--seeds", default="0", help="training seeds of the recovery runs")
    ap.add_argument("--num-images", type=int, default=1000)
    ap.add_argument("--ratio", type=float, default=0.5, help="--method channels ratio")
    ap.add_argument("--decoder-channels", default="8,8,8")
    ap.add_argument("--decoder-blocks", default="1,1,1")
    ap.add_argument("--decoder-steps", type=int, default=1500)
    ap.add_argument("--recovery-steps", type=int, default=None, help="default: the full demo's distill steps")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the full demo's stage batch")
    ap.add_argument("--skip", default="", help="comma-separated row groups to skip: channels, feature, decoder, pruned-decoder")
    args = ap.parse_args(argv)
    demo, work = Path(args.demo), Path(args.work)
    student, pairs = demo / "instaflow", demo / "pairs-2rf"
    seeds = [int(s) for s in args.seeds.split(",")]
    skip = set(filter(None, args.skip.split(",")))
    P = PROFILES["full"]
    rec_steps = args.recovery_steps or P.distill_steps
    batch = args.batch_size or P.stage_batch
    t_all = time.perf_counter()
    rows: list[dict] = []

    def save(complete: bool) -> dict:
        result = {"machine": {**machine(), "note": "2-core machine shared with other jobs; heavy steps run one at a "
                              "time"},
                  "source": str(demo), "num_images": args.num_images, "steps": 1, "seeds": seeds,
                  "recovery": {"steps": rec_steps, "batch_size": batch, "learning_rate": P.learning_rate,
                               "teacher": str(student), "pairs": str(pairs)},
                  "targets": {"unet_macs_reduction": 0.35, "decoder_macs_ratio": 10, "fid_ratio_max": 1.15,
                              "accuracy_min": 0.95},
                  "complete": complete, "rows": rows, "summary": _summary(rows, rows[0], seeds),
                  "total_seconds": round(time.perf_counter() - t_all, 1)}
        save_result(args.json, "prune_digits", result)  # after every row: an interrupted study keeps its figures
        return result

    def row(name: str, model: Path, **extra) -> dict:
        ev = _eval(model, args.num_images, work / "evals" / f"{model.name}-{args.num_images}.json")
        r = {"name": name, "model": str(model), **_sizes(model), **ev, **extra}
        rows.append(r)
        print(f"[prune_digits] {name}: acc {r['accuracy']:.3f} FID {r['fid']:.2f} UNet MACs {r['unet_macs']:,} "
              f"decoder MACs {r['decoder_macs']:,}", flush=True)
        save(False)
        return r

    def pruned(name: str, src: Path, **kw) -> Path:
        out = work / name
        if not _done(out):
            prune(PruneConfig(model=str(src), output=str(out), **kw))
        row(f"{name}, before recovery", out, pruned=name, recovery=None)
        return out

    def recover(name: str, w: float, seed: int) -> Path:
        out = work / f"{name}-rec-f{w:g}-seed{seed}"
        t0 = time.perf_counter()
        if not _done(out):
            train_distill(DistillConfig(
                model=str(work / name), pairs=str(pairs), output=str(out), teacher=str(student), feature_weight=w,
                max_steps=rec_steps, batch_size=batch, learning_rate=P.learning_rate, seed=seed,
                cpu=True, checkpoint_every=100, resume="latest", progress=False))
        secs = json.loads((out / "manifest.json").read_text())["training"]["seconds"]
        row(f"{name}, recovered (feature loss {'on' if w else 'off'}), seed {seed}", out, pruned=name,
            recovery={"feature_weight": w, "seed": seed, "steps": rec_steps, "seconds": secs,
                      "wall_seconds_this_run": round(time.perf_counter() - t0, 1)})
        return out

    def decoder(name: str, src: Path, out: Path, seed: int = 0) -> None:
        if not _done(out):
            train_decoder(DecoderConfig(model=str(src), output=str(out), channels=args.decoder_channels,
                                        blocks=args.decoder_blocks, max_steps=args.decoder_steps, seed=seed,
                                        progress=False))
        d = json.loads((out / "manifest.json").read_text())["decoder"]
        row(name, out, decoder={k: d[k] for k in ("config", "held_out_psnr_db", "steps", "seconds", "macs_ratio")})

    # the headline rows first (a study cut short keeps them), then the comparisons
    row("student (unpruned, full decoder)", student)
    both = f"blocks-mid+channels-{args.ratio:g}"
    pruned("blocks-mid", student, method="blocks", variant="mid")
    if "channels" not in skip:
        pruned(both, work / "blocks-mid", method="channels", ratio=args.ratio)
        rec_both = recover(both, 0.0, seeds[0])
    if "decoder" not in skip:
        decoder("student + tiny decoder", student, work / "student-tiny-decoder")
    recover("blocks-mid", 0.0, seeds[0])
    if "feature" not in skip:
        recover("blocks-mid", 1.0, seeds[0])
    if "channels" not in skip:
        pruned(f"channels-{args.ratio:g}", student, method="channels", ratio=args.ratio)
        recover(f"channels-{args.ratio:g}", 0.0, seeds[0])
        if "pruned-decoder" not in skip:
            decoder(f"{both} recovered + tiny decoder", rec_both, work / f"{both}-rec-tiny-decoder")
        for seed in seeds[1:]:  # more training seeds for the headline pruned student
            recover(both, 0.0, seed)
    if "decoder" not in skip:
        for seed in seeds[1:]:
            decoder(f"student + tiny decoder, seed {seed}", student, work / f"student-tiny-decoder-seed{seed}", seed)
    result = save(True)
    print(markdown(result))
    return result


def _summary(rows: list[dict], base: dict, seeds: list[int]) -> list[dict]:
    """Per model kind (seeds pooled): mean ± sd of accuracy and FID, MACs vs the unpruned student."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        key = r["name"].split(", seed")[0]
        groups.setdefault(key, []).append(r)
    out = []
    for key, rs in groups.items():
        acc, fid = [r["accuracy"] for r in rs], [r["fid"] for r in rs]
        out.append({"name": key, "n": len(rs), "accuracy": round(statistics.fmean(acc), 4),
                    "accuracy_sd": round(statistics.stdev(acc), 4) if len(rs) > 1 else None,
                    "fid": round(statistics.fmean(fid), 3), "fid_sd": round(statistics.stdev(fid), 3) if len(rs) > 1 else None,
                    "fid_ratio": round(statistics.fmean(fid) / base["fid"], 3),
                    "unet_macs_reduction": round(1 - rs[0]["unet_macs"] / base["unet_macs"], 4),
                    "decoder_macs_ratio": round(base["decoder_macs"] / rs[0]["decoder_macs"], 2),
                    "unet_params": rs[0]["unet_params"], "unet_macs": rs[0]["unet_macs"],
                    "decoder_params": rs[0]["decoder_params"], "decoder_macs": rs[0]["decoder_macs"]})
    return out


def markdown(result: dict) -> str:
    lines = ["| model | n | UNet params | UNet MACs | fewer UNet MACs | decoder MACs | decoder ×fewer | prompt accuracy | digits-FID | FID / unpruned |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["summary"]:
        sd = lambda v: "" if v is None else f" ± {v:.3f}"  # noqa: E731
        lines.append(f"| {r['name']} | {r['n']} | {r['unet_params']:,} | {r['unet_macs'] / 1e6:.1f} M | "
                     f"{100 * r['unet_macs_reduction']:.1f}% | {r['decoder_macs'] / 1e6:.2f} M | {r['decoder_macs_ratio']:g}× | "
                     f"{r['accuracy']:.3f}{sd(r['accuracy_sd'])} | {r['fid']:.2f}{sd(r['fid_sd'])} | {r['fid_ratio']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
