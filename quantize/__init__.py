"""instaflow_edge.quantize: fp16/int8 for ONNX, palettization/int8 for Core ML."""
