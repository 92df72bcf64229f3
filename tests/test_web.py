"""``convert --target web`` and ``serve``: the page's ports, the site, and the page itself in Chromium.

- The JS ports run in node (tests/js/): ``torch_randn.mjs`` against ``torch.randn`` (bit for bit, seeds
  and shapes on both of torch's paths, under and over 16 elements), ``clip_tokenizer.mjs`` against the
  Python tokenizer (punctuation, case, unknown words, accents, emoji, special tokens, truncation).
- The site for the tiny preset: its layout and manifest, ``serve``'s headers and MIME types (a real
  subprocess), bad inputs as one line with nothing written.
- The page in Debian's Chromium (Playwright's Python API, ``executable_path``, no browser download),
  headless, served on 127.0.0.1: type a prompt and a seed, click Generate, read the canvas pixels and
  compare them with ``generate --backend onnx`` on the site's own export: PSNR (8-bit, peak 255) ≥ 40 dB,
  figure printed; identical is the aim. Tiny fp32 runs by default; tiny int8-static and a digits one-step
  student (fp32, int8-static) are marked slow.
Browser tests skip, saying why, when chromium, playwright or onnxruntime-web (npm ci) is missing.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from instaflow_edge.cli import app

JS = Path(__file__).resolve().parent / "js"
CHROMIUM = "/usr/bin/chromium"
GATE_DB = 40.0

needs_node = pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed (the JS ports run in node)")


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def node(script: str, payload) -> object:
    r = subprocess.run(["node", str(JS / script)], input=json.dumps(payload), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout)


def ort_web_or_skip():
    from instaflow_edge.convert.web import find_ort_web
    from instaflow_edge.errors import MissingDependencyError

    try:
        return find_ort_web()
    except MissingDependencyError as e:
        pytest.skip(f"onnxruntime-web is not installed (npm ci): {e}")


# ---------------------------------------------------------------------------------------------------
# the JS ports


@needs_node
def test_torch_randn_port_is_bit_identical_to_torch():
    import torch

    shapes = [[1], [2], [3], [7], [15], [16], [17], [31], [32], [33], [100], [3, 5], [2, 2, 2, 2], [4, 8, 8],
              [4, 8, 12], [1, 4, 13, 7], [4, 64, 64]]
    seeds = [0, 1, 42, 7, 123456789, 2**32 - 1, 2**32 + 5, 2**40 + 7, 2**63 - 1]
    cases = [(s, seed) for seed in seeds for s in shapes]
    got = node("randn.mjs", [[s, str(seed)] for s, seed in cases])
    for (shape, seed), bits in zip(cases, got):
        ref = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed)).flatten().numpy().view(np.uint32)
        mine = np.asarray(bits, dtype=np.uint32)
        bad = int((ref != mine).sum())
        assert bad == 0, (f"shape {shape} seed {seed}: {bad} of {ref.size} values differ "
                          f"(max {np.abs(ref.view(np.float32) - mine.view(np.float32)).max()})")


PROMPTS = [
    "a red fox in snow", "A Red FOX in Snow", "a red fox, in snow!!", "a cat wearing a hat... (watercolor)",
    "Hello, World!! a handwritten 7 élan café's", "don't stop; it's 12:30 p.m. — ok?", "  lots   of\tspaces\n\nnew lines ",
    "emoji 🦊 fox 😀😀", "ΣΊΣΥΦΟΣ İstanbul straße", "<|endoftext|> inside <|startoftext|>text", "x" * 300,
    " ".join(["word"] * 100), "", "ｆｕｌｌ ｗｉｄｔｈ ＡＢＣ", "e\u0301 combining", "nbsp\u00a0em\u2003space", "中文字符 日本語",
    "'s 'll 'd '''s", "a handwritten seven", "the digit 3, drawn by hand", "zzqx unknownword qwertyuiop 4k 8k hd",
]


def _framing(tok) -> dict:
    return {"bos_id": tok.bos_token_id, "eos_id": tok.eos_token_id, "pad_id": tok.pad_token_id, "unk_id": tok.unk_token_id,
            "max_length": tok.model_max_length, "specials": {t: tok.convert_tokens_to_ids(t) for t in (tok.bos_token, tok.eos_token)}}


@needs_node
def test_clip_tokenizer_port_matches_python(tiny_dir, tmp_path):
    from transformers import CLIPTokenizer

    from instaflow_edge.convert.web import tokenizer_facts
    from instaflow_edge.data import prompt_vocabulary
    from instaflow_edge.tokenizer import build_tokenizer

    folders = {"tiny": tiny_dir / "tokenizer", "digits": tmp_path / "digits-tok"}
    build_tokenizer(prompt_vocabulary(), folders["digits"]).save_pretrained(str(folders["digits"]))
    for name, folder in folders.items():
        tok = CLIPTokenizer.from_pretrained(str(folder))
        framing = _framing(tok)
        assert tokenizer_facts(folder) == framing  # what convert writes for the page is what Python uses
        ref = [tok(p, padding="max_length", max_length=77, truncation=True).input_ids for p in PROMPTS]
        got = node("tokenize.mjs", {"folder": str(folder), "framing": framing, "prompts": PROMPTS})
        for p, a, b in zip(PROMPTS, ref, got):
            assert a == b, f"{name}: {p!r}: python {a[:24]} vs port {b[:24]}"
        assert len({tuple(r) for r in ref}) > len(PROMPTS) - 3  # the prompts do tokenize differently


# ---------------------------------------------------------------------------------------------------
# the site


@pytest.fixture(scope="module")
def tiny_site(tmp_path_factory, tiny_dir):
    ort_web_or_skip()
    out = tmp_path_factory.mktemp("web") / "site"
    r = run("convert", tiny_dir, "--target", "web", "-o", out)
    assert r.exit_code == 0, r.output
    return out, r.output


def test_site_layout_and_manifest(tiny_site):
    from instaflow_edge.convert.web import ORT_FILES, PAGE_FILES

    site, output = tiny_site
    assert "end_to_end" in output  # the export's parity table is printed
    for name in (*PAGE_FILES, "manifest.json", *(f"ort/{f}" for f in ORT_FILES)):
        assert (site / name).is_file(), name
    for name in ("text_encoder", "unet", "vae_decoder"):
        assert (site / "model" / name / "model.onnx").is_file()
    assert (site / "model" / "tokenizer" / "vocab.json").is_file() and (site / "model" / "tokenizer" / "merges.txt").is_file()
    m = json.loads((site / "manifest.json").read_text())
    assert m["kind"] == "web-site" and m["config"]["target"] == "web"
    web = m["web"]
    assert web["latent_shape"] == [4, 8, 8] and web["height"] == 64 and web["scaling_factor"] == pytest.approx(0.18215)
    for spec in web["components"].values():
        assert (site / spec["url"]).is_file() and spec["external_data"] == []
    assert web["onnxruntime_web"]["version"] == json.loads(Path("package.json").read_text())["dependencies"]["onnxruntime-web"]
    assert all(row["psnr"] >= m["gates"][row["component"]] for row in m["parity"])
    # nothing is fetched from elsewhere: every URL the page imports is relative
    for name in PAGE_FILES:
        text = (site / name).read_text()
        assert "http://" not in text and "https://" not in text and "cdn" not in text.lower()
    assert not list(site.parent.glob(".site.*"))  # no temporary folder or lock left


def test_serve_subprocess_headers_and_types(tiny_site):
    site, _ = tiny_site
    proc = subprocess.Popen([sys.executable, "-m", "instaflow_edge.cli", "serve", str(site), "--port", "0", "--quiet"],
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        assert "http://127.0.0.1:" in line, line
        url = line.split("at ", 1)[1].split()[0]
        with urllib.request.urlopen(url) as r:
            assert r.headers["Cross-Origin-Opener-Policy"] == "same-origin"
            assert r.headers["Cross-Origin-Embedder-Policy"] == "require-corp"
            assert b"Generate" in r.read()
        types = {"app.mjs": "text/javascript", "ort/ort-wasm-simd-threaded.jsep.wasm": "application/wasm",
                 "manifest.json": "application/json", "model/unet/model.onnx": "application/octet-stream"}
        for path, want in types.items():
            with urllib.request.urlopen(url + path) as r:
                assert r.headers["Content-Type"].startswith(want), (path, r.headers["Content-Type"])
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(url + "../../etc/passwd")
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _one_line_error(r, *words):
    assert r.exit_code != 0
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in r.output, r.output
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_without_onnxruntime_web_is_one_line(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("INSTAFLOW_EDGE_ORT_WEB", str(tmp_path / "empty"))
    out = tmp_path / "site"
    _one_line_error(run("convert", tiny_dir, "--target", "web", "-o", out), "onnxruntime-web", "npm ci")
    assert not out.exists()
    monkeypatch.setenv("PATH", str(tmp_path))  # no npm on the PATH: say how to get it
    _one_line_error(run("convert", tiny_dir, "--target", "web", "-o", out), "npm is not installed", "apt-get install npm")
    assert not out.exists()


def test_bad_inputs_are_one_line(tiny_dir, tiny_site, tmp_path):
    ort_web_or_skip()
    site, _ = tiny_site
    before = sorted(p.name for p in site.iterdir())
    # an existing site without --force
    _one_line_error(run("convert", tiny_dir, "--target", "web", "-o", site), "already exists", "--force")
    assert sorted(p.name for p in site.iterdir()) == before
    # a multi-step model
    multi = tmp_path / "multi"
    shutil.copytree(tiny_dir, multi)
    m = json.loads((multi / "manifest.json").read_text())
    m["model"]["default_steps"] = 4
    (multi / "manifest.json").write_text(json.dumps(m))
    out = tmp_path / "out"
    _one_line_error(run("convert", multi, "--target", "web", "-o", out), "runs one step", "4 steps")
    assert not out.exists()
    # an ONNX export given with an option that would shape a new export
    _one_line_error(run("convert", site / "model", "--target", "web", "--quantize", "int8-static", "-o", out),
                    "--quantize", "already")
    # options of other targets, --fused
    _one_line_error(run("convert", tiny_dir, "--target", "web", "--fused", "-o", out), "--fused")
    _one_line_error(run("convert", tiny_dir, "--target", "web", "--compress", "palettize-6", "-o", out), "--compress")
    assert not out.exists()
    # serve: not a site, a bad port
    _one_line_error(run("serve", tiny_dir), "not a site")
    _one_line_error(run("serve", tmp_path / "nowhere"), "not a folder")
    _one_line_error(run("serve", site, "--port", "70000"), "70000")


def test_an_onnx_export_is_copied_as_is(tiny_site, tmp_path):
    site, _ = tiny_site
    out = tmp_path / "again"
    r = run("convert", site / "model", "--target", "web", "-o", out)
    assert r.exit_code == 0, r.output
    m = json.loads((out / "manifest.json").read_text())
    assert m["source"]["kind"] == "onnx-export"
    for name in ("text_encoder", "unet", "vae_decoder"):
        assert (out / "model" / name / "model.onnx").read_bytes() == (site / "model" / name / "model.onnx").read_bytes()


# ---------------------------------------------------------------------------------------------------
# the page in Chromium


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"Debian's chromium is not installed at {CHROMIUM} (apt-get install chromium; .ci/run does it as root)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[browser]')")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield b
        b.close()


@contextlib.contextmanager
def serving(site: Path):
    from instaflow_edge.convert.web import site_server

    server = site_server(site, 0, quiet=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def page_images(browser, site: Path, jobs: list[tuple[str, int]], screenshot: Path | None = None, query: str = "backend=wasm"):
    """For each (prompt, seed): type them, click Generate, read the canvas. Returns (images, page facts)."""
    images, runs = [], []
    with serving(site) as url:
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        try:
            page.goto(url + "?" + query)
            page.wait_for_function("document.getElementById('status').dataset.state !== 'loading'", timeout=180_000)
            assert page.get_attribute("#status", "data-state") == "ready", page.text_content("#status")
            for k, (prompt, seed, *edit) in enumerate(jobs):
                page.fill("#prompt", prompt)
                page.fill("#seed", str(seed))
                if edit:  # (prompt, seed, starting image, strength): image to image
                    page.set_input_files("#start", str(edit[0]))
                    page.fill("#strength", str(edit[1]))
                page.click("#generate")
                page.wait_for_function(f"window.instaflow.runs === {k + 1} || "
                                       "document.getElementById('status').dataset.state === 'error'", timeout=180_000)
                assert page.get_attribute("#status", "data-state") == "done", page.text_content("#status")
                w, h, data = page.evaluate("""() => { const c = document.getElementById('image');
                    return [c.width, c.height, Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)]; }""")
                images.append(np.asarray(data, dtype=np.uint8).reshape(h, w, 4)[..., :3])
                runs.append(page.evaluate("window.instaflow.last"))
            facts = {"backend": page.text_content("#backend"), "runs": runs,
                     "latency_rows": page.eval_on_selector_all("#latency tr", "rows => rows.map(r => r.dataset.component)")}
            if screenshot is not None:
                page.screenshot(path=str(screenshot))
        finally:
            page.close()
        assert not errors, errors
    return images, facts


def generate_images(model: Path, jobs: list[tuple[str, int]], out: Path) -> list[np.ndarray]:
    from PIL import Image

    images = []
    for k, (prompt, seed) in enumerate(jobs):
        r = run("generate", model, prompt, "--seed", seed, "--backend", "onnx", "-o", out / str(k))
        assert r.exit_code == 0, r.output
        file = json.loads((out / str(k) / "manifest.json").read_text())["images"][0]["file"]
        images.append(np.asarray(Image.open(out / str(k) / file).convert("RGB")))
    return images


def psnr8(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


JOBS = {"tiny": [("a red fox in snow", 0), ("A cat, wearing a HAT!", 2**40 + 3)],
        "digits": [("a handwritten seven", 0), ("a handwritten digit 3", 12345)]}


def check_page_matches_generate(browser, site: Path, preset: str, tmp_path: Path) -> list[float]:
    jobs = JOBS[preset]
    shot = tmp_path / f"web-{preset}.png"
    page, facts = page_images(browser, site, jobs, screenshot=shot)
    ref = generate_images(site / "model", jobs, tmp_path / "generate")
    figures = [round(psnr8(a, b), 2) for a, b in zip(page, ref)]
    print(f"\n{preset} {site.name}: page vs generate --backend onnx, PSNR (8-bit) {figures} dB; "
          f"max |diff| {[int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(page, ref)]}; {facts['backend']}")
    assert all(p >= GATE_DB for p in figures), figures
    assert page[0].shape == ref[0].shape and not np.array_equal(page[0], page[1])  # prompts/seeds change the image
    assert facts["backend"].startswith("WASM") and "thread" in facts["backend"]
    assert facts["latency_rows"][:5] == ["tokenizer", "noise", "text_encoder", "unet", "vae_decoder"]
    assert shot.is_file() and shot.stat().st_size > 1000
    return figures


def test_page_matches_generate_tiny_fp32(browser, tiny_site, tmp_path):
    site, _ = tiny_site
    check_page_matches_generate(browser, site, "tiny", tmp_path)


def test_page_edits_as_generate_does(browser, tiny_site, tmp_path):
    """Image to image on the page (a starting image at the model's size, two strengths): the image of
    ``generate SITE/model --backend onnx --image START --strength S``, ≥ 40 dB."""
    from PIL import Image

    site, _ = tiny_site
    rng = np.random.default_rng(2)
    yy, xx = np.mgrid[0:64, 0:64]
    start = tmp_path / "start.png"
    Image.fromarray((np.stack([xx * 4, yy * 3, (xx + yy) * 2], -1) % 256 + rng.integers(0, 25, (64, 64, 3)))
                    .clip(0, 255).astype(np.uint8)).save(start)
    jobs = [("a red fox in snow", 3, start, 0.6), ("a cat wearing a hat", 9, start, 0.35)]
    page, facts = page_images(browser, site, jobs)
    figures = []
    for k, (prompt, seed, image, strength) in enumerate(jobs):
        out = tmp_path / f"edit-{k}"
        r = run("generate", site / "model", prompt, "--seed", seed, "--backend", "onnx", "--image", image,
                "--strength", strength, "-o", out)
        assert r.exit_code == 0, r.output
        ref = np.asarray(Image.open(next(out.glob("*.png"))).convert("RGB"))
        figures.append(round(psnr8(page[k], ref), 2))
        assert facts["runs"][k]["strength"] == strength and not facts["runs"][k]["resized"]
    print(f"\nimage to image on the page vs generate --image: {figures} dB")
    assert all(p >= GATE_DB for p in figures), figures
    assert "vae_encoder" in facts["latency_rows"]
    text_only, _ = page_images(browser, site, [jobs[0][:2]])
    assert psnr8(text_only[0], page[0]) < GATE_DB  # the edit is not the text-to-image picture


def test_page_refuses_a_bad_seed(browser, tiny_site):
    site, _ = tiny_site
    with serving(site) as url:
        page = browser.new_page()
        try:
            page.goto(url + "?backend=wasm")
            page.wait_for_function("window.instaflow && window.instaflow.ready", timeout=180_000)
            for seed, words in (("-1", "whole number"), ("abc", "whole number"), (str(2**63), "below 2^63")):
                page.fill("#seed", seed)
                page.click("#generate")
                page.wait_for_function("document.getElementById('status').dataset.state === 'error'", timeout=60_000)
                assert words in page.text_content("#status")
                assert page.evaluate("window.instaflow.runs") == 0
        finally:
            page.close()


@pytest.mark.slow
def test_page_matches_generate_tiny_int8(browser, tiny_dir, tmp_path):
    ort_web_or_skip()
    site = tmp_path / "site-int8"
    r = run("convert", tiny_dir, "--target", "web", "--quantize", "int8-static", "-o", site)
    assert r.exit_code == 0, r.output
    check_page_matches_generate(browser, site, "tiny", tmp_path)


@pytest.fixture(scope="module")
def digits_student(tmp_path_factory) -> Path:
    """A digits one-step student made by our own recipe, as tests/test_optimum.py makes it (a minute or two):
    the digits preset's architecture, scaling factor and 4× VAE, train distill's one-step manifest."""
    import instaflow_edge.digits  # noqa: F401  (registers the digits preset)
    from instaflow_edge.presets import InitConfig, init
    from instaflow_edge.train.reflow import DistillConfig, train_distill
    from instaflow_edge.train.reflow_data import ReflowDataConfig, make_reflow_data

    root = tmp_path_factory.mktemp("digits")
    init(InitConfig(preset="digits", output=str(root / "base"), seed=0, progress=False,
                    options={"vae_steps": 30, "text_steps": 20}))
    make_reflow_data(ReflowDataConfig(teacher=str(root / "base"), output=str(root / "pairs"), data="digits", num_pairs=16,
                                      steps=2, guidance=1.0, seed=1, device="cpu", batch_size=16), progress=False)
    train_distill(DistillConfig(model=str(root / "base"), pairs=str(root / "pairs"), output=str(root / "student"),
                                max_steps=4, batch_size=8, checkpoint_every=0, cpu=True, progress=False, seed=0))
    return root / "student"


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["fp32", "int8-static"])
def test_page_matches_generate_digits(browser, digits_student, scheme, tmp_path):
    ort_web_or_skip()
    site = tmp_path / f"site-{scheme}"
    quant = ["--quantize", scheme] if scheme != "fp32" else []
    r = run("convert", digits_student, "--target", "web", *quant, "-o", site)
    assert r.exit_code == 0, r.output
    assert json.loads((site / "manifest.json").read_text())["web"]["latent_shape"] == [4, 8, 8]
    check_page_matches_generate(browser, site, "digits", tmp_path)


def _fake_site(root: Path) -> Path:
    """A folder ``serve`` accepts (a web-site manifest and index.html), with links out of it planted."""
    site = root / "site"
    (site / "model").mkdir(parents=True)
    (site / "manifest.json").write_text(json.dumps({"kind": "web-site"}))
    (site / "index.html").write_text("<!doctype html><p>Generate</p>")
    (site / "model" / "unet.onnx").write_bytes(b"\0" * 16)
    secret = root / "secret.txt"
    secret.write_text("the server's own file\n")
    (site / "leak.txt").symlink_to(secret)  # a file link out of the site
    (site / "model" / "etc").symlink_to(root)  # a folder link out of the site
    (site / "inside.onnx").symlink_to(site / "model" / "unet.onnx")  # a link that stays inside: served
    (site / "empty").mkdir()  # a folder without index.html: no listing
    return site


def test_serve_sends_only_regular_files_inside_the_site(tmp_path):
    site = _fake_site(tmp_path)
    with serving(site) as url:
        with urllib.request.urlopen(url) as r:
            assert b"Generate" in r.read()
        with urllib.request.urlopen(url + "model/unet.onnx") as r:
            assert r.read() == b"\0" * 16
        with urllib.request.urlopen(url + "inside.onnx") as r:
            assert r.read() == b"\0" * 16
        for path in ("leak.txt", "model/etc/secret.txt", "model/etc/", "model/etc", "empty/", "model/",
                     "%2e%2e/secret.txt", "model/%2e%2e/%2e%2e/secret.txt"):
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(url + path)
            assert e.value.code == 404, path


def test_serve_sigterm_exits_143_and_ctrl_c_0(tmp_path):
    import signal

    site = _fake_site(tmp_path)
    for sig, code in ((signal.SIGTERM, 143), (signal.SIGINT, 0)):
        proc = subprocess.Popen([sys.executable, "-m", "instaflow_edge.cli", "serve", str(site), "--port", "0", "--quiet"],
                                stderr=subprocess.PIPE, text=True)
        try:
            assert "http://127.0.0.1:" in proc.stderr.readline()
            proc.send_signal(sig)
            assert proc.wait(timeout=20) == code
            rest = proc.stderr.read()
            assert "Traceback" not in rest and ("SIGTERM" in rest if code else "stopped" in rest), rest
        finally:
            proc.kill()
            proc.wait()
