"""The latency benchmark's timing logic: interleaved rounds and paired ratios (no timing asserted)."""

from instaflow_edge.bench.onnx_latency import _paired, _time_interleaved


def test_interleaved_rounds_rotate_and_pair_by_round():
    calls = []
    # a fake clock: "a" takes 2 s and "b" 1 s, except that round 2 is a slow phase for both (×3)
    round_of = {"a": 0, "b": 0}

    def runner(name, base):
        def once():
            calls.append(name)
            r = round_of[name]
            round_of[name] += 1
            slow = 3.0 if r == 3 else 1.0  # the 1 warm-up call is round 0: timed rounds are 1..4
            return {"s1": base * slow, "s2": base * slow}

        return once

    res = _time_interleaved({"a": runner("a", 2.0), "b": runner("b", 1.0)}, warmup=1, repeats=4)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b", "b", "a"]  # warm-up, then rotated rounds
    assert res["a"]["end_to_end"]["times_s"] == [4.0, 4.0, 12.0, 4.0]
    assert res["a"]["s1"]["n"] == 4 and res["b"]["s1"]["median_s"] == 1.0
    # paired per round: the slow round cancels, every ratio is exactly 2
    assert _paired(res["a"]["end_to_end"]["times_s"], res["b"]["end_to_end"]["times_s"]) == \
        {"median": 2.0, "min": 2.0, "max": 2.0}


def test_paired_ratio_spread():
    out = _paired([2.0, 3.0, 4.0], [1.0, 2.0, 1.0])
    assert out == {"median": 2.0, "min": 1.5, "max": 4.0}


def test_markdown_table_from_a_report():
    from instaflow_edge.bench.onnx_latency import markdown

    def st(m, **kw):
        return {"median_s": m, "p90_s": m * 1.1, "pct_of_peak": 50.0, **kw}

    stages = ("text_encoder", "unet", "vae_decoder", "end_to_end")
    report = {"results": {
        "torch eager fp32": {k: st(2.0, speedup_vs_torch_eager_fp32=1.0) for k in stages},
        "ort fp32": {k: st(1.0, speedup_vs_torch_eager_fp32=2.0, speedup_vs_torch_eager_fp32_range=[1.8, 2.2],
                           speedup_vs_ort_fp32=1.0, speedup_vs_ort_fp32_range=[1.0, 1.0]) for k in stages},
    }}
    rows = markdown(report).splitlines()
    assert len(rows) == 4 and rows[0].startswith("| runtime |")
    assert "| ort fp32 | 1 s | 1 s (50%) | 1 s | 1 s / 1.1 s | 2.00 (1.80–2.20) |" in rows[3]


def test_thread_policy_environments_and_table():
    from studies import threads

    env = threads._env({"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": None})
    assert env["OMP_NUM_THREADS"] == "1" and "OMP_WAIT_POLICY" not in env
    result = {"results": {"torch default": {"quiet_steps_per_s": 2.0, "busy_steps_per_s": 0.5, "busy_slowdown": 4.0,
                                            "quiet_vs_first_policy": 1.0}}}
    assert "| torch default | 2.00 | 0.50 | 4.00× | 1.00 |" in threads.markdown(result)
