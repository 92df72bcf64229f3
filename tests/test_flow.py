"""The flow math, pinned to InstaFlow's conventions (docs/DESIGN.md)."""

import pytest
import torch

from instaflow_edge import flow


def test_tau_of_s_endpoints():
    assert flow.tau_from_s(0.0) == 1000.0  # s = 0 is noise
    assert flow.tau_from_s(1.0) == 0.0  # s = 1 is data
    assert flow.tau_from_s(0.25) == 750.0


@pytest.mark.parametrize("n,expected", [(1, [1000.0]), (2, [1000.0, 500.0]), (4, [1000.0, 750.0, 500.0, 250.0])])
def test_euler_schedule(n, expected):
    assert flow.euler_schedule(n) == pytest.approx(expected)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_euler_schedule_rejects_bad_steps(bad):
    with pytest.raises(ValueError, match="num_steps"):
        flow.euler_schedule(bad)


def test_euler_step_and_one_step():
    x, v = torch.tensor([1.0, -2.0]), torch.tensor([4.0, 8.0])
    assert torch.equal(flow.euler_step(x, v, 4), torch.tensor([2.0, 0.0]))
    assert torch.equal(flow.one_step(x, v), torch.tensor([5.0, 6.0]))
    assert torch.equal(flow.euler_step(x, v, 1), flow.one_step(x, v))


def test_interpolation_and_target():
    z = torch.zeros(3, 2, 2)
    x1 = torch.ones(3, 2, 2) * 2
    s = torch.tensor([0.0, 0.5, 1.0])
    xs = flow.interpolate(z, x1, s)
    assert torch.equal(xs[0], z[0]) and torch.equal(xs[2], x1[2])
    assert torch.allclose(xs[1], torch.ones(2, 2))
    assert torch.equal(flow.target_velocity(z, x1), x1 - z)
    # a straight path: Euler with the true velocity lands on x1 in one step from any s
    v = flow.target_velocity(z, x1)
    assert torch.allclose(flow.one_step(z, v), x1)


def test_guidance():
    vu, vc = torch.tensor([1.0]), torch.tensor([3.0])
    assert flow.guided(vu, vc, 1.0).item() == 3.0
    assert flow.guided(vu, vc, 0.0).item() == 1.0
    assert flow.guided(vu, vc, 2.0).item() == 5.0
