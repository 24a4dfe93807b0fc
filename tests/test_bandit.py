"""Bandit lab: the simulated flow against Theorem 4.2's closed form, collapse at V >= V^mu, policy iteration."""

import json

import numpy as np
import pytest

from asymre.bandit import Bandit, closed_form_limit, expected_gradient, main, policy_iteration, run_flow, sampled_gradient, softmax, tv


@pytest.fixture(scope="module")
def bandit():
    return Bandit.paper(k=100, seed=0)  # the paper's settings: 100 arms, rewards U[0, 1], mu uniform


@pytest.mark.parametrize("delta", [-0.3, -0.1, -0.02])
def test_flow_limit_matches_closed_form(bandit, delta):
    """If this fails, either the expected gradient or the closed form of Thm 4.2 is wrong."""
    v = bandit.v_mu + delta
    pi = softmax(run_flow(bandit.mu, bandit.r, v, steps=50000, lr=1.0))
    cf = closed_form_limit(bandit.mu, bandit.r, v)
    assert abs(cf.sum() - 1) < 1e-12 and (cf >= 0).all()
    assert tv(pi, cf) < 1e-3
    assert 1 < (cf > 0).sum() < 100  # a genuinely partial support, not a trivial case


def test_closed_form_support_shrinks_as_v_rises(bandit):
    sizes = [(closed_form_limit(bandit.mu, bandit.r, bandit.v_mu + d) > 0).sum() for d in (-0.5, -0.3, -0.1, -0.01)]
    assert all(a > b for a, b in zip(sizes, sizes[1:]))


@pytest.mark.parametrize("delta", [0.0, 0.05, 0.2])
def test_at_or_above_v_mu_the_limit_is_one_arm(bandit, delta):
    """The phase transition: V >= V^mu concentrates the limit on a single arm."""
    v = bandit.v_mu + delta
    pi = softmax(run_flow(bandit.mu, bandit.r, v, steps=20000, lr=100.0))
    assert pi.max() > 0.99
    assert (pi > 1e-3).sum() == 1


def test_at_v_mu_the_limit_is_argmax_a(bandit):
    v = bandit.v_mu
    pi = softmax(run_flow(bandit.mu, bandit.r, v, steps=20000, lr=100.0))
    assert int(pi.argmax()) == int(np.argmax(bandit.mu * (bandit.r - v)))


def test_closed_form_rejects_v_at_or_above_v_mu(bandit):
    with pytest.raises(ValueError, match="V < V"):
        closed_form_limit(bandit.mu, bandit.r, bandit.v_mu)


@pytest.mark.parametrize("delta", [-0.2, -0.1, -0.05])
def test_policy_iteration_below_v_mu_never_decreases_reward(bandit, delta):
    curve = policy_iteration(bandit.mu, bandit.r, delta, rounds=40, steps=500, lr=1.0)
    assert all(b >= a - 1e-12 for a, b in zip(curve, curve[1:]))
    assert curve[-1] > curve[0] + 0.3


def test_policy_iteration_above_v_mu_can_lock_on_a_suboptimal_arm():
    """Above V^mu the first run collapses onto argmax a = argmax mu (r - V): with a non-uniform mu that
    favours a mediocre arm, policy iteration locks onto it for good; below V^mu it escapes."""
    r = np.array([1.0, 0.6, 0.1, 0.0])
    mu = np.array([0.02, 0.9, 0.04, 0.04])
    above = policy_iteration(mu, r, +0.1, rounds=10, steps=500, lr=1.0)
    below = policy_iteration(mu, r, -0.2, rounds=10, steps=500, lr=1.0)
    assert above[-1] == pytest.approx(0.6, abs=1e-3)
    assert below[-1] > 0.95


def test_sampled_gradient_is_unbiased(bandit):
    logits = np.log(bandit.mu) + np.random.default_rng(0).normal(size=100) * 0.1
    v = bandit.v_mu - 0.1
    rng = np.random.default_rng(1)
    est = np.mean([sampled_gradient(logits, bandit.mu, bandit.r, v, 1000, rng) for _ in range(200)], axis=0)
    exact = expected_gradient(logits, bandit.mu, bandit.r, v)
    assert np.abs(est - exact).max() < 5e-4


def test_cli_writes_figures(tmp_path):
    main(["--out", str(tmp_path), "--steps", "2000", "--rounds", "5", "--inner", "100"])
    for name in ("fig1_support_vs_v.png", "fig2_policy_iteration.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10000
    res = json.loads((tmp_path / "bandit.json").read_text())
    assert len(res["sweep"]) == 36 and len(res["policy_iteration"]["-0.1"]) == 6


def test_paper_fig2_setting_separates_below_from_above():
    """At the paper's Fig. 2 settings (100 arms, 40 rounds x 500 steps) V below V^mu ends higher than above."""
    b = Bandit.paper(100, 0).with_random_mu(2.0, 1)
    below = policy_iteration(b.mu, b.r, -0.1, 40, 500)
    above = policy_iteration(b.mu, b.r, +0.1, 40, 500)
    assert below[-1] > above[-1] + 0.1
    assert above[-1] == pytest.approx(above[1], abs=1e-6)  # locked after the first round
