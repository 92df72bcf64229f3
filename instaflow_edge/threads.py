"""How many CPU threads training uses: every core on a quiet machine, fewer while other programs are busy.

PyTorch runs one OpenMP thread per core, and OpenMP's threads spin-wait for each other after every
parallel region. On small kernels (the digits models, any model at a small batch) one other busy
program then costs far more than the core it takes: a thread that lost its core makes all the others
spin until the scheduler runs it again (2-core machine, digits teacher: 3.2× slower beside one busy
core; see docs/measurements.md). One thread fewer than the busy cores leave free avoids that.

``--threads auto`` (the default) follows the machine's load: every ``interval`` seconds a
:class:`Governor` measures how much CPU the *other* processes used (all CPU time minus this process's),
and sets ``torch.set_num_threads`` to the cores they leave free (at least 1, at most the count torch
started with, which ``OMP_NUM_THREADS`` sets). ``--threads N`` fixes the count.

The thread count changes the order of floating-point sums inside some kernels, so two runs whose
counts differ agree to float rounding (~1e-7), not bit for bit. A run that must be bit-identical to
another one (or to itself after ``--resume``) fixes the count with ``--threads N``.

This module is imported by ``--help``: torch and psutil are imported inside functions.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from collections.abc import Callable

from .errors import InputError
from .validators import short

AUTO = "auto"


def threads_setting(name: str, value: object) -> str | int:
    """``"auto"`` or a positive thread count (an int, or a string of one from a config file or flag)."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == AUTO:
            return AUTO
        if text.isdigit():
            value = int(text)
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 4096:
        return value
    raise InputError(f"{name} must be 'auto' or a thread count from 1 to 4096, got {short(value)}",
                     f"pass --{name.replace('_', '-')} auto (follow the machine's load) or a number such as 2")


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS, Windows
        return os.cpu_count() or 1


@dataclass(frozen=True)
class Sample:
    wall: float  # seconds, monotonic
    busy: float  # CPU seconds used by every process on the machine, all cores summed
    mine: float  # CPU seconds used by this process


def cpu_sample() -> Sample:
    """The machine's and this process's CPU time so far (psutil: Linux, macOS, Windows)."""
    import psutil

    t = psutil.cpu_times()
    idle = t.idle + getattr(t, "iowait", 0.0)
    # guest time is already counted in user time on Linux
    total = sum(t) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)
    me = psutil.Process().cpu_times()
    return Sample(time.monotonic(), total - idle, me.user + me.system)


def _torch_set(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def _torch_get() -> int:
    import torch

    return torch.get_num_threads()


@dataclass
class Governor:
    """Keeps the thread count at the cores other processes leave free (``setting="auto"``), or fixed.

    Use as a context manager around the work and call :meth:`tick` often (each training step): it
    measures at most every ``interval`` seconds. On exit the count torch had before comes back.
    """

    setting: str | int = AUTO
    interval: float = 1.0
    cores: int = field(default_factory=usable_cores)
    sample: Callable[[], Sample] = cpu_sample
    set_threads: Callable[[int], None] = _torch_set
    get_threads: Callable[[], int] = _torch_get
    current: int = 0
    changes: int = 0
    _ceiling: int = 0
    _before: int = 0
    _last: Sample | None = None

    def __enter__(self) -> Governor:
        self.setting = threads_setting("threads", self.setting)
        self._before = self.get_threads()
        if self.setting == AUTO:
            self._ceiling = max(1, min(self._before, self.cores))
            self.current = self._ceiling
            self._last = self.sample()
            if self.current != self._before:
                self.set_threads(self.current)
        else:
            self.current = int(self.setting)
            self.set_threads(self.current)
        return self

    def __exit__(self, *exc) -> None:
        if self.get_threads() != self._before:
            self.set_threads(self._before)

    @staticmethod
    def target(others: float, cores: int, ceiling: int) -> int:
        """Threads for a machine where other processes keep ``others`` cores busy: the free cores,
        rounded down unless at least 0.6 of a core is free beyond them, between 1 and ``ceiling``.
        (Beside one spinning program on 2 cores, 2 threads of ours leave it about 2/3 of a core: that
        counts as busy, so we drop to 1; on the quiet machine background noise stays well under 0.4.)"""
        free = cores - max(0.0, others)
        return max(1, min(ceiling, int(free + 0.4)))

    def tick(self) -> int:
        """Re-measure if ``interval`` has passed; returns the thread count now in use."""
        if self.setting != AUTO or self._last is None:
            return self.current
        now = self.sample()
        dt = now.wall - self._last.wall
        if dt < self.interval:
            return self.current
        others = ((now.busy - self._last.busy) - (now.mine - self._last.mine)) / dt
        self._last = now
        want = self.target(others, self.cores, self._ceiling)
        if want != self.current:
            self.set_threads(want)
            self.current = want
            self.changes += 1
        return self.current
