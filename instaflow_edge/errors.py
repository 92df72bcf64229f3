"""The error hierarchy.

Every error a user can cause is an :class:`InstaflowError`: the CLI prints it as one line
(``error: <what> — <fix>``) and exits non-zero; ``--debug`` shows the traceback instead.
Subclasses let a caller decide what is fatal (a parity miss may be tolerable, a bad path is not).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
from typing import Iterator


class Terminated(KeyboardInterrupt):
    """SIGTERM while a command runs (the CLI raises it; Ctrl-C raises a plain KeyboardInterrupt): a command
    that treats Ctrl-C as its normal stop (``serve``) still exits 143 on this."""


class InstaflowError(Exception):
    """A problem the user can fix. ``fix`` says how."""

    exit_code = 2

    def __init__(self, message: str, fix: str | None = None):
        super().__init__(message)
        self.message = message
        self.fix = fix

    def __str__(self) -> str:
        return f"{self.message} — {self.fix}" if self.fix else self.message


class InputError(InstaflowError):
    """A bad option, argument or input file."""


class ModelError(InstaflowError):
    """A model folder or hub id that cannot be loaded."""


class OutputExistsError(InstaflowError):
    """The output path exists and ``--force`` was not given."""


class OutputBusyError(InstaflowError):
    """Another process is writing the same output (or training in the same work dir)."""


class DeviceError(InstaflowError):
    """The requested device or dtype is not available here."""


class NumericsError(InstaflowError):
    """NaN/Inf in an output (fp16 overflow in the VAE is the classic)."""


class ParityError(InstaflowError):
    """An export missed its parity gate."""

    exit_code = 3


class MissingDependencyError(InstaflowError):
    """An optional dependency (an extra) is not installed."""


# loggers that chatter while an optional dependency is imported (coremltools warns about untested
# torch/scikit-learn versions and its macOS-only proxies; torchao about kernels it cannot load on CPU)
IMPORT_CHATTER = ("coremltools", "torchao", "torch.utils._pytree")


@contextlib.contextmanager
def quiet_loggers(*names: str, level: int = logging.ERROR):
    """Raise the level of the named loggers for the duration of the block, then restore each one's own."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(level)
    try:
        yield
    finally:
        for lg, old in zip(loggers, levels):
            lg.setLevel(old)


def require(module: str, extra: str):
    """Import an optional dependency (its import-time log chatter silenced, so a one-line error that
    follows stays one line) or raise a one-line error naming the extra to install."""
    import importlib

    with quiet_loggers(module, *IMPORT_CHATTER):
        try:
            return importlib.import_module(module)
        except ImportError as e:  # pragma: no cover - exercised where the extra is absent
            raise MissingDependencyError(
                f"{module} is not installed ({e})",
                f"pip install 'instaflow-edge[{extra}]'",
            ) from e


# how the Rust and C++ writers (safetensors, torch.save) report a full disk: in the message, not an OSError
_NO_SPACE = re.compile(r"No space left on device|os error 28|StorageFull")
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)


@contextlib.contextmanager
def writing_to(path: str | os.PathLike) -> Iterator[None]:
    """Inside, a full-disk (or read-only disk) error that does not say which file failed (PIL, onnx, and the
    Rust/C++ writers of safetensors and torch) is raised again as an ``OSError`` naming ``path``, the
    output being written, so the CLI's one error line can name it."""
    try:
        yield
    except Exception as e:
        if isinstance(e, OSError) and e.errno in _WRITE_ERRNOS:
            if e.filename is None:
                raise OSError(e.errno, e.strerror or os.strerror(e.errno), os.fspath(path)) from e
            raise
        if _NO_SPACE.search(str(e)):  # also shutil.Error (an OSError without errno) listing copytree's failures
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(path)) from e
        raise
