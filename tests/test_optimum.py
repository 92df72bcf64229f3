"""optimum's own pipeline on our ONNX exports (slow): ``ORTStableDiffusionPipeline.from_pretrained(EXPORT)``
then ``pipe(prompt, num_inference_steps=1, guidance_scale=…, latents=…)``, as optimum's docs show, must give
the image ``generate --backend onnx`` gives for the same prompt and seed (≥ 60 dB; in practice identical),
for the tiny preset and a digits one-step student, fp32 and int8-static. ``ORTDiffusionPipeline`` (the
generic class) and a batch of two prompts are checked too. docs/optimum.md says why the export's
scheduler makes this exact.

optimum cannot share our venv (optimum-onnx 0.1.0 needs transformers < 4.58, hence huggingface_hub < 1.0;
our diffusers needs huggingface_hub ≥ 1.32), so it runs in a venv of its own, built here with
:data:`OPTIMUM_PINS` when absent or when its versions differ, and reused between runs:
``$INSTAFLOW_EDGE_OPTIMUM_VENV`` (default ``~/.cache/instaflow-edge/optimum-venv``). Building it needs
the packages from the package index (torch first: any other torch request pulls a multi-GB CUDA build).
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from instaflow_edge.cli import app

pytestmark = pytest.mark.slow
pytest.importorskip("onnxruntime")

# optimum's venv, in install order: one pip call per group
OPTIMUM_PINS = (
    ("torch==2.13.0",),  # alone and first, as make setup does: anything else pulls a multi-GB CUDA build
    ("optimum==2.1.0", "optimum-onnx==0.1.0", "diffusers==0.39.0", "transformers==4.57.6",
     "onnxruntime==1.32.0", "huggingface_hub==0.36.2", "numpy<2.4", "pillow"),
)
VENV_ENV = "INSTAFLOW_EDGE_OPTIMUM_VENV"
GATE_DB = 60.0
PROMPTS = {"tiny": ["a red fox in snow", "a cat wearing a hat"],
           "digits": ["a handwritten seven", "a handwritten digit 3"]}

CHILD = r'''
"""Runs in optimum's venv: each job is one pipeline call as optimum's docs write it; images saved as PNG."""
import json, sys
from importlib import metadata

import numpy as np
import torch
import optimum.onnxruntime as ort_pipelines

jobs = json.loads(open(sys.argv[1]).read())
report = {"versions": {p: metadata.version(p) for p in ("optimum", "optimum-onnx", "diffusers", "transformers",
                                                          "onnxruntime", "torch")}, "jobs": []}
pipes = {}
for job in jobs:
    key = (job["class"], job["export"])
    if key not in pipes:
        pipes[key] = getattr(ort_pipelines, job["class"]).from_pretrained(job["export"])
    pipe = pipes[key]
    prompt = job["prompts"][0] if len(job["prompts"]) == 1 else job["prompts"]
    if job.get("image"):  # image-to-image: optimum's own call, the pipeline draws the noise
        from PIL import Image

        images = pipe(prompt, image=Image.open(job["image"]).convert("RGB"), strength=job["strength"],
                      num_inference_steps=job["steps"], guidance_scale=job["guidance"],
                      generator=torch.Generator("cpu").manual_seed(job["seed"])).images
        files = []
        for i, image in enumerate(images):
            files.append(f"{job['out']}-{i}.png")
            image.save(files[-1])
        report["jobs"].append({**job, "files": files, "pipeline": type(pipe).__name__,
                               "scheduler": type(pipe.scheduler).__name__})
        continue
    if job.get("latents"):
        noise = {"latents": torch.from_numpy(np.load(job["latents"]))}
    else:  # the pipeline draws the noise: a CPU generator seeded as generate seeds it
        noise = {"generator": torch.Generator("cpu").manual_seed(job["seed"])}
    images = pipe(prompt, num_inference_steps=1, guidance_scale=job["guidance"], **noise).images
    files = []
    for i, image in enumerate(images):
        files.append(f"{job['out']}-{i}.png")
        image.save(files[-1])
    report["jobs"].append({**job, "files": files, "pipeline": type(pipe).__name__,
                           "scheduler": type(pipe.scheduler).__name__, "timesteps": pipe.scheduler.timesteps.tolist()})
json.dump(report, open(sys.argv[2], "w"), indent=2)
'''


def _pinned_versions() -> dict[str, str]:
    return {spec.split("==")[0]: spec.split("==")[1] for group in OPTIMUM_PINS for spec in group if "==" in spec}


def _installed(python: Path) -> dict[str, str] | None:
    if not python.exists():
        return None
    code = ("import json, sys; from importlib import metadata as m\n"
            "out = {}\n"
            "for p in sys.argv[1:]:\n"
            "    try: out[p] = m.version(p)\n"
            "    except m.PackageNotFoundError: out[p] = None\n"
            "print(json.dumps(out))")
    r = subprocess.run([str(python), "-c", code, *_pinned_versions()], check=False, capture_output=True, text=True)
    return json.loads(r.stdout) if r.returncode == 0 else None


def _matches(installed: dict | None) -> bool:
    return installed is not None and all((installed.get(p) or "").split("+")[0] == v for p, v in _pinned_versions().items())


def optimum_python() -> Path:
    """optimum's venv python: reused when its versions match the pins, else (re)built under a lock."""
    venv = Path(os.environ.get(VENV_ENV) or "~/.cache/instaflow-edge/optimum-venv").expanduser()
    python = venv / "bin" / "python"
    if _matches(_installed(python)):
        return python
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f".{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another run may be building it
        if _matches(_installed(python)):
            return python
        if venv.exists() and not (venv / "pyvenv.cfg").is_file():
            pytest.fail(f"{venv} exists and is not a venv: set {VENV_ENV} to another folder")
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        for group in OPTIMUM_PINS:
            subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *group], check=True)
    installed = _installed(python)
    assert _matches(installed), f"optimum's venv at {venv} does not have the pinned versions: {installed}"
    return python


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _image(path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255


@pytest.fixture(scope="module")
def digits_student(tmp_path_factory) -> Path:
    """A digits one-step student made by our own recipe in a minute or two: the digits preset (VAE and text tower
    briefly trained: its scaling factor, about 0.9, is not SD's 0.18215 and its VAE downsamples 4×, not 8×),
    reflow pairs from its (random) UNet at 2 steps, 4 distillation steps. It tests the plumbing, not
    quality: the architecture, the scaling factor and train distill's one-step manifest are the real ones."""
    from instaflow_edge.train.reflow import DistillConfig, train_distill
    from instaflow_edge.train.reflow_data import ReflowDataConfig, make_reflow_data

    import instaflow_edge.digits  # noqa: F401  (registers the digits preset)
    from instaflow_edge.presets import InitConfig, init

    root = tmp_path_factory.mktemp("digits")
    init(InitConfig(preset="digits", output=str(root / "base"), seed=0, progress=False,
                    options={"vae_steps": 30, "text_steps": 20}))
    make_reflow_data(ReflowDataConfig(teacher=str(root / "base"), output=str(root / "pairs"), data="digits", num_pairs=16,
                                      steps=2, guidance=1.0, seed=1, device="cpu", batch_size=16), progress=False)
    train_distill(DistillConfig(model=str(root / "base"), pairs=str(root / "pairs"), output=str(root / "student"),
                                max_steps=4, batch_size=8, checkpoint_every=0, cpu=True, progress=False, seed=0))
    assert json.loads((root / "student" / "manifest.json").read_text())["one_step"]
    return root / "student"


@pytest.fixture(scope="module")
def sources(tiny_dir, digits_student):
    return {"tiny": tiny_dir, "digits": digits_student}


@pytest.mark.parametrize("preset", ["tiny", "digits"])
@pytest.mark.parametrize("scheme", ["fp32", "int8-static"])
def test_optimum_pipeline_reproduces_generate(preset, scheme, sources, tmp_path):
    from instaflow_edge.generator import make_noise
    from instaflow_edge.parity import psnr
    from instaflow_edge.runtime.onnx import export_facts

    python = optimum_python()
    export = tmp_path / "export"
    quant = ["--quantize", scheme] if scheme != "fp32" else []
    r = run("convert", sources[preset], "--target", "onnx", *quant, "-o", export)
    assert r.exit_code == 0, r.output
    prompts = PROMPTS[preset]
    r = run("generate", export, *prompts, "--backend", "onnx", "--seed", 0, "-o", tmp_path / "ours")
    assert r.exit_code == 0, r.output
    ours = {i["prompt"]: _image(tmp_path / "ours" / i["file"]) for i in json.loads((tmp_path / "ours" / "manifest.json").read_text())["images"]}

    noise = make_noise([0], export_facts(export).latent_shape).numpy()  # generate's seed-0 noise
    np.save(tmp_path / "z1.npy", noise)
    np.save(tmp_path / "z2.npy", np.concatenate([noise, noise]))  # both prompts at seed 0, as generate does
    jobs = [{"class": "ORTStableDiffusionPipeline", "prompts": prompts[:1], "guidance": 1.0, "latents": "z1.npy"},
            {"class": "ORTStableDiffusionPipeline", "prompts": prompts[:1], "guidance": 0.0, "latents": "z1.npy"},
            {"class": "ORTDiffusionPipeline", "prompts": prompts[:1], "guidance": 1.0, "latents": "z1.npy"},
            {"class": "ORTStableDiffusionPipeline", "prompts": prompts, "guidance": 1.0, "latents": "z2.npy"},
            {"class": "ORTStableDiffusionPipeline", "prompts": prompts[:1], "guidance": 1.0, "seed": 0}]
    for k, job in enumerate(jobs):
        job.update(export=str(export), out=str(tmp_path / f"optimum-{k}"))
        if "latents" in job:
            job["latents"] = str(tmp_path / job["latents"])
    report = _run_jobs(python, jobs, tmp_path)

    rows = []
    for job in report["jobs"]:
        assert job["pipeline"] == "ORTStableDiffusionPipeline" and job["scheduler"] == "DDIMScheduler"
        assert job["timesteps"] == [1000]
        for prompt, file in zip(job["prompts"], job["files"]):
            ref, img = ours[prompt], _image(file)
            rows.append((job["class"], len(job["prompts"]), job["guidance"], "latents" if "latents" in job else "generator",
                         prompt, psnr(ref, img, peak=1.0),
                         int(np.abs(ref - img).max() * 255 + 0.5)))
    print(f"\n{preset} {scheme}: optimum {report['versions']['optimum']}, optimum-onnx {report['versions']['optimum-onnx']}, "
          f"diffusers {report['versions']['diffusers']} vs generate --backend onnx")
    for cls, batch, g, noise, prompt, db, levels in rows:
        print(f"  {cls:27s} batch {batch} guidance {g:.0f} {noise:9s} {prompt!r:24s} PSNR {db:7.2f} dB, "
              f"max diff {levels} levels")
    assert all(db >= GATE_DB for *_, db, _ in rows), rows


def _run_jobs(python, jobs: list[dict], tmp_path) -> dict:
    """Run CHILD in optimum's venv on ``jobs``; its report (one entry per job, in order)."""
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    (tmp_path / "child.py").write_text(CHILD)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["HF_HUB_OFFLINE"] = "1"
    r = subprocess.run([str(python), str(tmp_path / "child.py"), str(tmp_path / "jobs.json"), str(tmp_path / "report.json")],
                       check=False, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads((tmp_path / "report.json").read_text())


def _one_step_timestep(steps: int, strength: float) -> int:
    """The one timestep diffusers' image-to-image pipeline runs for (steps, strength) when
    int(steps·strength) = 1: its get_timesteps over the shipped DDIM schedule."""
    from diffusers import DDIMScheduler

    from instaflow_edge.convert.onnx import PIPELINE_SCHEDULER

    sched = DDIMScheduler.from_config(PIPELINE_SCHEDULER)
    sched.set_timesteps(steps)
    init = min(int(steps * strength), steps)
    assert init == 1, "the settings must leave one step"
    return int(sched.timesteps[steps - init])


@pytest.mark.parametrize("preset", ["tiny", "digits"])
def test_optimum_img2img_pipeline_reproduces_generate_image(preset, sources, tmp_path):
    """``ORTStableDiffusionImg2ImgPipeline.from_pretrained(EXPORT)(prompt, image=, strength=,
    num_inference_steps=N, generator=)`` with one step left (int(N·strength) = 1) gives
    ``generate --backend onnx --image --strength t/1000``'s image, t the pipeline's timestep."""
    from PIL import Image

    from instaflow_edge.parity import psnr

    python = optimum_python()
    export = tmp_path / "export"
    r = run("convert", sources[preset], "--target", "onnx", "-o", export)
    assert r.exit_code == 0, r.output
    facts = json.loads((export / "manifest.json").read_text())["onnx"]
    size = facts["height"]
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:size, 0:size]
    pic = np.stack([xx * 255 // size, yy * 255 // size, (xx + yy) * 127 // size], -1) + rng.integers(0, 30, (size, size, 3))
    Image.fromarray(pic.clip(0, 255).astype(np.uint8)).save(tmp_path / "source.png")
    jobs, expected = [], []
    for k, (steps, strength) in enumerate([(2, 0.5), (4, 0.3), (5, 0.2)]):
        t = _one_step_timestep(steps, strength)
        ours = tmp_path / f"ours-{k}"
        r = run("generate", export, PROMPTS[preset][0], "--backend", "onnx", "--image", tmp_path / "source.png",
                "--strength", t / 1000, "--seed", 4, "-o", ours)
        assert r.exit_code == 0, r.output
        (f,) = ours.glob("*.png")
        expected.append((steps, strength, t, _image(f)))
        jobs.append({"class": "ORTStableDiffusionImg2ImgPipeline", "prompts": PROMPTS[preset][:1], "guidance": 1.0,
                     "image": str(tmp_path / "source.png"), "strength": strength, "steps": steps, "seed": 4,
                     "export": str(export), "out": str(tmp_path / f"optimum-{k}")})
    report = _run_jobs(python, jobs, tmp_path)
    rows = []
    for job, (steps, strength, t, ref) in zip(report["jobs"], expected):
        assert job["pipeline"] == "ORTStableDiffusionImg2ImgPipeline" and job["scheduler"] == "DDIMScheduler"
        img = _image(job["files"][0])
        rows.append((steps, strength, t, psnr(ref, img, peak=1.0), int(np.abs(ref - img).max() * 255 + 0.5)))
    print(f"\n{preset}: optimum {report['versions']['optimum']} image-to-image vs generate --backend onnx --image")
    for steps, strength, t, db, levels in rows:
        print(f"  steps {steps} strength {strength} (t = {t}): PSNR {db:7.2f} dB, max diff {levels} levels")
    assert all(db >= 40 for *_, db, _ in rows), rows
