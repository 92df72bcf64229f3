"""What each ExecuTorch precision does to a trained one-step digits model, by the digits eval.

Converts the model with ``convert --target executorch`` in fp32, fp16 and ``--quantize int8`` (PT2E with
XNNPACK's quantizer, calibrated on the given prompts), then scores each folder as
``eval --backend executorch`` does: the ExecuTorch runtime's images of the fixed prompt set and seeds,
prompt accuracy and digits-FID by the judge, the images' PSNR against PyTorch fp32's, and whether the
FID is within 10% of PyTorch fp32's and of the fp32 program's.

    python -m studies.executorch_digits_eval runs/demo/instaflow --calibration-prompts digits \\
        --work runs/executorch_digits_eval --json studies/results/executorch_digits_eval.json
"""

from __future__ import annotations

import time
from pathlib import Path

# label -> (precision, scheme)
VARIANTS = {"fp32": ("fp32", None), "fp16": ("fp16", None), "int8": ("fp32", "int8")}


def main(argv: list[str] | None = None) -> dict:
    from instaflow_edge.convert import ConvertConfig, export
    from instaflow_edge.digits.evaluate import EvalConfig, generate_eval_images
    from instaflow_edge.pipeline import load_pipeline
    from studies.common import DigitsScorer, digits_eval_args, save_digits_eval

    args = digits_eval_args(__doc__, VARIANTS, "runs/executorch_digits_eval", "studies/results/executorch_digits_eval.json", argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    scorer = DigitsScorer(args.num_images)

    cfg = EvalConfig(model=args.model, steps=1, num_images=args.num_images, device="cpu")
    t0 = time.perf_counter()
    reference, labels, _ = generate_eval_images(load_pipeline(args.model, "cpu", "float32"), cfg, progress=False)
    rows = [scorer.score("torch fp32", reference, labels, None, time.perf_counter() - t0)]
    for label in args.variants.split(","):
        precision, scheme = VARIANTS[label]
        out = work / label
        t0 = time.perf_counter()
        if not (out / "manifest.json").is_file():
            export(ConvertConfig.of("executorch", model=args.model, output=str(out), precision=precision, quantize=scheme,
                                    calibration_prompts=args.calibration_prompts if scheme else None, force=True))
        rows.append(scorer.score_export(f"executorch {label}", out, "executorch", labels, reference,
                                        {"convert_seconds": round(time.perf_counter() - t0, 1),
                                         "calibration_prompts": args.calibration_label if scheme else None}))
    fp32 = next((r for r in rows if r["variant"] == "executorch fp32"), None)
    for r in rows[1:]:
        if fp32 is not None:
            r["fid_vs_executorch_fp32"] = round(r["fid"] / fp32["fid"], 4)
            r["fid_within_10pct_of_executorch_fp32"] = abs(r["fid"] / fp32["fid"] - 1) <= 0.10
    return save_digits_eval(args.json, "executorch_digits_eval", args.model, args.num_images, rows, scorer.real,
                            "variant", "psnr_vs_torch_fp32_db", "image PSNR vs torch fp32 (dB)")


if __name__ == "__main__":
    main()
