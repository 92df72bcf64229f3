"""Image-to-image on the digits: which model of the recipe edits well, and how far from s = 0.

Each held-out digit image (the validation split) is edited toward another digit's prompt (source digit
d, prompt digit (d + 1 + j mod 9) mod 10) with ``generate --image``'s arithmetic: start at
s0 = 1 − strength on the straight path between the seed's noise and the image's latent, Euler steps of
strength / N. For every model and strength, the judge reports the share of edits classified as the
prompt's digit (follows the prompt), the share still classified as the source digit (keeps the image),
digits-FID against real digits, and the mean absolute pixel change from the source. The one-step
student was distilled at s = 0 only; the teacher and the 2-RF were trained on every s.

    python -m studies.img2img_digits runs/demo --json studies/results/img2img_digits.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

STRENGTHS = (0.2, 0.4, 0.6, 0.8, 1.0)
# label -> (folder under the demo output, steps; None: the model's default)
MODELS = {
    "teacher (1-RF)": ("teacher-1rf", None),
    "2-RF, 1 step": ("reflow-2rf", 1),
    "2-RF": ("reflow-2rf", None),
    "one-step student (InstaFlow)": ("instaflow", 1),
}


def main(argv: list[str] | None = None) -> dict:
    import torch

    from instaflow_edge.data import digits_dataset
    from instaflow_edge.digits.evaluate import real_ceiling, score_images
    from instaflow_edge.digits.judge import JudgeConfig, load_judge
    from instaflow_edge.data import digit_prompt
    from instaflow_edge.generator import decode_latents, encode_images, generate_latents, make_noise
    from instaflow_edge.pipeline import load_pipeline
    from instaflow_edge.bench.common import machine, save_result
    from instaflow_edge.bench.tables import img2img_markdown

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("demo", help="a `make demo` output folder (runs/demo)")
    ap.add_argument("--json", default="studies/results/img2img_digits.json")
    ap.add_argument("--strengths", default=",".join(map(str, STRENGTHS)))
    ap.add_argument("--num-images", type=int, default=500, help="edits per (model, strength); sources cycle the split")
    ap.add_argument("--batch-size", type=int, default=250)
    args = ap.parse_args(argv)
    strengths = [float(s) for s in args.strengths.split(",")]

    judge = load_judge(JudgeConfig())
    real, ref_stats = real_ceiling(judge, args.num_images)
    val = digits_dataset("validation", 0)
    n = args.num_images
    src_idx = [j % len(val) for j in range(n)]
    src_labels = [val.labels[i] for i in src_idx]
    prompt_labels = [(d + 1 + j % 9) % 10 for j, d in enumerate(src_labels)]
    prompts = [digit_prompt(p, j) for j, p in enumerate(prompt_labels)]
    rows = []
    for label, (sub, steps_opt) in MODELS.items():
        folder = Path(args.demo) / sub
        pipe = load_pipeline(folder, "cpu", "float32")
        steps = steps_opt or pipe.info.default_steps
        size = pipe.default_size
        sources = torch.stack([val[i]["image"] for i in src_idx])
        if sources.shape[-1] != size:
            sources = torch.nn.functional.interpolate(sources, size=(size, size), mode="bilinear", align_corners=False)
        shape = pipe.latent_shape(size, size)
        for strength in strengths:
            t0 = time.perf_counter()
            out = []
            for i in range(0, n, args.batch_size):
                sl = slice(i, i + args.batch_size)
                x1 = encode_images(pipe, sources[sl])
                noise = make_noise(list(range(i, min(i + args.batch_size, n))), shape)
                lat = generate_latents(pipe, prompts[sl], noise, steps, image_latents=x1, strength=strength)
                out.append(decode_latents(pipe, lat) * 2 - 1)
            images = torch.cat(out)
            s = score_images(judge, images, prompt_labels, ref_stats)
            kept = float((judge.logits(images).argmax(1).cpu() == torch.as_tensor(src_labels)).double().mean())
            row = {"model": label, "folder": sub, "steps": steps, "strength": strength,
                   "accuracy": s["accuracy"], "source_kept": round(kept, 4), "fid": s["fid"],
                   "mean_abs_change": round(float((images - sources).abs().mean() / 2), 4),
                   "seconds": round(time.perf_counter() - t0, 1)}
            rows.append(row)
            print(f"{label:30s} S={strength:.1f} steps={steps:2d}  prompt acc {row['accuracy']:.3f}  source kept "
                  f"{row['source_kept']:.3f}  FID {row['fid']:7.2f}  change {row['mean_abs_change']:.3f}", flush=True)
    result = {"machine": machine(), "demo": args.demo, "num_images": n, "rows": rows,
              "ceiling": {"accuracy": real["accuracy"], "fid": real["fid"]},
              "sources": "digits validation split (held out), cycled; prompt digit (d + 1 + j mod 9) mod 10"}
    saved = save_result(args.json, "img2img_digits", result)
    print(img2img_markdown(json.loads(Path(saved).read_text())))
    return result


if __name__ == "__main__":
    main()
