"""``instaflow-edge report``: the parity report people look at before shipping an export.

Fixed prompts and seeds through the PyTorch reference and every export given (``runtimes.py``), per
component and end-to-end parity against each manifest's gate, sizes and bits per weight, the digits
judge's accuracy and FID for digits models, latency tables and a chart from ``instaflow-edge bench``
results (``figures.py``), and a verdict per export; written as ``report.html`` (self-contained),
``report.md`` and ``report.json`` (``render.py``, ``build.py``).

Floor: entry (with the CLI and bench/): it uses the runtime, the stages (Core ML compression as the
converter applies it) and the digits world.
"""
