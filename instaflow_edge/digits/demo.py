"""``instaflow-edge demo``: the whole InstaFlow recipe on the bundled digits, end to end, on a CPU.

init digits → train teacher (1-RF) → reflow-data from the 1-RF → train reflow (2-RF) → reflow-data from
the 2-RF → distill the 2-RF (InstaFlow) — and, as InstaFlow's control, distill the 1-RF directly from its
own pairs — then the edge stages on the student: prune it (the mid-block, then every stage's channels)
and recover it by distillation from the student on its pairs, and distil a tiny decoder from its VAE;
then ``eval`` every model with the same fixed prompts and seeds, and print/save the table.

Each stage writes its own folder under OUT with the library verbs (atomic, with manifests); a rerun
skips the stages whose folder is complete, so an interrupted demo resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Callable

from ..artifacts import atomic_write_text, check_output, make_manifest, output_lock
from ..errors import InputError
from ..presets import InitConfig, init
from ..train.decoder import DecoderConfig, train_decoder
from ..train.prune import PruneConfig, prune
from ..train.reflow import DistillConfig, ReflowConfig, train_distill, train_reflow
from ..train.teacher import TeacherConfig, train_teacher
from ..validators import seed
from .evaluate import EvalConfig, evaluate


@dataclasses.dataclass(frozen=True)
class Profile:
    """Sizes of one demo run. ``full`` is the README's table (26–35 min on a 2-core CPU, measured); ``quick`` (CI)
    runs every stage with small numbers (≤ 3 min) — its figures show the plumbing, not the claim."""

    vae_steps: int  # the digits preset's VAE training
    text_steps: int  # the digits preset's text-encoder (tiny CLIP) pretraining
    teacher_steps: int
    teacher_batch: int
    num_pairs: int
    pair_steps: int
    pair_guidance: float
    reflow_steps: int
    distill_steps: int
    stage_batch: int
    eval_images: int  # images per eval (a multiple of 10: the fixed prompt set covers every digit equally)
    multi_steps: int  # the "many steps" rows (InstaFlow compares with 25–32)
    decoder_steps: int  # the tiny decoder's training steps
    learning_rate: float = 1e-3
    prune_ratio: float = 0.5  # channels pruned after the mid-block (digits: 1 pair per stage)
    decoder_channels: str = "8,8,8"  # the tiny decoder: ~12× fewer MACs than the digits VAE decoder
    decoder_blocks: str = "1,1,1"


PROFILES = {
    "full": Profile(vae_steps=600, text_steps=300, teacher_steps=1100, teacher_batch=128, num_pairs=3000,
                    pair_steps=32, pair_guidance=1.0, reflow_steps=600, distill_steps=300, stage_batch=128,
                    eval_images=1000, multi_steps=32, decoder_steps=1500),
    "quick": Profile(vae_steps=60, text_steps=40, teacher_steps=50, teacher_batch=64, num_pairs=128, pair_steps=4,
                     pair_guidance=1.5, reflow_steps=20, distill_steps=20, stage_batch=64, eval_images=50,
                     multi_steps=4, decoder_steps=30),
}


@dataclasses.dataclass
class DemoConfig:
    """Options of ``instaflow-edge demo``."""

    output: str = "runs/demo"
    quick: bool = False
    seed: int = 0
    force: bool = False
    progress: bool = True

    def validate(self) -> None:
        seed("seed", self.seed, 3, "the stages use seed … seed + 2")
        if Path(self.output).exists() and not Path(self.output).is_dir():
            raise InputError(f"demo folder {self.output} is a file, not a folder", "pass -o with a folder (new or a demo's)")

    @property
    def profile(self) -> Profile:
        return PROFILES["quick" if self.quick else "full"]


ROWS = [
    # (label, model stage, steps key, guidance key, one-line meaning)
    ("1-RF teacher", "teacher-1rf", "one", "teacher", "the base rectified flow, one Euler step"),
    ("1-RF teacher", "teacher-1rf", "multi", "teacher", "the base rectified flow, many Euler steps"),
    ("2-RF (reflow)", "reflow-2rf", "one", "student", "after reflow, one Euler step"),
    ("2-RF (reflow)", "reflow-2rf", "multi", "student", "after reflow, many Euler steps"),
    ("1-RF + distill", "distill-1rf", "one", "student", "one-step student distilled from the 1-RF directly"),
    ("2-RF + distill (InstaFlow)", "instaflow", "one", "student", "one-step student distilled from the 2-RF"),
    ("InstaFlow, pruned + recovered", "pruned-recovered", "one", "student",
     "the student without its mid-block and with half the channels, recovered by distillation from it"),
    ("InstaFlow + tiny decoder", "tiny-decoder", "one", "student", "the student with a distilled AutoencoderTiny decoder"),
]


def _complete(folder: Path) -> bool:
    return (folder / "manifest.json").is_file()


def run_demo(config: DemoConfig, log: Callable[[str], None] = print) -> dict:
    """Run (or resume) the demo; returns the results written to OUT/results.json. The demo folder is
    locked while the demo runs (a second demo into it is refused)."""
    config.validate()
    # it resumes into OUT, and --force deletes OUT: never the folder the user works in, or one holding it
    check_output(config.output, config.force, exists_ok=True)
    with output_lock(config.output, what="demo folder"):
        return _run_demo(config, log)


def _run_demo(config: DemoConfig, log: Callable[[str], None]) -> dict:
    import shutil

    from ..train.reflow_data import ReflowDataConfig, make_reflow_data

    P = config.profile
    out = Path(config.output)
    if config.force and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    engine = dict(seed=config.seed, progress=config.progress, checkpoint_every=200, cpu=True,
                  learning_rate=P.learning_rate)

    def stage(name: str, fn: Callable[[str], object]) -> str:
        folder = out / name
        if _complete(folder):
            log(f"[demo] {name}: done already, reusing {folder}")
            return str(folder)
        log(f"[demo] {name} …")
        t0 = time.perf_counter()
        fn(str(folder))
        timings[name] = round(time.perf_counter() - t0, 1)
        log(f"[demo] {name}: {timings[name]:.0f} s")
        return str(folder)

    def trained(name: str, make: Callable[..., object]) -> str:
        """A training stage: continues from its work dir's latest checkpoint after a crash."""
        return stage(name, lambda o: make(o, resume="latest"))

    base = stage("base", lambda o: init(InitConfig(
        preset="digits", output=o, seed=config.seed, progress=config.progress,
        options={"vae_steps": P.vae_steps, "text_steps": P.text_steps})))
    teacher = trained("teacher-1rf", lambda o, resume: train_teacher(TeacherConfig(
        model=base, data="digits", output=o, max_steps=P.teacher_steps, batch_size=P.teacher_batch,
        resume=resume, **engine)))
    pairs1 = stage("pairs-1rf", lambda o: make_reflow_data(ReflowDataConfig(
        teacher=teacher, output=o, data="digits", num_pairs=P.num_pairs, steps=P.pair_steps,
        guidance=P.pair_guidance, seed=config.seed + 1, device="cpu", batch_size=256), progress=config.progress))
    reflow = trained("reflow-2rf", lambda o, resume: train_reflow(ReflowConfig(
        model=teacher, pairs=pairs1, output=o, max_steps=P.reflow_steps, batch_size=P.stage_batch,
        resume=resume, **engine)))
    pairs2 = stage("pairs-2rf", lambda o: make_reflow_data(ReflowDataConfig(
        teacher=reflow, output=o, data="digits", num_pairs=P.num_pairs, steps=P.pair_steps, guidance=1.0,
        seed=config.seed + 2, device="cpu", batch_size=256), progress=config.progress))
    trained("distill-1rf", lambda o, resume: train_distill(DistillConfig(
        model=teacher, pairs=pairs1, output=o, max_steps=P.distill_steps, batch_size=P.stage_batch,
        resume=resume, **engine)))
    student = trained("instaflow", lambda o, resume: train_distill(DistillConfig(
        model=reflow, pairs=pairs2, output=o, max_steps=P.distill_steps, batch_size=P.stage_batch,
        resume=resume, **engine)))
    # the edge stages: a pruned student recovered from the student on its pairs, and a tiny decoder
    no_mid = stage("pruned-blocks", lambda o: prune(PruneConfig(model=student, output=o, method="blocks", variant="mid")))
    pruned = stage("pruned", lambda o: prune(PruneConfig(model=no_mid, output=o, method="channels", ratio=P.prune_ratio)))
    trained("pruned-recovered", lambda o, resume: train_distill(DistillConfig(
        model=pruned, pairs=pairs2, output=o, teacher=student, max_steps=P.distill_steps, batch_size=P.stage_batch,
        resume=resume, **engine)))
    stage("tiny-decoder", lambda o: train_decoder(DecoderConfig(
        model=student, output=o, channels=P.decoder_channels, blocks=P.decoder_blocks, max_steps=P.decoder_steps,
        seed=config.seed, progress=config.progress)))

    rows = evaluate_rows(out, P, config, log)
    results = {
        "profile": "quick" if config.quick else "full",
        "settings": dataclasses.asdict(P),
        "rows": rows,
        "stage_seconds": timings,
        "total_seconds": round(time.perf_counter() - t_all, 1),
    }

    results = {**make_manifest("demo-results", config), **results}
    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    atomic_write_text(out / "results.md", format_markdown(results) + "\n")
    log(format_markdown(results))
    return results


def evaluate_rows(out: Path, P: Profile, config: DemoConfig, log) -> list[dict]:

    rows = []
    for label, stage, steps_key, guid_key, meaning in ROWS:
        steps = 1 if steps_key == "one" else P.multi_steps
        # the pairs were made at the teacher's guidance; models trained on them carry it, so they run at 1
        guidance = P.pair_guidance if guid_key == "teacher" else 1.0
        r = evaluate(EvalConfig(model=str(out / stage), steps=steps, guidance=guidance,
                                num_images=P.eval_images, seed=config.seed), progress=config.progress)
        rows.append({"model": label, "stage": stage, "steps": steps, "guidance": guidance, "meaning": meaning,
                     "prompt_accuracy": r["generated"]["accuracy"], "digits_fid": r["generated"]["fid"]})
        log(f"[demo] eval {label} @ {steps} step(s): accuracy {rows[-1]['prompt_accuracy']:.3f}, "
            f"FID {rows[-1]['digits_fid']:.2f}")
    ceiling = r["real"]
    rows.append({"model": "real validation digits (ceiling)", "stage": None, "steps": None, "guidance": None,
                 "meaning": "the same judge on real images", "prompt_accuracy": ceiling["accuracy"],
                 "digits_fid": ceiling["fid"]})
    return rows


def format_markdown(results: dict) -> str:
    lines = ["| model | steps | guidance | prompt accuracy | digits-FID |", "|---|---:|---:|---:|---:|"]
    for r in results["rows"]:
        steps = "" if r["steps"] is None else str(r["steps"])
        g = "" if r["guidance"] is None else f"{r['guidance']:g}"
        lines.append(f"| {r['model']} | {steps} | {g} | {r['prompt_accuracy']:.3f} | {r['digits_fid']:.2f} |")
    lines.append("")
    lines.append(f"profile `{results['profile']}`, total {results['total_seconds']:.0f} s; stage seconds: "
                 + ", ".join(f"{k} {v:.0f}" for k, v in results["stage_seconds"].items()))
    return "\n".join(lines)
