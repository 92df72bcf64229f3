"""instaflow_edge.bench: latency and parity benchmarks and reports."""
