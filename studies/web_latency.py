"""In-browser latency of ``convert --target web`` sites, beside onnxruntime's Python CPU session on the
same export, in the same run.

For each site: the page is served on 127.0.0.1 (``site_server``: cross-origin isolated, so WASM threads
work), opened in Debian's headless Chromium through Playwright (``executable_path``, no browser
download) with ``?backend=wasm&threads=N``; the prompt and seed are typed and Generate clicked
``--warmup`` + ``--repeats`` times; the page's own per-component timings (``performance.now()`` around
each ``session.run``) are collected. Then the site's ``model/`` export runs in onnxruntime (Python, CPU
provider, ``intra_op_num_threads = N``) on the same token ids and noise, timed the same way. The JSON has
median and p90 per component for both, their ratio, model load time, the page image's PSNR against
onnxruntime's, the thread count, the machine, and the versions. A site that cannot load in the browser
(a model past WASM's 4 GB memory) is recorded with the page's error.

    python -m studies.web_latency SITE [SITE ...] --threads 2 -o docs/results/web_latency.json \\
        [--screenshot docs/images/web.png]

Timings are only meaningful on a quiet machine: run it alone.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import threading
import time
from pathlib import Path

from instaflow_edge import runtime
from instaflow_edge.artifacts import read_manifest
from instaflow_edge.convert.web import COMPONENTS, site_server
from instaflow_edge.errors import InputError
from instaflow_edge.bench.common import machine, save_result
from instaflow_edge.envinfo import cpu_info

CHROMIUM = "/usr/bin/chromium"
PAGE_STEPS = ("tokenizer", "noise", *COMPONENTS, "to_image", "total")


def _stats(values: list[float]) -> dict:
    values = sorted(values)
    p90 = values[min(len(values) - 1, max(0, round(0.9 * (len(values) - 1))))]
    return {"median_ms": round(statistics.median(values), 2), "p90_ms": round(p90, 2), "n": len(values),
            "all_ms": [round(v, 2) for v in values]}


@contextlib.contextmanager
def _serving(site: Path):
    server = site_server(site, 0, quiet=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def browser_latency(browser, site: Path, prompt: str, seed: int, threads: int, warmup: int, repeats: int,
                    screenshot: Path | None, timeout_s: float) -> dict:
    """The page's timings for ``warmup + repeats`` clicks of Generate (the warm-up ones dropped)."""
    import numpy as np

    out: dict = {}
    with _serving(site) as url:
        page = browser.new_page(viewport={"width": 1040, "height": 560})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("crash", lambda *_: errors.append("the page crashed (out of memory?)"))
        try:
            t0 = time.perf_counter()
            page.goto(f"{url}?backend=wasm&threads={threads}")
            page.wait_for_function("document.getElementById('status').dataset.state !== 'loading'", timeout=timeout_s * 1000)
            state = page.get_attribute("#status", "data-state")
            out["backend"] = page.text_content("#backend")
            out["cross_origin_isolated"] = page.evaluate("crossOriginIsolated")
            out["threads"] = page.evaluate("window.instaflow.threads")
            if state != "ready":
                out["error"] = page.text_content("#status")
                return out
            out["load_ms"] = round(page.evaluate("window.instaflow.load_ms"), 1)
            out["load_wall_s"] = round(time.perf_counter() - t0, 2)
            runs = []
            for k in range(warmup + repeats):
                page.fill("#prompt", prompt)
                page.fill("#seed", str(seed))
                # the click is scheduled in the page rather than sent as an input event: the page runs the
                # models on its main thread, and an SD1.5-size run holds it longer than an input event may wait
                page.evaluate("setTimeout(() => document.getElementById('generate').click(), 0)")
                page.wait_for_function(f"window.instaflow.runs === {k + 1} || "
                                       "document.getElementById('status').dataset.state === 'error'", timeout=timeout_s * 1000)
                if page.get_attribute("#status", "data-state") != "done":
                    out["error"] = page.text_content("#status")
                    return out
                runs.append(page.evaluate("window.instaflow.last.ms"))
            runs = runs[warmup:]
            out["page_ms"] = {k: _stats([r[k] for r in runs]) for k in PAGE_STEPS}
            w, h, data = page.evaluate("""() => { const c = document.getElementById('image');
                return [c.width, c.height, Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)]; }""")
            out["image"] = np.asarray(data, dtype=np.uint8).reshape(h, w, 4)[..., :3]
            if screenshot is not None:
                screenshot.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(screenshot))
                out["screenshot"] = str(screenshot)
        except Exception as e:  # a timeout or a crash while loading a big model: recorded, not fatal
            out["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        finally:
            with contextlib.suppress(Exception):
                page.close()
            if errors and "error" not in out:
                out["error"] = errors[0][:300]
    return out


def python_latency(export: Path, prompt: str, seed: int, threads: int, warmup: int, repeats: int) -> dict:
    """onnxruntime (Python, CPU) on the same export, inputs and steps."""
    import numpy as np
    import onnxruntime as ort

    from instaflow_edge.generator import make_noise
    from instaflow_edge.runtime import onnx_io
    from instaflow_edge.runtime.onnx import export_facts
    from instaflow_edge.runtime.sampler import tokenizer_for, unet_feed

    facts = export_facts(export)
    t0 = time.perf_counter()
    s = {n: onnx_io.session(export / n / onnx_io.MODEL_FILE, threads=threads) for n in COMPONENTS}
    load_s = time.perf_counter() - t0
    ids = tokenizer_for(export)([prompt])
    noise = make_noise([seed], facts.latent_shape).numpy()
    times: dict[str, list[float]] = {n: [] for n in (*COMPONENTS, "total")}
    image = None
    for k in range(warmup + repeats):
        t = time.perf_counter()
        start = t
        lap = {}
        ehs = s["text_encoder"].run(None, {"input_ids": ids})[0]
        lap["text_encoder"], t = (time.perf_counter() - t) * 1000, time.perf_counter()
        lat = s["unet"].run(None, unet_feed(s["unet"], noise, ehs))[0]
        lap["unet"], t = (time.perf_counter() - t) * 1000, time.perf_counter()
        img = s["vae_decoder"].run(None, {"latent_sample": (lat / facts.scaling_factor).astype(np.float32)})[0]
        lap["vae_decoder"] = (time.perf_counter() - t) * 1000
        lap["total"] = (time.perf_counter() - start) * 1000
        if k >= warmup:
            for n, v in lap.items():
                times[n].append(v)
        image = img
    pixels = (np.clip(image[0].transpose(1, 2, 0) / 2 + 0.5, 0, 1) * 255).round().astype(np.uint8)
    return {"onnxruntime": ort.__version__, "threads": threads, "load_s": round(load_s, 2),
            "ms": {n: _stats(v) for n, v in times.items()}, "image": pixels}


def psnr8(a, b) -> float | None:
    import numpy as np

    if a is None or b is None or a.shape != b.shape:
        return None
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else round(10 * np.log10(255.0**2 / mse), 2)


def web_latency(sites: list[str], prompt: str, seed: int, threads: int, warmup: int, repeats: int,
                screenshot: str | None = None, timeout_s: float = 600) -> dict:
    """Browser and onnxruntime-Python timings for each site (see the module docstring)."""
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        raise InputError(f"Debian's chromium is not installed at {CHROMIUM}", "apt-get install chromium")
    rows = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        version = browser.version
        for k, site in enumerate(sites):
            site = Path(site)
            m = read_manifest(site) or {}
            print(f"[web_latency] {site}: browser", file=sys.stderr, flush=True)
            shot = Path(screenshot) if (screenshot and k == 0) else None
            page = browser_latency(browser, site, prompt, seed, threads, warmup, repeats, shot, timeout_s)
            print(f"[web_latency] {site}: onnxruntime (Python)", file=sys.stderr, flush=True)
            py = python_latency(site / "model", prompt, seed, threads, warmup, repeats)
            row = {"site": str(site), "source": (m.get("source") or {}).get("model"),
                   "scheme": (m.get("quantize") or {}).get("scheme") or "fp32", "latent_shape": m["web"]["latent_shape"],
                   "image": [m["web"]["height"], m["web"]["width"]], "model_bytes": (m.get("sizes") or {}).get("model"),
                   "browser": {k2: v for k2, v in page.items() if k2 != "image"},
                   "python": {k2: v for k2, v in py.items() if k2 != "image"}}
            if "page_ms" in page:
                row["browser_over_python"] = {n: round(page["page_ms"][n]["median_ms"] / py["ms"][n]["median_ms"], 2)
                                              for n in (*COMPONENTS,)}
                row["browser_over_python"]["generate_total_vs_sum"] = round(
                    page["page_ms"]["total"]["median_ms"] / py["ms"]["total"]["median_ms"], 2)
                row["page_vs_python_psnr_db"] = psnr8(page.get("image"), py["image"])
            rows.append(row)
        browser.close()
    return {"prompt": prompt, "seed": seed, "threads": threads, "warmup": warmup, "repeats": repeats,
            "chromium": version, "machine": {**machine(), "cpu_model": cpu_info().get("model")},
            "note": "2-core machine; the browser's WASM backend and onnxruntime's Python CPU session use the same "
                    "thread count; each component timed around its session.run (the page with performance.now())",
            "rows": rows}


_PROBE_PAGE = """<!doctype html><meta charset="utf-8"><body><pre id="out">loading</pre><script type="module">
import * as ort from "./ort/ort.min.mjs";
ort.env.wasm.wasmPaths = new URL("./ort/", import.meta.url).href;
ort.env.wasm.numThreads = 1;
const out = document.getElementById("out");
const t0 = performance.now();
try {
  const s = await ort.InferenceSession.create("model.onnx", {executionProviders: ["wasm"]});
  const x = new ort.Tensor("float32", new Float32Array(%(k)d).fill(1), [1, %(k)d]);
  await s.run({x});
  out.dataset.state = "ok"; out.textContent = String(performance.now() - t0);
} catch (e) { out.dataset.state = "error"; out.textContent = String(e && e.message || e).slice(0, 300); }
</script>"""


def _probe_model(path: Path, mib: int, k: int = 1024) -> None:
    """A chain of MatMuls whose float32 weights total ``mib`` MiB (blocks of at most 256 MiB)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, prev = [], [], "x"
    left, i = mib, 0
    while left > 0:
        block = min(left, 256)
        n = block * 2**20 // 4 // k
        w = np.full((k, n), 1e-3, np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"h{i}"]))
        # back to k columns with a tiny reduction so the chain continues
        nodes.append(helper.make_node("ReduceSum", [f"h{i}"], [f"r{i}"], keepdims=1))
        nodes.append(helper.make_node("Expand", [f"r{i}", "shape"], [f"e{i}"]))
        prev, left, i = f"e{i}", left - block, i + 1
    inits.append(numpy_helper.from_array(np.array([1, k], np.int64), "shape"))
    graph = helper.make_graph(nodes, "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [1, k])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    external = mib * 2**20 > 1_900_000_000
    onnx.save_model(model, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
                    location="model.onnx_data")


def wasm_capacity(sizes_mib: list[int], timeout_s: float = 600) -> dict:
    """Which model sizes onnxruntime-web's WASM backend loads and runs in this Chromium: synthetic
    float32 MatMul chains of ``sizes_mib`` MiB of weights, each served as a one-file page."""
    import json
    import shutil
    import tempfile

    from playwright.sync_api import sync_playwright

    from instaflow_edge.convert.web import ORT_FILES, find_ort_web

    dist, version = find_ort_web()
    rows = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        for mib in sizes_mib:
            with tempfile.TemporaryDirectory(prefix="wasm-probe-") as d:
                site = Path(d)
                (site / "ort").mkdir()
                for f in ORT_FILES:
                    shutil.copyfile(dist / f, site / "ort" / f)
                _probe_model(site / "model.onnx", mib)
                page_text = _PROBE_PAGE % {"k": 1024}
                if (site / "model.onnx_data").exists():  # external weights: tell the session where they are
                    page_text = page_text.replace('{executionProviders: ["wasm"]}',
                                                  '{executionProviders: ["wasm"], externalData: '
                                                  '[{path: "model.onnx_data", data: "model.onnx_data"}]}')
                (site / "index.html").write_text(page_text)
                (site / "manifest.json").write_text(json.dumps({"kind": runtime.manifest_kind("web")}))
                print(f"[web_latency] capacity: {mib} MiB", file=sys.stderr, flush=True)
                page = browser.new_page()
                crashed: list[str] = []
                page.on("crash", lambda *_: crashed.append("crash"))
                row = {"weights_mib": mib}
                try:
                    with _serving(site) as url:
                        page.goto(url)
                        page.wait_for_function("document.getElementById('out').dataset.state", timeout=timeout_s * 1000)
                        state = page.get_attribute("#out", "data-state")
                        text = page.text_content("#out")
                        row.update(loaded=state == "ok", **({"load_run_ms": round(float(text), 1)} if state == "ok" else {"error": text}))
                except Exception as e:
                    row.update(loaded=False, error=("page crashed: " if crashed else "") + f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
                finally:
                    with contextlib.suppress(Exception):
                        page.close()
                rows.append(row)
        browser.close()
    return {"onnxruntime_web": version, "backend": "wasm, 1 thread", "model": "float32 MatMul chain, blocks <= 256 MiB",
            "rows": rows}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sites", nargs="*", help="folders written by convert --target web")
    ap.add_argument("--prompt", default="a handwritten seven")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--timeout", type=float, default=900, help="seconds for the page to load or generate")
    ap.add_argument("--screenshot", default=None, help="save the first site's page here (PNG)")
    ap.add_argument("--capacity", default=None,
                    help="instead: probe which model sizes (MiB of float32 weights, comma-separated) WASM loads; SITES ignored")
    ap.add_argument("--note", default=None, help="a note stored in the JSON (e.g. what else the machine was running)")
    ap.add_argument("-o", "--output", default="docs/results/web_latency.json")
    a = ap.parse_args(argv)
    if a.capacity:
        result = wasm_capacity([int(x) for x in a.capacity.split(",")], a.timeout)
        result["chromium_path"], result["machine"] = CHROMIUM, {**machine(), "cpu_model": cpu_info().get("model")}
        result["run_note"] = a.note
        for row in result["rows"]:
            print(f"{row['weights_mib']:>6} MiB: " + (f"loaded and ran in {row['load_run_ms']} ms" if row["loaded"] else f"failed: {row['error']}"))
        print(f"saved {save_result(a.output, 'wasm_capacity', result)}")
        return
    result = web_latency(a.sites, a.prompt, a.seed, a.threads, a.warmup, a.repeats, a.screenshot, a.timeout)
    result["run_note"] = a.note
    for row in result["rows"]:
        b = row["browser"]
        if "page_ms" not in b:
            print(f"{row['site']}: browser: {b.get('error')}")
            continue
        comp = " ".join(f"{n} {b['page_ms'][n]['median_ms']:.1f}/{row['python']['ms'][n]['median_ms']:.1f}" for n in COMPONENTS)
        print(f"{row['site']} ({row['scheme']}): {b['backend']}; ms browser/python: {comp}; total "
              f"{b['page_ms']['total']['median_ms']:.1f}/{row['python']['ms']['total']['median_ms']:.1f}; "
              f"page vs python {row['page_vs_python_psnr_db']} dB")
    path = save_result(a.output, "web_latency", result)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
