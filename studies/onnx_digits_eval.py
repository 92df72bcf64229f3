"""What each ONNX precision does to a trained one-step digits model, by the digits eval.

Exports the model (``convert --target onnx``, fp32, optimized for the CPU), quantizes that export with
every scheme of ``instaflow-edge quantize`` — and int8-static once more with the VAE decoder included
(``-c text_encoder -c unet -c vae_decoder``, which the default leaves fp32) — then scores each folder as
``eval --backend onnx`` does: onnxruntime images of the fixed prompt set and seeds, prompt accuracy and
digits-FID by the judge, and the images' PSNR against PyTorch fp32's. This is the quality evidence
behind the int8 gate (a PSNR figure alone does not say whether digits stay digits).

    python -m studies.onnx_digits_eval runs/demo/instaflow --calibration-prompts digits \\
        --work runs/onnx_digits_eval --json studies/results/onnx_digits_eval.json
"""

from __future__ import annotations

import time
from pathlib import Path

# label -> (scheme, components); None components: the scheme's defaults (text encoder and UNet)
VARIANTS = {
    "fp16": ("fp16", None),
    "int8-dynamic": ("int8-dynamic", None),
    "int8-static": ("int8-static", None),
    "int8-static+vae": ("int8-static", ["text_encoder", "unet", "vae_decoder"]),
}


def main(argv: list[str] | None = None) -> dict:
    from instaflow_edge.convert import ConvertConfig, export
    from instaflow_edge.digits.evaluate import EvalConfig, generate_eval_images
    from instaflow_edge.pipeline import load_pipeline
    from instaflow_edge.quantize.onnx_folder import QuantizeConfig, quantize
    from studies.common import DigitsScorer, digits_eval_args, save_digits_eval

    args = digits_eval_args(__doc__, VARIANTS, "runs/onnx_digits_eval", "studies/results/onnx_digits_eval.json", argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    scorer = DigitsScorer(args.num_images)

    cfg = EvalConfig(model=args.model, steps=1, num_images=args.num_images, device="cpu")
    t0 = time.perf_counter()
    reference, labels, _ = generate_eval_images(load_pipeline(args.model, "cpu", "float32"), cfg, progress=False)
    rows = [scorer.score("torch fp32", reference, labels, None, time.perf_counter() - t0)]

    fp32 = work / "fp32"
    if not (fp32 / "manifest.json").is_file():
        export(ConvertConfig.of("onnx", model=args.model, output=str(fp32), force=True))
    folders = {"onnx fp32": (fp32, None)}
    for label in args.variants.split(","):
        scheme, comps = VARIANTS[label]
        out = work / label
        if not (out / "manifest.json").is_file():
            cal = args.calibration_prompts if scheme == "int8-static" else None
            quantize(QuantizeConfig(source=str(fp32), output=str(out), scheme=scheme, components=comps,
                                    calibration_prompts=cal, force=True))
        folders[f"onnx {label}"] = (out, comps or "default")
    for label, (folder, comps) in folders.items():
        rows.append(scorer.score_export(label, folder, "onnx", labels, reference,
                                        {"components_quantized": comps, "calibration_prompts": args.calibration_label}))
    return save_digits_eval(args.json, "onnx_digits_eval", args.model, args.num_images, rows, scorer.real,
                            "variant", "psnr_vs_torch_fp32_db", "image PSNR vs torch fp32 (dB)")


if __name__ == "__main__":
    main()
