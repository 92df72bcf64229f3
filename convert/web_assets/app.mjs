// The page: token ids (clip_tokenizer.mjs) and noise (torch_randn.mjs) exactly as the Python pipeline makes
// them, then text encoder -> one-step UNet (sample + v at timestep 1000) -> VAE decoder with
// onnxruntime-web, and the image converted to 8 bits as `instaflow-edge generate` does. With a starting
// image, image to image as `generate --image --strength S`: VAE encoder, the straight-path point
// (1 - S)·x1 + S·z, the UNet graph at timestep 1000·S (its input ÷ r(t)), the decoder.
// Everything it loads is in this folder (manifest.json says where); nothing comes from the network.
import * as ort from "./ort/ort.min.mjs";
import { ClipTokenizer } from "./clip_tokenizer.mjs";
import { torchRandn } from "./torch_randn.mjs";

const $ = (id) => document.getElementById(id);
const f = Math.fround;
const params = new URLSearchParams(location.search);
const state = { ready: false, busy: false, runs: 0, last: null, backend: null, threads: null, load_ms: null };
window.instaflow = state;

function setStatus(text, kind) {
  $("status").textContent = text;
  $("status").dataset.state = kind;
}

async function pickBackend() {
  const asked = params.get("backend");
  if (asked === "wasm" || asked === "webgpu") return asked;
  if (navigator.gpu) {
    try {
      if (await navigator.gpu.requestAdapter()) return "webgpu";
    } catch (e) { /* no adapter: WASM */ }
  }
  return "wasm";
}

function threadCount() {
  const asked = parseInt(params.get("threads") || "", 10);
  if (!crossOriginIsolated) return 1; // SharedArrayBuffer (WASM threads) needs COOP/COEP: `instaflow-edge serve`
  if (asked > 0) return asked;
  return Math.max(1, Math.min(navigator.hardwareConcurrency || 1, 8));
}

async function fetchJson(url) {
  const r = await fetch(url);
  if (!r.ok) throw new Error(`${url}: HTTP ${r.status}`);
  return r.json();
}

async function fetchText(url) {
  const r = await fetch(url);
  if (!r.ok) throw new Error(`${url}: HTTP ${r.status}`);
  return r.text();
}

function openSession(spec) {
  const options = { executionProviders: [state.backend], graphOptimizationLevel: "all" };
  if (spec.external_data && spec.external_data.length) {
    options.externalData = spec.external_data.map((e) => ({ path: e.path, data: e.url }));
  }
  return ort.InferenceSession.create(spec.url, options);
}

async function load() {
  const t0 = performance.now();
  const manifest = await fetchJson("manifest.json");
  const web = manifest.web;
  state.web = web;
  $("title").textContent = `instaflow-edge · ${web.title}`;
  document.title = `instaflow-edge · ${web.title}`;
  $("prompt").value = params.get("prompt") || web.example_prompt || "";
  const tk = web.tokenizer;
  state.tokenizer = new ClipTokenizer(await fetchJson(tk.vocab), await fetchText(tk.merges), tk);

  state.backend = await pickBackend();
  state.threads = state.backend === "wasm" ? threadCount() : null;
  ort.env.wasm.wasmPaths = new URL("./ort/", import.meta.url).href;
  ort.env.wasm.numThreads = state.threads || 1;
  ort.env.wasm.proxy = false;
  $("backend").textContent = state.backend === "webgpu" ? "WebGPU"
    : `WASM, ${state.threads} thread${state.threads === 1 ? "" : "s"}${crossOriginIsolated ? " (cross-origin isolated)" : " (not cross-origin isolated: one thread)"}`;

  state.sessions = {};
  for (const [name, spec] of Object.entries(web.components)) {
    if (name === "vae_encoder") continue; // image to image only: loaded on the first edit
    setStatus(`Loading ${name}…`, "loading");
    state.sessions[name] = await openSession(spec);
  }
  const canEdit = Boolean(web.components.vae_encoder) && web.unet_timestep === "straight-path";
  $("edit").hidden = !canEdit;
  state.load_ms = performance.now() - t0;
  state.ready = true;
  $("generate").disabled = false;
  setStatus(`Ready (models loaded in ${(state.load_ms / 1000).toFixed(2)} s).`, "ready");
}

function parseSeed(text) {
  const s = String(text).trim();
  if (!/^\d+$/.test(s)) throw new Error("the seed must be a whole number from 0 to 2^63 - 1");
  const v = BigInt(s);
  if (v >= 2n ** 63n) throw new Error("the seed must be below 2^63");
  return v;
}

function roundHalfEven(x) {
  const r = Math.round(x);
  return (r - x === 0.5 && r % 2 !== 0) ? r - 1 : r;
}

/** Image in [-1, 1] (1, 3, H, W) -> RGBA bytes, as generate does in float32:
 *  clip(x / 2 + 0.5, 0, 1) * 255, rounded half to even. */
function toRgba(data, h, w) {
  const out = new Uint8ClampedArray(h * w * 4);
  const plane = h * w;
  for (let c = 0; c < 3; c++) {
    for (let i = 0; i < plane; i++) {
      let v = f(f(data[c * plane + i] / 2) + 0.5);
      v = Math.min(1, Math.max(0, v));
      out[i * 4 + c] = roundHalfEven(f(v * 255));
    }
  }
  for (let i = 0; i < plane; i++) out[i * 4 + 3] = 255;
  return out;
}

function parseStrength(text) {
  const s = String(text).trim();
  const v = Number(s);
  if (s === "" || !Number.isFinite(v) || v <= 0 || v > 1) throw new Error("the strength must be a number in (0, 1]");
  return v;
}

/** The starting image as generate reads it: RGB bytes, v / 127.5 - 1 in float32, planar (1, 3, H, W).
 *  An image of another size is scaled by the browser (generate resizes bicubic: pixels differ). */
async function imageInput(file, h, w) {
  const bitmap = await createImageBitmap(file, { colorSpaceConversion: "none", premultiplyAlpha: "none" });
  const canvas = new OffscreenCanvas(w, h);
  const ctx = canvas.getContext("2d", { colorSpace: "srgb" });
  ctx.imageSmoothingQuality = "high";
  ctx.drawImage(bitmap, 0, 0, w, h);
  const rgba = ctx.getImageData(0, 0, w, h).data;
  const plane = h * w;
  const out = new Float32Array(3 * plane);
  for (let c = 0; c < 3; c++) {
    for (let i = 0; i < plane; i++) out[c * plane + i] = f(f(rgba[i * 4 + c] / 127.5) - 1);
  }
  return { data: out, resized: bitmap.width !== w || bitmap.height !== h };
}

async function generate(prompt, seedText, edit) {
  const web = state.web;
  const seed = parseSeed(seedText);
  const strength = edit ? parseStrength(edit.strength) : 1;
  const ms = {};
  let t = performance.now();
  const t0 = t;
  const lap = (name) => { const now = performance.now(); ms[name] = now - t; t = now; };

  const ids = state.tokenizer.encode(prompt);
  lap("tokenizer");
  const [c, lh, lw] = web.latent_shape;
  const noise = torchRandn([c, lh, lw], seed);
  lap("noise");
  const s = state.sessions;
  const ehs = (await s.text_encoder.run({ input_ids: new ort.Tensor("int64", ids, [1, ids.length]) })).last_hidden_state;
  lap("text_encoder");
  let sample = noise;
  let timestep = 1000;
  let resized = false;
  if (edit && strength !== 1) {
    // sampler.edit in float32: x1 = mean · scaling_factor; x = (1 - S)·x1 + S·z; the graph takes x / r(t)
    if (!s.vae_encoder) s.vae_encoder = await openSession(web.components.vae_encoder);
    const img = await imageInput(edit.file, web.height, web.width);
    resized = img.resized;
    const mean = await (await s.vae_encoder.run({ sample: new ort.Tensor("float32", img.data, [1, 3, web.height, web.width]) }))
      .latent_sample.getData();
    lap("vae_encoder");
    const sf = f(web.scaling_factor);
    const a = f(1 - strength), b = f(strength);
    timestep = f(1000 * strength);
    const t = 1000 * strength;
    const r = f(Math.sqrt((1000 - t) ** 2 + t ** 2) / 1000);
    sample = new Float32Array(noise.length);
    for (let i = 0; i < noise.length; i++) sample[i] = f(f(f(a * f(mean[i] * sf)) + f(b * noise[i])) / r);
  }
  const feed = { sample: new ort.Tensor("float32", sample, [1, c, lh, lw]), encoder_hidden_states: ehs };
  if (s.unet.inputNames.includes("timestep")) feed.timestep = new ort.Tensor("float32", Float32Array.of(timestep), [1]);
  const lat = (await s.unet.run(feed)).out_sample;
  lap("unet");
  const latData = await lat.getData();
  const sf = f(web.scaling_factor);
  const scaled = new Float32Array(latData.length);
  for (let i = 0; i < latData.length; i++) scaled[i] = f(latData[i] / sf);
  const img = (await s.vae_decoder.run({ latent_sample: new ort.Tensor("float32", scaled, lat.dims) })).sample;
  const imgData = await img.getData();
  lap("vae_decoder");
  const [, , h, w] = img.dims;
  for (const x of imgData) {
    if (!Number.isFinite(x)) throw new Error("NaN/Inf in the image (an fp16 export overflowed: use the fp32 or int8 export)");
  }
  const canvas = $("image");
  canvas.width = w;
  canvas.height = h;
  canvas.getContext("2d").putImageData(new ImageData(toRgba(imgData, h, w), w, h), 0, 0);
  lap("to_image");
  ms.total = performance.now() - t0;
  return { prompt, seed: seed.toString(), ms, height: h, width: w, strength: edit ? strength : null, resized };
}

function showLatency(ms) {
  const body = $("latency").querySelector("tbody");
  body.replaceChildren();
  for (const [name, v] of Object.entries(ms)) {
    const tr = document.createElement("tr");
    tr.dataset.component = name;
    tr.innerHTML = `<td>${name}</td><td class="ms">${v.toFixed(1)} ms</td>`;
    body.appendChild(tr);
  }
}

$("form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  if (!state.ready || state.busy) return;
  state.busy = true;
  $("generate").disabled = true;
  setStatus("Generating…", "busy");
  try {
    const file = $("edit").hidden ? null : $("start").files[0];
    const r = await generate($("prompt").value, $("seed").value, file ? { file, strength: $("strength").value } : null);
    state.last = r;
    state.runs += 1;
    showLatency(r.ms);
    const how = r.strength === null ? "" : `, edited at strength ${r.strength}${r.resized ? " (the image was scaled to the model's size)" : ""}`;
    setStatus(`Done: seed ${r.seed}, ${r.width}×${r.height}${how}, ${r.ms.total.toFixed(1)} ms.`, "done");
  } catch (e) {
    state.last = null;
    setStatus(`Error: ${e.message}`, "error");
  } finally {
    state.busy = false;
    $("generate").disabled = false;
  }
});

load().catch((e) => setStatus(`Error: ${e.message}`, "error"));
