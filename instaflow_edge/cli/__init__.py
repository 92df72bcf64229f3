"""The ``instaflow-edge`` command line: one thin command per verb (modelled on accelerate's CLI).

Each command turns options into a config and calls the library verb. Errors a user can cause print
as one line and exit non-zero (``--debug`` shows the traceback). This package is imported by
``--help``: it must stay free of heavy imports (torch, diffusers, onnxruntime, coremltools…).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from typing import Any, Iterator, Optional, Sequence

import typer
from typer.core import TyperGroup

try:  # typer ≥ 0.20 vendors click as typer._click; older typer uses click itself
    from typer._click import exceptions as _cx
except ImportError:  # pragma: no cover
    from click import exceptions as _cx

from ..errors import InstaflowError, Terminated
from ..options import Flow
from ..progress import stage_lines


class _Interrupted(BaseException):
    """A KeyboardInterrupt on its way out of the command: typer turns a KeyboardInterrupt into a silent
    exit code 130, so the group re-raises it as this (not a KeyboardInterrupt) and ``main`` reports it."""


_SIGNALS = {signal.SIGINT: "interrupted", signal.SIGTERM: "interrupted by SIGTERM"}


@contextlib.contextmanager
def _interrupts_raise(received: list[int]) -> Iterator[None]:
    """While the command runs, SIGINT and SIGTERM raise KeyboardInterrupt (so every ``atomic_dir`` and
    lock is unwound: no temporary folder stays behind) and are noted in ``received``; the previous
    handlers come back afterwards. Outside the main thread (signals cannot be handled there) nothing
    changes."""

    def handler(signum, frame):
        received.append(signum)
        raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt

    previous = {}
    try:
        for sig in _SIGNALS:
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread
        pass
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class _OneLineErrors(TyperGroup):
    """Runs click in non-standalone mode and turns every error into a single ``error:`` line."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as e:
            raise _Interrupted() from e

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True, **extra: Any) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        debug = "--debug" in argv or bool(os.environ.get("INSTAFLOW_EDGE_DEBUG"))
        code = 0
        received: list[int] = []
        try:
            from ..pipeline import assumptions_scope

            with _interrupts_raise(received), stage_lines(), assumptions_scope():
                from .convert import legacy_argv

                argv = legacy_argv(argv)  # `convert MODEL --target T` → `convert T MODEL`
                rv = super().main(args=argv, prog_name=prog_name or "instaflow-edge", complete_var=complete_var,
                                  standalone_mode=False, **extra)
            code = rv if isinstance(rv, int) else 0
        except InstaflowError as e:
            if debug:
                raise
            typer.echo(f"error: {e}", err=True)
            code = e.exit_code
        except _cx.UsageError as e:
            if debug:
                raise
            cmd = e.ctx.command_path if e.ctx else "instaflow-edge"
            if e.format_message():  # no arguments: click printed the help, there is no error to add
                typer.echo(f"error: {e.format_message()} — see `{cmd} --help`", err=True)
            code = 2
        except _cx.ClickException as e:
            if debug:
                raise
            typer.echo(f"error: {e.format_message()}", err=True)
            code = e.exit_code
        except (_Interrupted, KeyboardInterrupt, typer.Abort):
            # Ctrl-C exits 130, SIGTERM 143 (128 + the signal's number, as shells report a killed process)
            sig = received[0] if received else signal.SIGINT
            typer.echo(f"{_SIGNALS.get(sig, 'interrupted')}: nothing was written", err=True)
            code = 128 + int(sig)
        except Exception as e:  # a full disk, a read-only one, a permission: one line naming the path
            line = os_error_line(e)
            if debug or line is None:
                raise
            typer.echo(f"error: {line}", err=True)
            code = 1
        if not standalone_mode:
            return code
        sys.exit(code)


def os_error_line(e: BaseException) -> str | None:
    """The one-line message for an error the machine caused (a full or read-only disk, a permission) —
    an ``OSError`` in ``e``'s chain, or a library's flattened "No space left on device" — naming the
    path and the fix; None for anything else (a bug: its traceback is shown)."""
    import errno

    fixes = {
        errno.ENOSPC: ("no space left on the device", "free some space, or write to another disk (-o, --work-dir)"),
        errno.EDQUOT: ("disk quota exceeded", "free some space, or write to another disk (-o, --work-dir)"),
        errno.EFBIG: ("file too large for the file system", "write to another disk (-o, --work-dir)"),
        errno.EROFS: ("read-only file system", "write to a writable disk (-o, --work-dir)"),
        errno.EACCES: ("permission denied", "make it readable/writable for this user (chmod, chown), or choose another path"),
        errno.EPERM: ("operation not permitted", "make it writable for this user (chmod, chown), or choose another path"),
    }
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in fixes:
            what, fix = fixes[e.errno]
            paths = " → ".join(str(p) for p in (e.filename, e.filename2) if p is not None)
            return f"{what}{': ' + paths if paths else ''} — {fix}"
        if "No space left on device" in str(e) or "os error 28" in str(e):  # Rust/C++ writers (safetensors, torch)
            return f"{fixes[errno.ENOSPC][0]} (while {type(e).__name__} wrote a file) — {fixes[errno.ENOSPC][1]}"
        e = e.__cause__ or e.__context__
    return None


app = typer.Typer(
    name="instaflow-edge",
    cls=_OneLineErrors,
    help="One-step text-to-image generation (InstaFlow) from training to phones and laptops.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        from importlib import metadata

        typer.echo(f"instaflow-edge {metadata.version('instaflow-edge')}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks instead of one-line errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    flow: Optional[Flow] = typer.Option(
        None, "--flow", envvar="INSTAFLOW_EDGE_FLOW",
        help="What a model without an instaflow-edge manifest is (e.g. InstaFlow's released checkpoints: "
             "--flow rectified-flow --default-steps 1); otherwise it is guessed from its class and name, and the "
             "guess is printed."),
    default_steps: Optional[int] = typer.Option(
        None, "--default-steps", envvar="INSTAFLOW_EDGE_DEFAULT_STEPS", help="Default sampling steps of such a model."),
) -> None:
    """One-step text-to-image generation (InstaFlow): train, convert, quantize, benchmark."""
    if flow is not None or default_steps is not None:
        from ..pipeline import set_assumed_model

        set_assumed_model(flow, default_steps)


def _register() -> None:
    from . import bench as bench_cmd
    from . import convert as convert_cmd
    from . import demo as demo_cmd
    from . import env as env_cmd
    from . import eval as eval_cmd
    from . import generate as generate_cmd
    from . import init as init_cmd
    from . import merge as merge_cmd
    from . import prune as prune_cmd
    from . import quantize as quantize_cmd
    from . import report as report_cmd
    from . import serve as serve_cmd
    from . import train as train_cmd

    app.command("init")(init_cmd.init_command)
    app.command("generate")(generate_cmd.generate_command)
    # convert parses its own arguments: each target's options come from its options dataclass (cli/convert.py)
    app.command("convert", context_settings=convert_cmd.CONTEXT, help=convert_cmd.HELP)(convert_cmd.convert_command)
    app.command("demo")(demo_cmd.demo_command)
    app.command("env")(env_cmd.env_command)
    app.command("eval")(eval_cmd.eval_command)
    app.command("quantize")(quantize_cmd.quantize_command)
    app.command("prune")(prune_cmd.prune_command)
    app.command("merge")(merge_cmd.merge_command)
    app.command("serve")(serve_cmd.serve_command)
    app.command("bench")(bench_cmd.bench_command)
    app.command("report")(report_cmd.report_command)
    from . import train_recipe

    train_recipe.register(train_cmd.train_app)
    app.add_typer(train_cmd.train_app, name="train")


_register()


def main() -> None:
    """Console-script entry point."""
    app()
