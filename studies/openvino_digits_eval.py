"""What each OpenVINO precision and NNCF scheme does to a trained one-step digits model, by the digits eval.

Converts the model with ``convert --target openvino`` in every precision (auto, f32, bf16, f16) and, at
the device default precision, with every ``--quantize`` scheme (int8, int8-hybrid, int8-weights,
int4-weights; int8 and int8-hybrid once more with the VAE decoder quantized too), then scores each
folder as ``eval --backend openvino`` does: OpenVINO images of the fixed prompt set and seeds, prompt
accuracy and digits-FID by the judge, the images' PSNR against PyTorch fp32's, and whether the FID is
within 10% of PyTorch fp32's.

    python -m studies.openvino_digits_eval runs/demo/instaflow --calibration-prompts digits \\
        --work runs/openvino_digits_eval --json studies/results/openvino_digits_eval.json
"""

from __future__ import annotations

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
    from instaflow_edge.digits.evaluate import EvalConfig, generate_eval_images, generate_eval_images_export
    from instaflow_edge.pipeline import load_pipeline
    from instaflow_edge.runtime import open_export
    from studies.common import DigitsScorer, digits_eval_args, save_digits_eval

    args = digits_eval_args(__doc__, VARIANTS, "runs/openvino_digits_eval", "studies/results/openvino_digits_eval.json", argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    scorer = DigitsScorer(args.num_images)

    cfg = EvalConfig(model=args.model, steps=1, num_images=args.num_images, device="cpu")
    t0 = time.perf_counter()
    reference, labels, _ = generate_eval_images(load_pipeline(args.model, "cpu", "float32"), cfg, progress=False)
    rows = [scorer.score("torch fp32", reference, labels, None, time.perf_counter() - t0)]
    for label in args.variants.split(","):
        precision, scheme, comps = VARIANTS[label]
        out = work / label
        t0 = time.perf_counter()
        if not (out / "manifest.json").is_file():
            cal = args.calibration_prompts if scheme in ("int8", "int8-hybrid") else None
            export(ConvertConfig.of("openvino", model=args.model, output=str(out), precision=precision,
                                 quantize=scheme, quantize_components=comps, calibration_prompts=cal, force=True))
        convert_s = time.perf_counter() - t0
        ecfg = EvalConfig(model=str(out), steps=1, num_images=args.num_images, backend="openvino")
        t0 = time.perf_counter()
        exp = open_export(out, expect="openvino", steps=1)
        ran = [exp.details["ran_precision"]]
        images, labels_o, info = generate_eval_images_export(exp, ecfg, progress=False)
        assert labels_o == labels
        rows.append(scorer.score(f"openvino {label}", images, labels_o, reference, time.perf_counter() - t0,
                                 {"folder": str(out), "export_precision": info["export_precision"], "ran_in": "/".join(ran),
                                  "convert_seconds": round(convert_s, 1), "calibration_prompts": args.calibration_label}))
    return save_digits_eval(args.json, "openvino_digits_eval", args.model, args.num_images, rows, scorer.real,
                            "variant", "psnr_vs_torch_fp32_db", "image PSNR vs torch fp32 (dB)")


if __name__ == "__main__":
    main()
