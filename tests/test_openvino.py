"""OpenVINO: the measured peaks (bench/peaks.py), convert --target openvino, generate --backend openvino."""

from __future__ import annotations

import pytest


def test_measure_peaks_small_gemm_every_precision_has_a_peak():
    from instaflow_edge.bench.peaks import PRECISIONS, measure_peaks, pct_of_peak

    res = measure_peaks(1, n=128, seconds=0.01)
    assert res["threads"] == 1 and res["n"] == 128
    for p in PRECISIONS:
        assert p in res["candidates"]
    # torch runs all three on any x86 CPU: every precision has a positive peak from some runtime
    for p in PRECISIONS:
        peak = res["peaks"][p]
        assert peak["gops"] > 0 and peak["via"] in res["candidates"][p]
        assert res["candidates"][p][peak["via"]] == peak["gops"]
    assert pct_of_peak(res["peaks"]["fp32"]["gops"] * 1e9, 1.0, res, "fp32") == pytest.approx(100.0)
    assert pct_of_peak(1.0, 1.0, res, "f4") is None


def test_measure_peaks_refuses_bad_threads():
    from instaflow_edge.bench.peaks import measure_peaks

    with pytest.raises(ValueError, match="threads must be a positive integer"):
        measure_peaks(0)
