"""Baselines V: group mean + delta_V (the paper's Eq. 4), leave-one-out, constant, running, schedule."""

import pytest
import torch

from asymre.baselines import RunningBaseline, compute_baseline, delta_v_at, group_mean, leave_one_out_mean
from tests.helpers import mixed_groups


def test_group_mean_plus_delta_v():
    r, g = mixed_groups()
    v = compute_baseline("group_mean", r, g, delta_v=-0.1)
    assert torch.allclose(v, torch.tensor([0.4, 0.4, 0.4, 0.4, 0.9, 0.4]))


def test_group_mean_vectorised_equals_loop():
    torch.manual_seed(1)
    r = torch.rand(40)
    g = torch.randint(0, 7, (40,))
    g[:7] = torch.arange(7)
    ref = torch.tensor([r[g == gi].mean().item() for gi in g.tolist()])
    assert torch.allclose(group_mean(r, g), ref)
    loo_ref = torch.tensor([(r[g == g[i]].sum() - r[i]).item() / max((g == g[i]).sum().item() - 1, 1) if (g == g[i]).sum() > 1 else r[i].item()
                            for i in range(40)])
    assert torch.allclose(leave_one_out_mean(r, g), loo_ref, atol=1e-6)


def test_leave_one_out_and_singleton():
    """Singletons: both group_mean and leave_one_out give V = r + delta_V, so the advantage is -delta_V."""
    r, g = mixed_groups()
    v = compute_baseline("leave_one_out", r, g, delta_v=0.0)
    assert torch.allclose(v[:4], torch.tensor([1 / 3, 2 / 3, 2 / 3, 1 / 3]))
    assert v[4].item() == pytest.approx(1.0)  # singleton falls back to its own reward
    for kind in ("group_mean", "leave_one_out"):
        vv = compute_baseline(kind, r, g, delta_v=-0.1)
        assert (r[5] - vv[5]).item() == pytest.approx(0.1)


def test_constant_baseline():
    r, g = mixed_groups()
    v = compute_baseline("constant", r, g, delta_v=-0.1, constant_v=0.5)
    assert torch.allclose(v, torch.full_like(r, 0.4))


def test_running_baseline_uses_past_groups_only():
    rb = RunningBaseline(momentum=0.5)
    r1, g1 = torch.tensor([1.0, 1.0, 0.0, 0.0]), torch.tensor([0, 0, 1, 1])
    v1 = compute_baseline("running", r1, g1, 0.0, running=rb, prompt_uids=["a", "b"])
    assert torch.allclose(v1, torch.tensor([1.0, 1.0, 0.0, 0.0]))  # first sight: current group mean
    r2 = torch.tensor([0.0, 0.0, 1.0, 1.0])
    v2 = compute_baseline("running", r2, g1, 0.0, running=rb, prompt_uids=["a", "b"])
    assert torch.allclose(v2, torch.tensor([1.0, 1.0, 0.0, 0.0]))  # estimate from the past, not this group
    assert rb.estimates == {"a": 0.5, "b": 0.5}
    state = rb.state_dict()
    rb2 = RunningBaseline()
    rb2.load_state_dict(state)
    assert rb2.estimates == rb.estimates and rb2.momentum == 0.5


def test_delta_v_schedule():
    assert delta_v_at(5, -0.1) == -0.1
    assert delta_v_at(0, -0.3, -0.1, 10) == pytest.approx(-0.3)
    assert delta_v_at(5, -0.3, -0.1, 10) == pytest.approx(-0.2)
    assert delta_v_at(50, -0.3, -0.1, 10) == pytest.approx(-0.1)


def test_unknown_baseline_is_named():
    r, g = mixed_groups()
    with pytest.raises(ValueError, match="median"):
        compute_baseline("median", r, g, 0.0)
