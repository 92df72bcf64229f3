"""Apple's Swift pipeline (transliterated, ``tests/peers/apple_swift.py``) on a model's Apple-layout modules
against ``generate``: the image PSNR (8-bit, dB) per precision, and what fp16 does to the ε̂ division by α.

Rows, each the Swift chain's PNG vs ``generate --backend torch`` (fp32) for the same prompt and seed:

* ``fp32``: the modules in float32 (what ``--precision fp32`` packages compute);
* ``fp16``: the modules in float16 as shipped, the ε̂ tail after the UNet in float32 (what
  ``--precision fp16`` packages compute: ``coreml_apple.fp32_tail``);
* ``fp16-tail16``: the same with the tail in float16 too (Core ML's default fp16 program): the cost of
  the division by α ≈ 0.068 that keeping the tail fp32 avoids;
* ``fp32-tail16``: float32 modules with only the tail in float16: that cost alone, and cheap to measure
  where float16 itself is not (PyTorch's CPU float16 convolutions are ~300× slower than float32 here,
  which puts a float16 SD1.5 UNet + VAE decoder out of reach on a CPU).

The modules are the converter's (``coreml_apple.SPECS``; with no ``--compress`` they are what it traces, and
its ``weights_match`` checks the packages hold their weights). Core ML itself cannot run here (Linux).

    python -m studies.coreml_apple_peer runs/digits-demo/instaflow --prompt "a handwritten seven" \\
        --json studies/results/coreml_apple_peer_digits.json
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _predict(module, outputs: list[str], inputs: list[str], half: bool, tail_half: bool = False):
    import numpy as np
    import torch

    from instaflow_edge.convert import coreml_apple as apple

    m = copy.deepcopy(module).half() if half else module
    if tail_half and isinstance(module, apple.AppleUnet):
        m = _HalfTail(m)

    def predict(feed: dict) -> dict:
        xs = [torch.from_numpy(np.ascontiguousarray(feed[n])) for n in inputs]
        if half and not getattr(module, "keeps_input_dtype", False):
            xs = [x.half() for x in xs]
        with torch.no_grad():
            out = m(*xs)
        out = out if isinstance(out, tuple) else (out,)
        return {n: o.float().numpy() for n, o in zip(outputs, out)}

    return predict


class _HalfTail:
    """The Apple Unet with ε̂ = (x − α·(x + v))/σ computed in float16 (x rounded to float16 first)."""

    def __init__(self, unet_module):
        self.m = unet_module

    def __call__(self, sample, timestep, hidden):
        import torch

        from instaflow_edge.convert import coreml_apple as apple

        got = []
        h = self.m.unet.register_forward_hook(lambda mod, i, o: got.append(o[0]))
        try:
            self.m(sample, timestep, hidden)
        finally:
            h.remove()
        return apple.eps_hat(sample.half(), got[0].half(), self.m.alpha, self.m.sigma).to(torch.float32)


def main(argv: list[str] | None = None) -> dict:
    import numpy as np
    from PIL import Image

    sys.path.insert(0, str(ROOT / "tests"))
    from peers import apple_swift as swift

    from instaflow_edge.bench.common import machine, save_result
    from instaflow_edge.convert import coreml_apple as apple
    from instaflow_edge.generate import GenerateConfig, generate
    from instaflow_edge.parity import psnr
    from instaflow_edge.pipeline import load_pipeline

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a one-step pipeline folder")
    ap.add_argument("--prompt", action="append", help="repeatable (default: two prompts of the tiny/sd15 vocabulary)")
    ap.add_argument("--seed", type=int, action="append", help="repeatable, one per prompt (default 0, 1, …)")
    ap.add_argument("--rows", default="fp32,fp32-tail16,fp16,fp16-tail16")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    prompts = args.prompt or ["a red fox in snow", "a lighthouse at night"]
    seeds = args.seed or list(range(len(prompts)))

    pipe = load_pipeline(args.model, "cpu", "float32")
    apple.check_model(pipe.info, args.model)
    modules = {n: spec.module(pipe) for n, spec in apple.SPECS.items()}
    outputs = {n: [t.name for t in spec.outputs] for n, spec in apple.SPECS.items()}
    inputs = {n: [t.name for t in spec.inputs] for n, spec in apple.SPECS.items()}
    tok_dir = Path(args.model) / "tokenizer"
    tok = swift.BPETokenizer(tok_dir / "merges.txt", tok_dir / "vocab.json")
    h = w = pipe.default_size
    shape = (1, pipe.unet.config.in_channels, h // pipe.vae_scale_factor, w // pipe.vae_scale_factor)

    refs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (p, s) in enumerate(zip(prompts, seeds)):
            t0 = time.perf_counter()
            m = generate(GenerateConfig(model=args.model, prompts=[p], output=f"{tmp}/g{i}", seed=s, device="cpu",
                                        dtype="float32"), progress=False)
            refs.append(np.asarray(Image.open(f"{tmp}/g{i}/{m['images'][0]['file']}").convert("RGB")))
            print(f"generate {p!r} seed {s}: {time.perf_counter() - t0:.1f} s", flush=True)
    rows = []
    for row in args.rows.split(","):
        half, tail_half = row.startswith("fp16"), row.endswith("tail16")
        models = {n: _predict(modules[n], outputs[n], inputs[n], half, tail_half) for n in modules}
        figures, ids_equal = [], []
        t0 = time.perf_counter()
        for (p, s), ref in zip(zip(prompts, seeds), refs):
            r = swift.generate_images(models["text_encoder"], models["unet"], models["vae_decoder"], tok, p, seed=s,
                                      latent_shape=shape)
            figures.append(round(psnr(ref.astype(np.float64), r["image"].astype(np.float64), peak=255.0), 2))
            ids_equal.append(r["ids"] == pipe.tokenize([p])[0].tolist())
        rows.append({"row": row, "psnr_db": figures, "ids_equal": ids_equal, "seconds": round(time.perf_counter() - t0, 1)})
        print(f"{row:>12}: {', '.join(f'{f:.2f} dB' for f in figures)}  ({rows[-1]['seconds']} s)", flush=True)
    result = {"machine": machine(), "model": args.model, "scaling_factor": pipe.scaling_factor,
              "prompts": prompts, "seeds": seeds, "apple_commit": swift.APPLE_COMMIT,
              "one_step": {k: float(v) for k, v in apple.ONE_STEP.items()}, "rows": rows}
    if args.json:
        save_result(args.json, "coreml_apple_peer", result)
    return result


if __name__ == "__main__":
    main()
