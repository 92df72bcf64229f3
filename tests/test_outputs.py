"""Outputs never destroy inputs, one process writes an output, interrupted or killed runs leave nothing.

The data-loss cases run through the CLI in this process (they are refused before any heavy work); the
race, SIGTERM and Ctrl-C cases run ``python -m instaflow_edge.cli`` as real processes on the tiny preset.
Every victim is a copy of the tiny pipeline, so a regression destroys nothing the other tests use.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from instaflow_edge.cli import app

runner = CliRunner()

# a lock holder that is not instaflow-edge itself: flock the file, say so, wait to be killed
HOLD_LOCK = ("import fcntl, sys, time\nf = open(sys.argv[1], 'a')\nfcntl.flock(f, fcntl.LOCK_EX)\n"
             "print('held', flush=True)\ntime.sleep(120)\n")


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_error_line(text: str) -> str:
    """The single ``error:`` line of ``text`` (and no traceback)."""
    assert "Traceback" not in text, text
    errors = [ln for ln in text.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, text
    return errors[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture
def model(tmp_path, tiny_dir) -> Path:
    """A private copy of the tiny pipeline at tmp/par/m."""
    m = tmp_path / "par" / "m"
    shutil.copytree(tiny_dir, m)
    return m


# ---------------------------------------------------------------------------------------------------
# data loss: an output that is, contains or lies inside an input is refused


def _cases(tmp: Path, m: Path) -> dict[str, tuple[list, str]]:
    (tmp / "prompts.txt").write_text("a fox\n")
    (tmp / "mlink").symlink_to(m, target_is_directory=True)
    return {
        # name: (arguments, fragment of the one error line)
        "generate -o MODEL": (["generate", m, "x", "-o", m, "--force"], f"output {m} is the input {m}"),
        "generate -o MODEL/sub": (["generate", m, "x", "-o", m / "imgs"], "is inside the input"),
        "generate -o PARENT": (["generate", m, "x", "-o", m.parent, "--force"], "contains the input"),
        "generate -o LINK-TO-MODEL": (["generate", m, "x", "-o", tmp / "mlink", "--force"], "is the input"),
        "generate LINK -o PARENT": (["generate", tmp / "mlink", "x", "-o", m.parent, "--force"], "contains the input"),
        "init -o PARENT-OF-CWD": (["init", "tiny", tmp, "--force"], "current folder"),
        "convert -o MODEL": (["convert", m, "--target", "onnx", "-o", m, "--force"], "is the input"),
        "quantize -o SOURCE": (["quantize", m, "--scheme", "fp16", "-o", m, "--force"], "is the input"),
        "train teacher -o BASE": (["train", "teacher", m, "-o", m, "--force", "--max-steps", "1", "--batch-size", "2",
                                   "--checkpoint-every", "0", "--no-progress"], "is the input"),
        "train teacher --work-dir in BASE": (["train", "teacher", m, "-o", tmp / "t", "--work-dir", m / "w",
                                              "--max-steps", "1", "--batch-size", "2", "--no-progress"],
                                             "work dir"),
        "train reflow-data -o TEACHER": (["train", "reflow-data", m, "-o", m, "--force", "--prompts",
                                          tmp / "prompts.txt", "--num-pairs", "1", "--steps", "1", "--no-progress"],
                                         "is the input"),
        "train reflow-data -o PARENT": (["train", "reflow-data", m, "-o", m.parent, "--force", "--prompts",
                                         tmp / "prompts.txt", "--num-pairs", "1", "--steps", "1", "--no-progress"],
                                        "contains the input"),
        "eval --json MODEL-FILE": (["eval", m, "--json", m / "model_index.json", "--num-images", "20"],
                                   "--json file"),
    }


CASES = ["generate -o MODEL", "generate -o MODEL/sub", "generate -o PARENT", "generate -o LINK-TO-MODEL",
         "generate LINK -o PARENT", "init -o PARENT-OF-CWD", "convert -o MODEL", "quantize -o SOURCE",
         "train teacher -o BASE", "train teacher --work-dir in BASE", "train reflow-data -o TEACHER",
         "train reflow-data -o PARENT", "eval --json MODEL-FILE"]


@pytest.mark.parametrize("case", CASES)
def test_output_overlapping_an_input_is_refused(case, tmp_path, model, monkeypatch):
    args, fragment = _cases(tmp_path, model)[case]
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    before = snapshot(model)
    r = cli(*args)
    assert r.exit_code != 0, r.output
    assert fragment in one_error_line(r.output), r.output
    assert snapshot(model) == before  # the input is untouched
    assert leftovers(tmp_path) == [] and leftovers(model.parent) == []  # no temp folder, no lock file


def test_output_dot_with_force_is_refused(tmp_path, model, monkeypatch):
    """``-o .`` names the folder the user works in: never replaced, and no ``..old-*`` folder appears."""
    work = tmp_path / "here"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    r = cli("generate", model, "x", "-o", ".", "--force")
    assert r.exit_code != 0
    assert "current folder" in one_error_line(r.output)
    assert sorted(p.name for p in work.iterdir()) == ["notes.txt"]
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------------
# stale temp folders of a killed run; a lock another process holds


def test_stale_temp_folders_of_the_same_output_are_removed(tmp_path, tiny_dir):
    mine = [Path(tempfile.mkdtemp(prefix=".out.tmp-", dir=tmp_path)), Path(tempfile.mkdtemp(prefix=".out.old-", dir=tmp_path))]
    for p in mine:
        (p / "half.png").write_bytes(b"junk")  # what a kill -9 mid-write leaves
    other = Path(tempfile.mkdtemp(prefix=".other.tmp-", dir=tmp_path))  # another output's: not ours to touch
    r = cli("generate", tiny_dir, "x", "-o", tmp_path / "out")
    assert r.exit_code == 0, r.output
    assert not any(p.exists() for p in mine)
    assert other.is_dir()
    assert (tmp_path / "out" / "manifest.json").is_file()
    assert leftovers(tmp_path) == [other.name]


def _hold_lock(path: Path) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_output_locked_by_another_process_is_refused_and_its_temp_folder_kept(tmp_path, tiny_dir):
    live = Path(tempfile.mkdtemp(prefix=".out.tmp-", dir=tmp_path))  # the other process is writing this
    holder = _hold_lock(tmp_path / ".out.lock")
    try:
        r = cli("generate", tiny_dir, "x", "-o", tmp_path / "out", "--force")
    finally:
        holder.kill()
        holder.wait()
    assert r.exit_code != 0
    line = one_error_line(r.output)
    assert str(tmp_path / "out") in line and "another instaflow-edge process" in line
    assert live.is_dir() and not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------
# training: the work dir's lock and stale checkpoint folders; resume with other data-order settings


def _engine():
    from test_train_engine import cfg, run

    return cfg, run


def test_stale_checkpoint_temp_folders_are_removed(tmp_path):
    cfg, run = _engine()
    work = tmp_path / "out.train"
    work.mkdir()
    junk = Path(tempfile.mkdtemp(prefix=".checkpoint-0000006.tmp-", dir=work))
    (junk / "model.safetensors").write_bytes(b"junk")
    _, res = run(cfg(tmp_path, max_steps=1, checkpoint_every=1))
    assert res.step == 1
    assert not junk.exists()
    assert leftovers(work) == [] and leftovers(tmp_path) == []


def test_work_dir_locked_by_another_process_is_refused(tmp_path):
    from instaflow_edge.errors import InstaflowError

    cfg, run = _engine()
    holder = _hold_lock(tmp_path / ".out.train.lock")
    try:
        with pytest.raises(InstaflowError, match="work dir .*out.train is being written by another instaflow-edge"):
            run(cfg(tmp_path, max_steps=3))
    finally:
        holder.kill()
        holder.wait()
    assert not (tmp_path / "out.train" / "checkpoint-0000003").exists()


def test_resume_with_other_data_order_settings_is_refused(tmp_path):
    from instaflow_edge.errors import InputError

    cfg, run = _engine()
    run(cfg(tmp_path, max_steps=1, checkpoint_every=1))
    for setting, value, flag in (("batch_size", 4, "--batch-size"), ("seed", 1, "--seed")):
        stored = getattr(cfg(tmp_path), setting)
        with pytest.raises(InputError) as e:
            run(cfg(tmp_path, max_steps=2, checkpoint_every=1, resume="latest", **{setting: value}))
        msg = str(e.value)
        assert "\n" not in msg
        assert f"made with {flag} {stored}" in msg and f"this run has {flag} {value}" in msg


# ---------------------------------------------------------------------------------------------------
# real processes: a race for one output, SIGTERM and Ctrl-C


def _start(*args, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "instaflow_edge.cli", *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_processes_writing_one_output(tmp_path, tiny_dir):
    """Started at once, without --force: exactly one writes the output, the other fails with one line;
    the output holds one complete result."""
    procs = [_start("generate", tiny_dir, "a fox", "-n", "3", "--seed", str(s), "-o", tmp_path / "w", cwd=tmp_path)
             for s in (10, 20)]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    ok = [r for r in results if r[0] == 0]
    failed = [r for r in results if r[0] != 0]
    assert len(ok) == 1 and len(failed) == 1, results
    line = one_error_line(failed[0][2])
    assert "another instaflow-edge process" in line or "already exists" in line
    m = json.loads((tmp_path / "w" / "manifest.json").read_text())
    assert len({rec["seed"] for rec in m["images"]}) == 3 and len({rec["seed"] // 10 for rec in m["images"]}) == 1
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == sorted(["manifest.json", *(r["file"] for r in m["images"])])
    assert leftovers(tmp_path) == []


def test_sigterm_and_ctrl_c_leave_no_temp_folder_and_say_so(tmp_path, tiny_dir):
    """A long generate is stopped mid-way: SIGTERM exits 143, Ctrl-C (SIGINT) 130; both print the one
    line, remove their temporary folder and lock, and leave no output."""
    runs = {sig: _start("generate", tiny_dir, "a fox", "-n", "500", "-o", tmp_path / name, cwd=tmp_path)
            for sig, name in ((signal.SIGTERM, "term"), (signal.SIGINT, "int"))}
    deadline = time.monotonic() + 240
    pending = dict(runs)
    while pending and time.monotonic() < deadline:
        for sig, p in list(pending.items()):
            name = "term" if sig == signal.SIGTERM else "int"
            if any(tmp_path.glob(f".{name}.tmp-*/*.png")):  # mid-way: images are being written
                p.send_signal(sig)
                del pending[sig]
            assert p.poll() is None, p.communicate()
        time.sleep(0.2)
    assert not pending, "no image appeared in time"
    for sig, p in runs.items():
        code = p.wait(timeout=120)
        err = p.communicate()[1]
        assert code == 128 + sig, (code, err)
        assert "Traceback" not in err
        assert err.strip().splitlines()[-1].endswith("nothing was written"), err
    assert leftovers(tmp_path) == []
    assert not (tmp_path / "term").exists() and not (tmp_path / "int").exists()


# ---------------------------------------------------------------------------------------------------
# --force replaces a previous output only; the --config file is an input


def test_force_never_replaces_a_folder_we_did_not_write(tmp_path, model):
    mine = tmp_path / "project"
    (mine / "src").mkdir(parents=True)
    (mine / "src" / "main.py").write_text("print('my work')\n")
    before = snapshot(mine)
    r = cli("generate", model, "a fox", "-o", mine, "--force", "--steps", 1)
    line = one_error_line(r.output)
    assert r.exit_code != 0 and "is not an instaflow-edge output" in line and "--force only replaces" in line
    assert snapshot(mine) == before and leftovers(tmp_path) == []
    # a previous output of ours (and an empty folder) is replaced
    r = cli("generate", model, "a fox", "-o", tmp_path / "imgs", "--steps", 1)
    assert r.exit_code == 0, r.output
    r = cli("generate", model, "a fox", "-o", tmp_path / "imgs", "--force", "--steps", 1, "--seed", 3)
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "imgs" / "manifest.json").read_text())["kind"]
    (tmp_path / "empty").mkdir()
    r = cli("generate", model, "a fox", "-o", tmp_path / "empty", "--force", "--steps", 1)
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("where", ["inside the output", "inside the work dir"])
def test_train_config_file_is_an_input(tmp_path, model, where):
    out = tmp_path / "T"
    holder = out if where == "inside the output" else tmp_path / "T.train"
    holder.mkdir()
    (holder / "manifest.json").write_text(json.dumps({"kind": "pipeline", "versions": {"instaflow-edge": "0"}}))
    conf = holder / "t.toml"
    conf.write_text("max-steps = 1\nbatch-size = 4\n")
    r = cli("train", "teacher", model, "--data", "digits", "--config", conf, "-o", out, "--force", "--no-progress")
    line = one_error_line(r.output)
    assert r.exit_code != 0 and str(conf) in line, line
    assert conf.read_text() == "max-steps = 1\nbatch-size = 4\n"
