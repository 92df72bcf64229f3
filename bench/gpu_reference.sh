#!/usr/bin/env bash
# The GPU reference run of the ONNX issue, prepared for a session that is lent a GPU machine (the
# `device` tool): `sd15` one-step latency with torch fp16 eager and torch.compile on CUDA, through
# bench/onnx_latency.py --device cuda. It has NOT run yet: no session so far was lent a machine.
#
# The machine's image has torch (CUDA), transformers, onnx and onnxruntime (CPU build), but not
# diffusers; nothing can be downloaded there. So, here, once (the wheels travel via `carry`):
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
#       diffusers==0.42.1 importlib_metadata==8.7.0
#
# then one device call:  run(command="bash bench/gpu_reference.sh", carry=[".whl"], timeout_s=540)
# and commit $OUT's JSON as bench/results/sd15-cuda-<gpu>.json. onnxruntime-gpu (≈ 300 MB) is over
# the tool's 64 MiB carry limit, so ORT's CUDA provider is absent there; the JSON says so (no ORT rows).
set -euo pipefail
OUT=${OUT:-bench/results}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/site .
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.csv"
python3 -m instaflow_edge.cli init sd15 /tmp/sd15 --force
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '-' | tr -cd 'A-Za-z0-9_.-')
python3 -m instaflow_edge.bench.onnx_latency /tmp/sd15 --device cuda --threads 16 --warmup 3 --repeats 20 \
    -o "$OUT/sd15-cuda-${gpu}.json" 2>&1 | tee "$OUT/sd15-cuda.log"
