"""A toy export format, as a plug-in package would ship it (``FORMAT``, a RuntimeFormat).

Its "export" is a folder with a manifest of kind ``toy-export`` naming the pipeline it was made from; its
runtime runs that pipeline's PyTorch modules, with the UNet's output scaled by the manifest's ``gain``
(1.0: exact; 1.5: a broken export a report must fail). Used in-process by test_toy_format.py (registered
with ``runtime.register``) and, copied beside an entry point, as an installed plug-in by
test_toy_plugin.py. Self-contained: it imports only instaflow_edge.
"""

from __future__ import annotations

import json
from pathlib import Path

from instaflow_edge.runtime.base import ONE_STEP, Export, ExportFacts, RuntimeFormat


def open_toy(folder, manifest, *, steps=None, guidance=1.0, threads=None, device="cpu"):
    from instaflow_edge.components import Sizes
    from instaflow_edge.pipeline import load_pipeline
    from instaflow_edge.report.runtimes import _torch_calls

    pipe = load_pipeline(manifest["source"]["model"], "cpu", "float32")
    calls = _torch_calls(pipe)
    gain = float(manifest["gain"])
    unet = calls["unet"]
    calls["unet"] = lambda z, h: unet(z, h) * gain
    facts = ExportFacts.of(pipe, Sizes.of(pipe), ONE_STEP)
    return Export(folder=folder, format="toy", label=f"toy x{gain:g}", facts=facts, steps=1,
                  tokenize=lambda prompts: pipe.tokenize(prompts).numpy(), calls=calls, precision="fp32",
                  ran="the toy runtime (PyTorch, UNet output scaled)",
                  gates={c: 60.0 for c in (*ONE_STEP, "end_to_end")},
                  stage_precisions={s: "fp32" for s in (*ONE_STEP, "end_to_end", "generator")})


FORMAT = RuntimeFormat(name="toy", kind="toy-export", open=open_toy, description="a test's toy",
                       label=lambda m: f"toy x{m['gain']:g}")


def write_toy_export(folder: Path, model: Path, gain: float) -> Path:
    """A toy export of ``model`` at ``gain``."""
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"kind": "toy-export", "gain": gain, "source": {"model": str(model)}}))
    return folder
