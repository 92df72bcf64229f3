"""What each Core ML compression scheme does to a trained one-step digits model, by the digits eval.

For the model as it is (fp32) and for every scheme of ``convert --target coreml --compress`` (applied in
PyTorch exactly as the converter ships it: ``eval --coreml-compress``), prompt accuracy and digits-FID
at one step over the same fixed prompts and seeds; the same images' PSNR against the fp32 model's images
says how far each scheme moves the output. Core ML cannot run here (Linux), so these are the PyTorch
figures of the compressed weights — what the package holds, decompressed — not Core ML's own runtime.

    python -m studies.coreml_digits_eval runs/demo/instaflow \\
        --json studies/results/coreml_digits_eval.json
"""

from __future__ import annotations

import argparse
import time


def main(argv: list[str] | None = None) -> dict:
    from instaflow_edge.quantize.coreml import SCHEMES, PyTorchCompression

    from instaflow_edge.digits.evaluate import (
        EvalConfig,
        generate_eval_images,
        real_ceiling,
        score_images,
    )
    from instaflow_edge.digits.judge import JudgeConfig, load_judge
    from instaflow_edge.parity import psnr
    from instaflow_edge.pipeline import load_pipeline
    from studies.common import save_digits_eval

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a one-step digits pipeline (e.g. the demo's instaflow student)")
    ap.add_argument("--json", default="studies/results/coreml_digits_eval.json")
    ap.add_argument("--schemes", default=",".join(s.value for s in SCHEMES))
    ap.add_argument("--target-bits", type=float, default=4.0, help="for mixed-bit")
    ap.add_argument("--num-images", type=int, default=1000)
    args = ap.parse_args(argv)

    judge = load_judge(JudgeConfig())
    real, ref_stats = real_ceiling(judge, args.num_images)
    base = load_pipeline(args.model, "cpu", "float32")
    rows, reference = [], None
    for name in ["fp32", *args.schemes.split(",")]:
        cfg = EvalConfig(model=args.model, steps=1, num_images=args.num_images, device="cpu")
        t0 = time.perf_counter()
        compress = None if name == "fp32" else PyTorchCompression(name, args.target_bits if name == "mixed-bit" else None)
        pipe, comp = (base, None) if compress is None else compress(base, 1)
        images, labels, _ = generate_eval_images(pipe, cfg, progress=False)
        reference = images if reference is None else reference
        score = score_images(judge, images, labels, ref_stats)
        row = {"scheme": name, **{k: v for k, v in score.items() if k != "per_digit"},
               "psnr_vs_fp32_db": None if name == "fp32" else round(psnr(reference, images), 2),
               "seconds": round(time.perf_counter() - t0, 1)}
        if comp:
            row["layers_compressed"] = {k: v["layers"] for k, v in comp["components"].items()}
            if name == "mixed-bit":
                row["target_bits"] = args.target_bits
        rows.append(row)
        print(f"{name:22s} accuracy {row['accuracy']:.3f}  FID {row['fid']:7.2f}  "
              f"PSNR vs fp32 {row['psnr_vs_fp32_db'] if row['psnr_vs_fp32_db'] is not None else '-'}", flush=True)
    return save_digits_eval(args.json, "coreml_digits_eval", args.model, args.num_images, rows, real,
                            "scheme", "psnr_vs_fp32_db", "image PSNR vs fp32 (dB)")


if __name__ == "__main__":
    main()
