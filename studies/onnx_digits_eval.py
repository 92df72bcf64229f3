"""What each ONNX precision does to a trained one-step digits model, by the digits eval.

Exports the model (``convert --target onnx``, fp32, optimized for the CPU), quantizes that export with
every scheme of ``instaflow-edge quantize`` — and int8-static once more with the VAE decoder included
(``-c text_encoder -c unet -c vae_decoder``, which the default leaves fp32) — then scores each folder as
``eval --backend onnx`` does: onnxruntime images of the fixed prompt set and seeds, prompt accuracy and
digits-FID by the judge, and the images' PSNR against PyTorch fp32's. This is the quality evidence
behind the int8 gate (a PSNR figure alone does not say whether digits stay digits).

    python -m studies.onnx_digits_eval runs/demo/instaflow \\
        --work runs/onnx_digits_eval --json studies/results/onnx_digits_eval.json
"""

from __future__ import annotations

import argparse
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
    from instaflow_edge.quantize.onnx_folder import QuantizeConfig, quantize

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
    from instaflow_edge.runtime.onnx import open_export
    from studies.common import save_digits_eval

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a one-step digits pipeline (e.g. the demo's instaflow student)")
    ap.add_argument("--work", default="runs/onnx_digits_eval", help="folder for the exports (reused when present)")
    ap.add_argument("--json", default="studies/results/onnx_digits_eval.json")
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

    def score(label, images, labels, reference, seconds, extra=None):
        s = score_images(judge, images, labels, ref_stats)
        row = {"variant": label, **{k: v for k, v in s.items() if k != "per_digit"},
               "psnr_vs_torch_fp32_db": None if reference is None else round(psnr(reference, images), 2),
               "seconds": round(seconds, 1), **(extra or {})}
        p = row["psnr_vs_torch_fp32_db"]
        print(f"{label:18s} accuracy {row['accuracy']:.3f}  FID {row['fid']:7.2f}  PSNR vs torch fp32 "
              f"{'-' if p is None else f'{p:.1f}'}", flush=True)
        return row

    cfg = EvalConfig(model=args.model, steps=1, num_images=args.num_images, device="cpu")
    t0 = time.perf_counter()
    reference, labels, _ = generate_eval_images(load_pipeline(args.model, "cpu", "float32"), cfg, progress=False)
    rows = [score("torch fp32", reference, labels, None, time.perf_counter() - t0)]

    fp32 = work / "fp32"
    if not (fp32 / "manifest.json").is_file():
        export(ConvertConfig(model=args.model, output=str(fp32), force=True))
    folders = {"onnx fp32": (fp32, None)}
    for label in args.variants.split(","):
        scheme, comps = VARIANTS[label]
        out = work / label
        if not (out / "manifest.json").is_file():
            quantize(QuantizeConfig(source=str(fp32), output=str(out), scheme=scheme, components=comps, force=True))
        folders[f"onnx {label}"] = (out, comps or "default")
    for label, (folder, comps) in folders.items():
        ecfg = EvalConfig(model=str(folder), steps=1, num_images=args.num_images, backend="onnx")
        t0 = time.perf_counter()
        images, labels_o, info = generate_eval_images_onnx(open_export(folder, 1, 1.0), ecfg, progress=False)
        assert labels_o == labels
        rows.append(score(label, images, labels_o, reference, time.perf_counter() - t0,
                          {"folder": str(folder), "export_precision": info["export_precision"],
                           "components_quantized": comps}))
    return save_digits_eval(args.json, "onnx_digits_eval", args.model, args.num_images, rows, real,
                            "variant", "psnr_vs_torch_fp32_db", "image PSNR vs torch fp32 (dB)")


if __name__ == "__main__":
    main()
