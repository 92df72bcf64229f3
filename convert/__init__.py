"""instaflow_edge.convert: component specs, pruning, ONNX and Core ML export."""
