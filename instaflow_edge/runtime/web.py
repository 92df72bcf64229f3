"""The web format: a ``convert --target web`` site. Its runtime is onnxruntime-web in a browser, so it is
recognized here (``format_of``) but not opened: a one-line refusal says how to run it."""

from __future__ import annotations

from .base import RuntimeFormat

KIND = "web-site"
MODEL_DIR = "model"  # the site's ONNX export

FORMAT = RuntimeFormat(
    name="web", kind=KIND, open=None, title="web site", label=lambda manifest: "web",
    description="a static page running onnxruntime-web in a browser",
    refusal=f"serve it (`instaflow-edge serve SITE`) and open the page, or pass SITE/{MODEL_DIR} "
            "(the ONNX export it carries) to run the same graphs with onnxruntime",
)
