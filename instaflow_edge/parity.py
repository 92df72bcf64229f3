"""Typed parity between an export and its PyTorch reference (optimum's ``ShapeError``/``AtolError``
idea; Apple's PSNR gate).

PSNR is Apple's converter's formula: ``20·log10((max|ref| + 1e-5) / (rms(ref − out) + 1e-10))``. A
shape mismatch is always fatal; a PSNR below the gate is fatal unless the caller lowers the gate.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from .errors import ParityError

# default gates (dB) per precision/scheme; exporters may add theirs and must write the one used
DEFAULT_MIN_PSNR = {"fp32": 60.0, "fp16": 35.0}


class ShapeError(ParityError):
    """Export and reference disagree on shape: never tolerable."""


class PsnrError(ParityError):
    """Export misses its PSNR gate."""


@dataclasses.dataclass(frozen=True)
class Parity:
    component: str
    psnr: float
    max_abs: float
    cosine: float
    shape: tuple[int, ...]

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["psnr"] = None if math.isinf(self.psnr) else round(self.psnr, 3)  # JSON has no inf
        return d


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def psnr(ref, out, peak: float | None = None) -> float:
    """PSNR in dB of ``out`` against ``ref``. The peak is Apple's (``max|ref| + 1e-5``) unless given: pass
    the signal's full range for images (2.0 for [-1, 1]), as image-quality PSNR is usually quoted."""
    ref, out = _np(ref), _np(out)
    rms = float(np.sqrt(np.mean((ref - out) ** 2)))
    if rms == 0.0:
        return math.inf
    top = float(np.abs(ref).max() + 1e-5) if peak is None else float(peak)
    return float(20 * np.log10(top / (rms + 1e-10)))


def compare(component: str, ref, out) -> Parity:
    """Figures of ``out`` against ``ref``; raises ShapeError on a shape mismatch, ParityError on NaN/Inf."""
    ref, out = _np(ref), _np(out)
    if ref.shape != out.shape:
        raise ShapeError(f"{component}: export output shape {out.shape} ≠ reference {ref.shape}",
                         "the export is broken; re-export, and report it if it persists")
    if not np.isfinite(out).all():
        raise ParityError(f"{component}: export output has NaN/Inf", "fp16 overflow is the usual cause; keep this component fp32")
    a, b = ref.ravel(), out.ravel()
    denom = float(np.linalg.norm(a) * np.linalg.norm(b))
    cos = float(a @ b / denom) if denom > 0 else float(np.array_equal(a, b))
    return Parity(component, psnr(ref, out), float(np.abs(ref - out).max()), cos, tuple(ref.shape))


def check(p: Parity, min_psnr: float) -> Parity:
    """Raise PsnrError naming the component and figure when ``p`` misses ``min_psnr``."""
    if p.psnr < min_psnr:
        raise PsnrError(
            f"{p.component}: PSNR {p.psnr:.1f} dB is below the {min_psnr:.1f} dB gate (max abs error {p.max_abs:.3g})",
            "use a less aggressive scheme, or lower the gate explicitly with --min-psnr",
        )
    return p


def format_table(rows: list[Parity], gates: dict[str, float] | None = None) -> str:
    head = f"{'component':<14} {'PSNR dB':>9} {'max abs':>10} {'cosine':>9}" + ("  gate" if gates else "")
    lines = [head, "-" * len(head)]
    for p in rows:
        ps = "inf" if math.isinf(p.psnr) else f"{p.psnr:.2f}"
        gate = f"  ≥{gates[p.component]:.0f}" if gates and p.component in gates else ""
        lines.append(f"{p.component:<14} {ps:>9} {p.max_abs:>10.3g} {p.cosine:>9.6f}{gate}")
    return "\n".join(lines)
