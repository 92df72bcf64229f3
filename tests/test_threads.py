"""The thread governor (``--threads auto``): the count follows the CPU other processes use."""

from __future__ import annotations

import json

import pytest

from instaflow_edge.errors import InputError
from instaflow_edge.threads import Governor, Sample, threads_setting


class FakeMachine:
    """A machine whose other processes keep ``others`` cores busy; this process uses ``mine`` cores."""

    def __init__(self, threads: int = 2):
        self.t = self.busy = self.me = 0.0
        self.threads = threads
        self.sets: list[int] = []
        self.others = 0.0

    def run(self, seconds: float, others: float) -> None:
        self.t += seconds
        mine = min(self.threads, 2.0)
        self.busy += seconds * (mine + others)
        self.me += seconds * mine

    def sample(self) -> Sample:
        return Sample(self.t, self.busy, self.me)

    def set(self, n: int) -> None:
        self.sets.append(n)
        self.threads = n

    def governor(self, setting="auto", cores=2) -> Governor:
        return Governor(setting, interval=0.9, cores=cores, sample=self.sample, set_threads=self.set,
                        get_threads=lambda: self.threads)


@pytest.mark.parametrize("others,cores,ceiling,want", [
    (0.0, 2, 2, 2), (0.3, 2, 2, 2),  # quiet, or background noise: every core
    (0.67, 2, 2, 1), (1.0, 2, 2, 1), (1.9, 2, 2, 1),  # one busy program (its fair share beside our 2 threads)
    (1.0, 8, 8, 7), (3.0, 8, 8, 5), (0.0, 8, 4, 4),  # more cores; the ceiling is torch's starting count
    (-0.2, 2, 2, 2), (5.0, 2, 2, 1),  # rounding noise, an overloaded machine
])
def test_target_threads(others, cores, ceiling, want):
    assert Governor.target(others, cores, ceiling) == want


def test_auto_drops_a_thread_when_another_program_takes_a_core_and_comes_back():
    m = FakeMachine(threads=2)
    with m.governor() as g:
        assert g.current == 2 and m.sets == []
        m.run(0.5, others=0.0)
        assert g.tick() == 2  # not a full interval yet: nothing measured
        m.run(0.6, others=0.05)
        assert g.tick() == 2
        m.run(1.0, others=0.67)  # a spinning program starts: it gets 2/3 of a core beside our 2 threads
        assert g.tick() == 1 and m.sets == [1]
        m.run(1.0, others=1.0)
        assert g.tick() == 1 and m.sets == [1]  # stays down while it runs
        m.run(1.0, others=0.0)
        assert g.tick() == 2 and m.sets == [1, 2]  # and back up once it stops
        m.threads = 1  # something else changed torch's count: exiting restores the starting count
    assert m.threads == 2 and g.changes == 2


def test_fixed_count_is_set_never_changed_and_restored():
    m = FakeMachine(threads=2)
    with m.governor(1) as g:
        m.run(5.0, others=0.0)
        assert g.tick() == 1 and m.sets == [1]
    assert m.threads == 2


def test_auto_never_exceeds_torchs_starting_count_or_the_cores():
    m = FakeMachine(threads=8)
    with m.governor(cores=2) as g:
        assert g.current == 2 and m.sets == [2]
        m.run(2.0, others=0.0)
        assert g.tick() == 2


@pytest.mark.parametrize("value,want", [("auto", "auto"), (" AUTO ", "auto"), (3, 3), ("4", 4)])
def test_setting_accepts(value, want):
    assert threads_setting("threads", value) == want


@pytest.mark.parametrize("value", [0, -1, "0", "two", 2.5, True, None, "", 10**6])
def test_setting_refuses_in_one_line(value):
    with pytest.raises(InputError, match="threads must be 'auto' or a thread count"):
        threads_setting("threads", value)


def test_real_sample_counts_this_process():
    from instaflow_edge.threads import cpu_sample

    a = cpu_sample()
    x = 0
    for i in range(2_000_000):
        x += i
    b = cpu_sample()
    # the machine's CPU time grew at least by (about) what this process used
    assert b.wall > a.wall and b.mine > a.mine and (b.busy - a.busy) >= 0.5 * (b.mine - a.mine)


def test_train_records_threads_and_refuses_a_bad_count(tmp_path, tiny_dir):
    from typer.testing import CliRunner

    from instaflow_edge.cli import app
    from test_train_teacher import make_image_folder

    images = make_image_folder(tmp_path / "imgs")

    runner = CliRunner()
    base = ["train", "teacher", str(tiny_dir), "--data", str(images), "--max-steps", "2", "--batch-size", "4",
            "--log-every", "1", "--no-progress", "--checkpoint-every", "0"]
    r = runner.invoke(app, [*base, "-o", str(tmp_path / "a"), "--threads", "1"])
    assert r.exit_code == 0, r.output
    log = [json.loads(x) for x in (tmp_path / "a.train" / "metrics.jsonl").read_text().splitlines()]
    assert [rec["threads"] for rec in log] == [1, 1] and all(type(rec["threads"]) is int for rec in log)  # a count, not 1.0
    r = runner.invoke(app, [*base, "-o", str(tmp_path / "b")], env={"INSTAFLOW_EDGE_THREADS": "0"})
    assert r.exit_code != 0 and "threads must be 'auto' or a thread count" in r.output
    assert not (tmp_path / "b").exists()
