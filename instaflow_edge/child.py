"""A worker process a long step hands memory-heavy work to (calibration, the HTP compiler): its stdout read
line by line as it runs, its stderr kept for the error, killed with us on Ctrl-C, and its failure said in
one phrase."""

from __future__ import annotations

import subprocess
import tempfile
from typing import Callable


def run_child(cmd: list[str], on_line: Callable[[str], None] | None = None) -> tuple[int, list[str], str]:
    """Run ``cmd``; ``on_line`` sees each stdout line as it comes. Returns (exit code, stdout lines, stderr)."""
    out: list[str] = []
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
        try:
            for line in proc.stdout:
                out.append(line)
                if on_line is not None:
                    on_line(line)
            proc.wait()
        except BaseException:  # Ctrl-C: the child goes with us
            proc.kill()
            proc.wait()
            raise
        err.seek(0)
        return proc.returncode, out, err.read()


def failure(returncode: int, stderr: str) -> str:
    """Why a child failed, in one phrase: the signal that killed it (SIGKILL: the out-of-memory killer, as
    a rule), else its last error line (not onnxruntime's warnings), else its last line."""
    if returncode < 0:
        import signal

        name = signal.Signals(-returncode).name
        return f"killed by {name}" + (" (out of memory, most likely)" if name == "SIGKILL" else "")
    lines = [x for x in stderr.strip().splitlines() if x.strip()] or ["no output"]
    errors = [x for x in lines if "Error" in x or x.startswith("error")]
    return (errors or lines)[-1][:300]
