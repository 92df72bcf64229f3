"""What each OpenVINO precision and NNCF scheme does to a trained one-step digits model, by the digits eval.

Converts the model with ``convert --target openvino`` in every precision (auto, f32, bf16, f16) and, at
the device default precision, with every ``--quantize`` scheme (int8, int8-hybrid, int8-weights,
int4-weights; int8 and int8-hybrid once more with the VAE decoder quantized too), then scores each folder as ``eval --backend openvino`` does: OpenVINO images of the fixed
prompt set and seeds, prompt accuracy and digits-FID by the judge, the images' PSNR against PyTorch
fp32's, and whether the FID is within 10% of PyTorch fp32's (issue 15's target).

    python -m studies.openvino_digits_eval runs/digits-demo/instaflow \\
        --work runs/ov-helper/digits --json studies/results/openvino_digits_eval.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

# label -> (precision, scheme, components); None components: the scheme's defaults (text encoder and UNet)
ALL = ["text_encoder", "unet", "vae_decoder"]
VARIANTS = {
    "f32": ("f32", None, None),
    "auto": ("auto", None, None),
    "bf16": ("bf16", None, None),
    "f16": ("f16", None, None),
    "int8": ("auto", "int8", None),
    "int8+vae": ("auto", "int8", ALL),
    "int8-hybrid": ("auto", "int8-hybrid", None),
    "int8-hybrid+vae": ("auto", "int8-hybrid", ALL),
    "int8-weights": ("auto", "int8-weights", None),
    "int4-weights": ("auto", "int4-weights", None),
}


def main(argv: list[str] | None = None) -> dict:
    from instaflow_edge.convert import ConvertConfig, export
    from instaflow_edge.digits.evaluate import (
        EvalConfig,
        generate_eval_images,
        generate_eval_images_onnx,
        real_ceiling,
        score_images,
    )
    from instaflow_edge.digits.judge import JudgeConfig, load_judge
    from instaflow_edge.parity import psnr
    from instaflow_edge.pipeline import load_pipeline
    from instaflow_edge.runtime.openvino import open_export
    from studies.common import save_digits_eval

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a one-step digits pipeline (e.g. the demo's instaflow student)")
    ap.add_argument("--work", default="runs/openvino_digits_eval", help="folder for the exports (reused when present)")
    ap.add_argument("--json", default="studies/results/openvino_digits_eval.json")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from: {', '.join(VARIANTS)}")
    ap.add_argument("--num-images", type=int, default=1000)
    args = ap.parse_args(argv)
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown --variants {', '.join(sorted(unknown))}: choose from {', '.join(VARIANTS)}")

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    judge = load_judge(JudgeConfig())
    real, ref_stats = real_ceiling(judge, args.num_images)
    fid_fp32 = None

    def score(label, images, labels, reference, seconds, extra=None):
        s = score_images(judge, images, labels, ref_stats)
        row = {"variant": label, **{k: v for k, v in s.items() if k != "per_digit"},
               "psnr_vs_torch_fp32_db": None if reference is None else round(psnr(reference, images), 2),
               "fid_vs_torch_fp32": None if fid_fp32 is None else round(s["fid"] / fid_fp32, 4),
               "fid_within_10pct": None if fid_fp32 is None else abs(s["fid"] / fid_fp32 - 1) <= 0.10,
               "seconds": round(seconds, 1), **(extra or {})}
        p = row["psnr_vs_torch_fp32_db"]
        print(f"{label:24s} accuracy {row['accuracy']:.3f}  FID {row['fid']:7.2f}  PSNR vs torch fp32 "
              f"{'-' if p is None else f'{p:.1f}'}", flush=True)
        return row

    cfg = EvalConfig(model=args.model, steps=1, num_images=args.num_images, device="cpu")
    t0 = time.perf_counter()
    reference, labels, _ = generate_eval_images(load_pipeline(args.model, "cpu", "float32"), cfg, progress=False)
    rows = [score("torch fp32", reference, labels, None, time.perf_counter() - t0)]
    fid_fp32 = rows[0]["fid"]
    for label in args.variants.split(","):
        precision, scheme, comps = VARIANTS[label]
        out = work / label
        t0 = time.perf_counter()
        if not (out / "manifest.json").is_file():
            export(ConvertConfig(model=args.model, output=str(out), target="openvino", ov_precision=precision,
                                 ov_quantize=scheme, quantize_components=comps, force=True))
        convert_s = time.perf_counter() - t0
        ecfg = EvalConfig(model=str(out), steps=1, num_images=args.num_images, backend="openvino")
        t0 = time.perf_counter()
        exp = open_export(out, 1, 1.0)
        ran = sorted({s.precision for s in exp[2].values()})
        images, labels_o, info = generate_eval_images_onnx(exp, ecfg, progress=False, backend="openvino")
        assert labels_o == labels
        rows.append(score(f"openvino {label}", images, labels_o, reference, time.perf_counter() - t0,
                          {"folder": str(out), "export_precision": info["export_precision"], "ran_in": "/".join(ran),
                           "convert_seconds": round(convert_s, 1)}))
    return save_digits_eval(args.json, "openvino_digits_eval", args.model, args.num_images, rows, real,
                            "variant", "psnr_vs_torch_fp32_db", "image PSNR vs torch fp32 (dB)")


if __name__ == "__main__":
    main()
