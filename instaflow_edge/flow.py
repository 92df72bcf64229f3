"""The rectified-flow math, in InstaFlow's conventions (docs/DESIGN.md; gnobitab/InstaFlow ``pipeline_rf.py``).

Two clocks are in play:

* UNet time ``tau`` in [0, 1000]: ``tau = 1000`` is pure noise, ``tau = 0`` is data.
* RF time ``s`` in [0, 1]: ``s = 0`` is noise ``z``, ``s = 1`` is data ``x1``; ``tau = 1000 * (1 - s)``.

The velocity field points from noise to data: ``v* = x1 - z``. Sampling integrates it forward in ``s``
with Euler steps of size ``1/N`` at ``tau_i = (1 - i/N) * 1000``; one step is ``x = z + v(z, 1000)``.
Everything here is a pure function of its tensors so the exports can trace it.
"""

from __future__ import annotations

import torch

TAU_MAX = 1000.0  # UNet time of pure noise


def tau_from_s(s: torch.Tensor | float) -> torch.Tensor | float:
    """UNet time of RF time ``s`` (``s = 0`` noise → ``tau = 1000``)."""
    return TAU_MAX * (1.0 - s)


def euler_schedule(num_steps: int) -> list[float]:
    """UNet times of an ``num_steps``-step Euler sampler: ``tau_i = (1 - i/N) * 1000``, i = 0..N-1."""
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    return [(1.0 - i / num_steps) * TAU_MAX for i in range(num_steps)]


def edit_schedule(strength: float, num_steps: int) -> list[tuple[float, float]]:
    """Image-to-image: ``(tau_i, ds)`` of ``num_steps`` Euler steps from ``s0 = 1 - strength`` to ``s = 1``
    (step ``ds = strength / N`` at ``s_i = s0 + i·ds``). ``strength = 1`` is :func:`euler_schedule`."""
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength!r}")
    ds = strength / num_steps
    s0 = 1.0 - strength
    return [(TAU_MAX * (1.0 - (s0 + i * ds)), ds) for i in range(num_steps)]


def edit_start(z: torch.Tensor, x1: torch.Tensor, strength: float) -> torch.Tensor:
    """Where an edit starts: the straight path at ``s0 = 1 - strength``, ``x = s0·x1 + (1 - s0)·z``
    (``x1`` the image's latent, ``z`` the seed's noise; ``strength = 1`` is the noise itself)."""
    if strength == 1.0:
        return z
    s0 = 1.0 - strength
    return s0 * x1 + (1.0 - s0) * z


def euler_step(x: torch.Tensor, v: torch.Tensor, num_steps: int) -> torch.Tensor:
    """One Euler step of size ``1/N``: ``x + v / N``."""
    return x + v * (1.0 / num_steps)


def one_step(z: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The one-step generator's update: ``x = z + v(z, tau=1000)``."""
    return z + v


def interpolate(z: torch.Tensor, x1: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """RF interpolation ``x_s = s * x1 + (1 - s) * z``; ``s`` has shape (B,) and broadcasts."""
    s = s.reshape(-1, *([1] * (x1.dim() - 1))).to(x1.dtype)
    return s * x1 + (1.0 - s) * z


def target_velocity(z: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """The regression target of rectified flow: ``v* = x1 - z``."""
    return x1 - z


def guided(v_uncond: torch.Tensor, v_cond: torch.Tensor, guidance: float) -> torch.Tensor:
    """Classifier-free guidance as InstaFlow applies it: ``v_u + g * (v_c - v_u)``."""
    return v_uncond + guidance * (v_cond - v_uncond)
