"""Interop with optimum: its ONNX Runtime diffusion classes load our export folder and reproduce our outputs.

    python -m studies.optimum_interop EXPORT_DIR [--venv runs/optimum-venv] [--setup]

optimum-onnx pins transformers < 4.58 and hence huggingface_hub < 1.0, which our diffusers refuses
so optimum lives in its own venv: ``--setup`` (or a missing venv) builds it with the pins
below. This process (our venv) runs our export through our runtime on fixed inputs and saves inputs
and outputs; a child process in optimum's venv loads the folder with ``ORTStableDiffusionPipeline`` (and
``ORTDiffusionPipeline`` where present), runs its text encoder, UNet and VAE decoder models on the same
inputs and compares. The result is written to ``studies/results/optimum_interop.json``. Needs the
packages from PyPI (or the local wheel mirror) the first time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from instaflow_edge.bench.common import save_json

PINS = [["torch==2.13.0"],  # first, the CPU build; any other torch request pulls a CUDA build
        ["diffusers==0.39.0", "transformers==4.57.6", "optimum==2.1.0", "optimum-onnx", "onnxruntime",
         "huggingface_hub==0.36.2", "numpy<2.4"]]

CHILD = r'''
import json, sys, traceback
import numpy as np
folder, npz, out = sys.argv[1:4]
d = np.load(npz)
res = {"loaded": {}, "components": {}, "errors": []}
from importlib import metadata
res["versions"] = {p: metadata.version(p) for p in ("optimum", "optimum-onnx", "onnxruntime", "diffusers", "transformers", "huggingface_hub")}
def psnr(ref, x):
    ref, x = ref.astype(np.float64), x.astype(np.float64)
    rms = np.sqrt(np.mean((ref - x) ** 2))
    return float("inf") if rms == 0 else float(20 * np.log10((np.abs(ref).max() + 1e-5) / (rms + 1e-10)))
pipe = None
for cls_name in ("ORTStableDiffusionPipeline", "ORTDiffusionPipeline"):
    try:
        import optimum.onnxruntime as oo
        cls = getattr(oo, cls_name)
        p = cls.from_pretrained(folder, provider="CPUExecutionProvider")
        res["loaded"][cls_name] = type(p).__name__
        pipe = pipe or p
    except Exception as e:
        res["loaded"][cls_name] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
if pipe is not None:
    try:
        te = pipe.text_encoder(input_ids=d["input_ids"])
        te = te["last_hidden_state"] if not isinstance(te, (tuple, list)) else te[0]
        te = te.numpy() if hasattr(te, "numpy") else np.asarray(te)
        res["components"]["text_encoder"] = {"via": "ORT text encoder model call", "psnr": psnr(d["text_encoder"], te),
                                             "max_abs": float(np.abs(d["text_encoder"] - te).max())}
    except Exception as e:
        res["errors"].append("text_encoder: " + traceback.format_exc().splitlines()[-1])
    try:
        import torch  # optimum-onnx's ORTUnet takes torch tensors
        u = pipe.unet(sample=torch.from_numpy(d["noise"]), timestep=torch.tensor(1000.0),  # a scalar, as its pipelines pass it
                      encoder_hidden_states=torch.from_numpy(d["text_encoder"]))
        u = u["sample"] if not isinstance(u, (tuple, list)) else u[0]
        u = u.numpy() if hasattr(u, "numpy") else np.asarray(u)
        res["components"]["unet"] = {"via": "ORT UNet model call at timestep 1000", "psnr": psnr(d["unet"], u),
                                     "max_abs": float(np.abs(d["unet"] - u).max())}
    except Exception as e:
        res["errors"].append("unet: " + traceback.format_exc().splitlines()[-1])
    try:
        v = pipe.vae_decoder(latent_sample=d["latent_sample"])
        v = v["sample"] if not isinstance(v, (tuple, list)) else v[0]
        v = v.numpy() if hasattr(v, "numpy") else np.asarray(v)
        res["components"]["vae_decoder"] = {"via": "ORT VAE decoder model call", "psnr": psnr(d["vae_decoder"], v),
                                            "max_abs": float(np.abs(d["vae_decoder"] - v).max())}
    except Exception as e:
        res["errors"].append("vae_decoder: " + traceback.format_exc().splitlines()[-1])
json.dump(res, open(out, "w"), indent=2)
'''


def setup_venv(venv: Path) -> None:
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    for group in PINS:
        subprocess.run([*pip, *group], check=True)


def our_outputs(folder: Path) -> dict:
    import numpy as np

    from instaflow_edge.components import EXAMPLE_PROMPTS
    from instaflow_edge.generator import make_noise
    from instaflow_edge.runtime import onnx_io
    from instaflow_edge.runtime.onnx import export_meta, tokenize, unet_feed

    meta = export_meta(folder)
    ids = tokenize(folder, EXAMPLE_PROMPTS[:2])
    noise = make_noise([0, 1], tuple(meta["latent_shape"])).numpy()
    s = {n: onnx_io.session(folder / n / onnx_io.MODEL_FILE) for n in ("text_encoder", "unet", "vae_decoder")}
    ehs = s["text_encoder"].run(None, {"input_ids": ids})[0]
    lat = s["unet"].run(None, unet_feed(s["unet"], noise, ehs))[0]
    latent_sample = (lat / meta["scaling_factor"]).astype(np.float32)
    img = s["vae_decoder"].run(None, {"latent_sample": latent_sample})[0]
    return {"input_ids": ids, "noise": noise, "text_encoder": ehs, "unet": lat, "latent_sample": latent_sample, "vae_decoder": img}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("export", type=Path)
    ap.add_argument("--venv", type=Path, default=Path("runs/optimum-venv"))
    ap.add_argument("--setup", action="store_true", help="(re)build optimum's venv first")
    ap.add_argument("-o", "--output", type=Path, default=Path(__file__).parent / "results" / "optimum_interop.json")
    a = ap.parse_args(argv)
    import numpy as np

    if a.setup or not (a.venv / "bin" / "python").exists():
        setup_venv(a.venv)
    outs = our_outputs(a.export)
    with tempfile.TemporaryDirectory() as tmp:
        npz, res = Path(tmp) / "io.npz", Path(tmp) / "res.json"
        np.savez(npz, **outs)
        child = Path(tmp) / "child.py"
        child.write_text(CHILD)
        r = subprocess.run([str(a.venv / "bin" / "python"), str(child), str(a.export), str(npz), str(res)],
                           capture_output=True, text=True, cwd=tmp)
        if r.returncode != 0 or not res.is_file():
            print(r.stderr[-3000:], file=sys.stderr)
            return 1
        report = json.loads(res.read_text())
    report["export"] = str(a.export)
    comps = report["components"]
    for c in comps.values():  # JSON has no inf: identical outputs are psnr null, max_abs 0
        c["identical"] = c["max_abs"] == 0.0
        c["psnr"] = None if c["psnr"] == float("inf") else c["psnr"]
    report["ok"] = (any(not str(v).startswith("failed") for v in report["loaded"].values())
                    and set(comps) == {"text_encoder", "unet", "vae_decoder"}
                    and all(c["identical"] or c["psnr"] > 100 for c in comps.values()))
    a.output.parent.mkdir(parents=True, exist_ok=True)
    save_json(a.output, report)
    print(json.dumps(report, indent=2, default=str))
    print(f"wrote {a.output}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
