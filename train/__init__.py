"""instaflow_edge.train: teacher training, reflow data, 2-rectified flow and one-step distillation."""
