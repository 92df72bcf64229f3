"""instaflow-edge: InstaFlow's one-step rectified-flow recipe, and its way onto devices.

Importing this package is cheap: heavy libraries (torch, diffusers, onnxruntime, coremltools,
accelerate) load only inside the functions that need them.
"""

__version__ = "0.1.0"
