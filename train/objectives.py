"""Training objectives: what the engine minimises, given a model and a local batch.

An objective is a callable ``objective(model, batch, rnd) -> scalar loss`` (mean over the local batch).
``batch`` is the dict a :class:`~instaflow_edge.train.engine.BatchSource` returns (latents ``x1``,
text conditioning ``cond``, and fixed noise ``z`` where the stage has pairs). ``rnd`` is the step's
:class:`~instaflow_edge.train.engine.StepRandom`: every random draw goes through it so that the
samples of a global batch get the same noise and time whatever the number of processes.

* teacher (1-rectified flow): independent (z, x1), ``s ~ U(0, 1)`` — :class:`RectifiedFlowObjective`;
* reflow (2-rectified flow): the same objective on fixed (z, x1) pairs (the batch carries ``z``);
* distill: ``s = 0`` and a loss on the one-step output ``z + v(z)`` — :class:`OneStepObjective`.

The math is flow.py's (docs/DESIGN.md): ``x_s = s·x1 + (1 − s)·z``, target ``x1 − z``, UNet at
``τ = 1000·(1 − s)``.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from ..flow import interpolate, one_step, target_velocity, tau_from_s


class Objective(Protocol):
    def __call__(self, model: torch.nn.Module, batch: dict, rnd) -> torch.Tensor: ...


def unet_velocity(model, x: torch.Tensor, tau: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """The UNet's output at (x, τ, text); τ is (B,) float."""
    return model(x, tau, encoder_hidden_states=cond, return_dict=False)[0]


def rf_loss(v_pred: torch.Tensor, z: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """Rectified-flow regression loss: ``mean((v − (x1 − z))²)`` over every element."""
    return F.mse_loss(v_pred.float(), target_velocity(z, x1).float())


class RectifiedFlowObjective:
    """The RF loss at ``s ~ U(0, 1)``; ``z`` from the batch when it has one (reflow pairs), else fresh
    N(0, 1) noise (1-rectified flow)."""

    def __call__(self, model, batch: dict, rnd) -> torch.Tensor:
        x1, cond = batch["x1"], batch["cond"]
        z = batch["z"] if "z" in batch else rnd.normal(x1.shape[1:], device=x1.device, dtype=x1.dtype)
        s = rnd.uniform(device=x1.device, dtype=x1.dtype)
        x_s = interpolate(z, x1, s)
        v = unet_velocity(model, x_s, tau_from_s(s), cond)
        return rf_loss(v, z, x1)


def l2_distance(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(pred.float(), target.float())


class OneStepObjective:
    """Distillation at ``s = 0``: ``distance(z + v(z, τ=1000), x1)`` on fixed (z, x1) pairs; the
    distance is pluggable (L2, pseudo-Huber or LPIPS: losses.py)."""

    def __init__(self, distance: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = l2_distance):
        self.distance = distance

    def __call__(self, model, batch: dict, rnd) -> torch.Tensor:
        z, x1, cond = batch["z"], batch["x1"], batch["cond"]
        tau = z.new_full((z.shape[0],), float(tau_from_s(0.0)))
        return self.distance(one_step(z, unet_velocity(model, z, tau, cond)), x1)


def _blocks(unet) -> dict:
    """The UNet's blocks whose outputs BK-SDM's feature loss compares: every down and up stage and the
    mid-block (where there is one)."""
    out = {f"down_blocks.{i}": b for i, b in enumerate(unet.down_blocks)}
    if unet.mid_block is not None:
        out["mid_block"] = unet.mid_block
    out.update({f"up_blocks.{i}": b for i, b in enumerate(unet.up_blocks)})
    return out


def _capture(blocks: dict, store: dict) -> list:
    def hook(name):
        def fn(module, args, output):
            store[name] = output[0] if isinstance(output, tuple) else output
        return fn

    return [b.register_forward_hook(hook(n)) for n, b in blocks.items()]


class TeacherDistillObjective:
    """Recovery of a pruned student, as BK-SDM trains it: the task loss ``distance(z + v_s(z), x1)`` on the
    pairs, plus the output loss ``mse(z + v_s(z), z + v_t(z))`` against the unpruned teacher, plus
    ``feature_weight × Σ mse(f_s, f_t)`` over the outputs of the blocks both UNets have (the stages and,
    where the student kept it, the mid-block). The teacher is frozen."""

    def __init__(self, teacher: torch.nn.Module, distance: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = l2_distance,
                 feature_weight: float = 0.0, output_weight: float = 1.0):
        self.teacher, self.distance = teacher.eval().requires_grad_(False), distance
        self.feature_weight, self.output_weight = float(feature_weight), float(output_weight)

    def __call__(self, model, batch: dict, rnd) -> torch.Tensor:
        z, x1, cond = batch["z"], batch["x1"], batch["cond"]
        tau = z.new_full((z.shape[0],), float(tau_from_s(0.0)))
        student = getattr(model, "module", model)  # DDP wraps it; the blocks are the inner module's
        fs: dict = {}
        ft: dict = {}
        names = list(_blocks(student)) if self.feature_weight > 0 else []
        t_blocks = _blocks(self.teacher)
        hooks = _capture({n: b for n, b in _blocks(student).items() if n in names}, fs)
        hooks += _capture({n: t_blocks[n] for n in names if n in t_blocks}, ft)
        try:
            x = one_step(z, unet_velocity(model, z, tau, cond))
            with torch.no_grad():
                x_t = one_step(z, unet_velocity(self.teacher, z, tau, cond))
        finally:
            for h in hooks:
                h.remove()
        loss = self.distance(x, x1) + self.output_weight * F.mse_loss(x.float(), x_t.float())
        if self.feature_weight > 0:
            feat = sum(F.mse_loss(fs[n].float(), ft[n].float()) for n in fs if n in ft)
            loss = loss + self.feature_weight * feat
        return loss
