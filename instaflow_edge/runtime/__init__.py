"""instaflow_edge.runtime: open an export, check it, run it (ONNX Runtime, Core ML)."""
