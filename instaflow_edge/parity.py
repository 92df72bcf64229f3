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
    """Export misses its PSNR gate. ``rows`` and ``gates``: every figure measured and its gate (for a
    caller that shows the whole table), when the error comes from :func:`check_all`."""

    def __init__(self, message: str, fix: str | None = None, rows: list[Parity] | None = None,
                 gates: dict[str, float] | None = None):
        super().__init__(message, fix)
        self.rows = list(rows or [])
        self.gates = dict(gates or {})


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

    @classmethod
    def from_dict(cls, d: dict) -> "Parity":
        """The inverse of :meth:`as_dict` (a manifest's ``parity`` row)."""
        return cls(d["component"], math.inf if d["psnr"] is None else float(d["psnr"]), float(d["max_abs"]),
                   float(d["cosine"]), tuple(d["shape"]))


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


GATE_FIX = "use a less aggressive scheme, or lower the gate explicitly with --min-psnr"


def check(p: Parity, min_psnr: float) -> Parity:
    """Raise PsnrError naming the component and figure when ``p`` misses ``min_psnr``."""
    check_all([p], {p.component: min_psnr})
    return p


def check_all(rows: list[Parity], gates: dict[str, float] | float, *, against: str = "", source: str = "",
              fix: str = GATE_FIX) -> list[Parity]:
    """Check every row against its gate (``gates``: per component, or one number for all) and raise one
    :class:`PsnrError` whose one-line message lists every component that misses its gate, with its
    figure and gate. ``against`` names the reference in the message ("fp32"), ``source`` where the gate
    comes from ("scheme int8"). Returns ``rows`` when all pass."""
    gate_of = (lambda c: float(gates)) if isinstance(gates, (int, float)) else (lambda c: gates[c])
    vs = f" vs {against}" if against else ""
    why = f"{source}; " if source else ""
    misses = [f"{p.component}: PSNR {p.psnr:.1f} dB{vs} is below the {gate_of(p.component):.1f} dB gate "
              f"({why}max abs error {p.max_abs:.3g})" for p in rows if p.psnr < gate_of(p.component)]
    if misses:
        head = f"{len(misses)} of {len(rows)} outputs miss their gate: " if len(misses) > 1 else ""
        raise PsnrError(head + "; ".join(misses), fix, rows=rows, gates={p.component: gate_of(p.component) for p in rows})
    return rows


def format_table(rows: list[Parity | dict], gates: dict[str, float] | None = None,
                 conditioning: "Conditioning | dict | None" = None) -> str:
    """The parity table the CLI prints; ``rows`` as measured or as a manifest's ``parity`` list, and the
    conditioning check under it when there is one (a manifest's ``conditioning``)."""
    rows = [Parity.from_dict(p) if isinstance(p, dict) else p for p in rows]
    head = f"{'component':<14} {'PSNR dB':>9} {'max abs':>10} {'cosine':>9}" + ("  gate" if gates else "")
    lines = [head, "-" * len(head)]
    for p in rows:
        ps = "inf" if math.isinf(p.psnr) else f"{p.psnr:.2f}"
        gate = f"  ≥{gates[p.component]:.0f}" if gates and p.component in gates else ""
        lines.append(f"{p.component:<14} {ps:>9} {p.max_abs:>10.3g} {p.cosine:>9.6f}{gate}")
    if conditioning:
        c = Conditioning.from_dict(conditioning) if isinstance(conditioning, dict) else conditioning
        lines.append(f"{'conditioning':<14} {'ratio':>9} {c.ratio:>10.3f} {c.cosine:>9.6f}  ≥{c.gate:g} "
                     "(text response vs PyTorch's)")
    return "\n".join(lines)


# The conditioning check (every export, quantized or not): how strongly the export's UNet answers the text,
# relative to PyTorch fp32. PSNR alone misses a quantized UNet that ignores its prompt: the text moves the
# output by a few percent of its range, so a UNet whose response to the text was quantized away can keep
# 40 dB (a W8A16 UNet was measured answering ~19x more weakly than PyTorch, at a passing PSNR).
CONDITIONING_GATE = 0.9
CONDITIONING_FIX = ("keep the UNet's attention and text inputs at a higher precision (a lighter --quantize, or "
                    "--quantize-component without unet), or calibrate on the model's own prompts")


class ConditioningError(ParityError):
    """The export's UNet answers the text much more weakly than PyTorch's (see :func:`conditioning`)."""


@dataclasses.dataclass(frozen=True)
class Conditioning:
    """``ratio``: std(u(x, text) − u(x, ""))  of the export over the same std of the PyTorch reference, for
    the same x (the UNet graph's output u is x + v, so the difference is the velocity's text response);
    ``cosine``: of the two responses (the direction kept); ``reference_std``: PyTorch's std; ``gate``: the
    lowest ratio that passes."""

    ratio: float
    cosine: float
    reference_std: float
    gate: float = CONDITIONING_GATE

    def as_dict(self) -> dict:
        return {k: round(v, 6) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "Conditioning":
        return cls(float(d["ratio"]), float(d["cosine"]), float(d["reference_std"]), float(d.get("gate", CONDITIONING_GATE)))


def conditioning(ref_text, ref_empty, out_text, out_empty, gate: float = CONDITIONING_GATE) -> Conditioning:
    """The conditioning figures of an export's UNet outputs for a prompt and for the empty prompt (same x),
    against PyTorch's two outputs; raises ParityError on NaN/Inf or a shape mismatch (as :func:`compare`)."""
    for name, ref, out in (("unet (prompt)", ref_text, out_text), ("unet (empty prompt)", ref_empty, out_empty)):
        compare(name, ref, out)
    d_ref = (_np(ref_text) - _np(ref_empty)).ravel()
    d_out = (_np(out_text) - _np(out_empty)).ravel()
    ref_std = float(d_ref.std())
    if ref_std == 0.0:
        raise ParityError("unet: the PyTorch reference does not answer the text at all (its output for a prompt "
                          "equals its output for the empty prompt)", "check the model: its UNet ignores encoder_hidden_states")
    denom = float(np.linalg.norm(d_ref) * np.linalg.norm(d_out))
    return Conditioning(float(d_out.std()) / ref_std, float(d_ref @ d_out / denom) if denom > 0 else 0.0, ref_std, gate)


def check_conditioning(c: Conditioning, fix: str = CONDITIONING_FIX) -> Conditioning:
    """Raise ConditioningError when the export answers the text less than ``c.gate`` times as strongly as
    PyTorch. Returns ``c`` when it passes."""
    if not c.ratio >= c.gate:
        raise ConditioningError(f"unet: the export answers the text {c.ratio:.2f}x as strongly as PyTorch fp32 "
                                f"(std of u(x, prompt) - u(x, \"\") {c.ratio * c.reference_std:.3g} vs "
                                f"{c.reference_std:.3g}), below the {c.gate:g} gate: it loses the prompt", fix)
    return c
