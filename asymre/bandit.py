"""Bandit lab: the paper's tabular theory (Sec. 4) made runnable.

A softmax policy pi = softmax(l) over K arms learns from a behaviour policy mu with the AsymRE
objective  J(l) = sum_y mu(y) (r(y) - V) log pi(y).  Its expected gradient is  a - b * pi  with
a_y = mu(y)(r(y) - V) and b = V^mu - V (V^mu = E_mu[r]).  For V < V^mu the flow converges to the
closed form of Theorem 4.2,  pi*(y) = (a_y - tau)_+ / b  with  sum_y (a_y - tau)_+ = b;  at V = V^mu it
concentrates on argmax a; above it collapses to one arm.  Policy iteration sets mu <- pi after each
inner run.  Expected-gradient and sampled (stochastic) updates are both offered.

Run  `python -m asymre.bandit --out runs/bandit`  to reproduce Fig. 1 and Fig. 2 at the paper's
settings (100 arms, rewards U[0, 1], lr 1, pi_0 = mu, 40 rounds of 500 steps); it writes PNGs and a
JSON of the numbers. NumPy only: the lab is small enough that autograd would only add overhead.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max()
    e = np.exp(z)
    return e / e.sum()


def expected_reward(pi: np.ndarray, r: np.ndarray) -> float:
    return float(pi @ r)


def expected_gradient(logits: np.ndarray, mu: np.ndarray, r: np.ndarray, v: float) -> np.ndarray:
    """dJ/dl = a - b * pi with a = mu (r - V), b = V^mu - V."""
    a = mu * (r - v)
    return a - a.sum() * softmax(logits)


def sampled_gradient(logits: np.ndarray, mu: np.ndarray, r: np.ndarray, v: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """Unbiased estimate from n arms drawn from mu: mean over samples of (r_y - V) (e_y - pi)."""
    pi = softmax(logits)
    ys = rng.choice(len(mu), size=n, p=mu)
    counts = np.bincount(ys, weights=r[ys] - v, minlength=len(mu))
    return (counts - counts.sum() * pi) / n


def closed_form_limit(mu: np.ndarray, r: np.ndarray, v: float) -> np.ndarray:
    """Theorem 4.2 (V < V^mu): pi*(y) = (a_y - tau)_+ / b, tau solving sum_y (a_y - tau)_+ = b."""
    a = mu * (r - v)
    b = a.sum()
    if b <= 1e-12 * max(1.0, float(np.abs(a).sum())):  # V >= V^mu, up to rounding
        raise ValueError(f"closed form needs V < V^mu (V={v}, V^mu={float(mu @ r)})")
    srt = np.sort(a)[::-1]
    csum = np.cumsum(srt)
    k = np.arange(1, len(a) + 1)
    taus = (csum - b) / k  # tau if the top-k arms are the support
    valid = srt - taus > 0
    kk = int(np.nonzero(valid)[0].max())
    tau = taus[kk]
    return np.clip(a - tau, 0.0, None) / b


def run_flow(mu: np.ndarray, r: np.ndarray, v: float, steps: int, lr: float = 1.0, logits0: np.ndarray | None = None,
             sampled: int = 0, seed: int = 0) -> np.ndarray:
    """Gradient ascent on J from logits0 (default log mu, i.e. pi_0 = mu); sampled > 0 uses that many samples a step."""
    logits = np.log(mu).copy() if logits0 is None else logits0.copy()
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        g = sampled_gradient(logits, mu, r, v, sampled, rng) if sampled else expected_gradient(logits, mu, r, v)
        logits += lr * g
    return logits


def tv(p: np.ndarray, q: np.ndarray) -> float:
    return 0.5 * float(np.abs(p - q).sum())


def support_size(pi: np.ndarray, threshold: float = 1e-4) -> int:
    return int((pi > threshold).sum())


def policy_iteration(mu0: np.ndarray, r: np.ndarray, delta_v: float, rounds: int, steps: int, lr: float = 1.0,
                     sampled: int = 0, seed: int = 0) -> list[float]:
    """mu <- pi after each inner run of `steps`; V = V^mu + delta_v each round. Returns E_pi[r] after each round (index 0: start)."""
    mu = mu0.copy()
    rewards = [expected_reward(mu, r)]
    for k in range(rounds):
        v = expected_reward(mu, r) + delta_v
        logits = run_flow(mu, r, v, steps, lr, sampled=sampled, seed=seed + k)
        mu = softmax(logits)
        mu = np.clip(mu, 1e-300, None) / np.clip(mu, 1e-300, None).sum()
        rewards.append(expected_reward(mu, r))
    return rewards


@dataclass
class Bandit:
    mu: np.ndarray
    r: np.ndarray

    @staticmethod
    def paper(k: int = 100, seed: int = 0) -> Bandit:
        """The paper's bandit: K arms, rewards U[0, 1]; mu = uniform."""
        rng = np.random.default_rng(seed)
        return Bandit(mu=np.full(k, 1.0 / k), r=rng.uniform(0.0, 1.0, size=k))

    def with_random_mu(self, logit_std: float = 2.0, seed: int = 1) -> Bandit:
        """Same rewards, a non-uniform behaviour policy mu = softmax(N(0, logit_std^2))."""
        logits = np.random.default_rng(seed).normal(size=len(self.r)) * logit_std
        return Bandit(mu=softmax(logits), r=self.r)

    @property
    def v_mu(self) -> float:
        return expected_reward(self.mu, self.r)


def sweep_v(bandit: Bandit, v_values: np.ndarray, steps: int, lr: float) -> list[dict]:
    """Fig. 1: for each V, the limit policy's support size and expected reward (closed form where it exists, simulation always)."""
    rows = []
    for v in v_values:
        pi_sim = softmax(run_flow(bandit.mu, bandit.r, float(v), steps, lr))
        row = {"V": float(v), "support_sim": support_size(pi_sim), "reward_sim": expected_reward(pi_sim, bandit.r)}
        if v < bandit.v_mu:
            pi_cf = closed_form_limit(bandit.mu, bandit.r, float(v))
            row.update(support_closed=int((pi_cf > 0).sum()), reward_closed=expected_reward(pi_cf, bandit.r), tv=tv(pi_sim, pi_cf))
        rows.append(row)
    return rows


def make_figures(out: Path, k: int = 100, seed: int = 0, steps: int = 20000, lr: float = 1.0, rounds: int = 40,
                 inner: int = 500, deltas: tuple[float, ...] = (-0.2, -0.1, -0.05, 0.0, 0.05, 0.1)) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    bandit = Bandit.paper(k, seed)
    vs = bandit.v_mu + np.linspace(-0.5, 0.2, 36)
    rows = sweep_v(bandit, vs, steps, lr)

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
    ax[0].plot([x["V"] for x in rows], [x["support_sim"] for x in rows], "o", label="simulated flow")
    cf = [x for x in rows if "support_closed" in x]
    ax[0].plot([x["V"] for x in cf], [x["support_closed"] for x in cf], "-", label="closed form (Thm 4.2)")
    ax[1].plot([x["V"] for x in rows], [x["reward_sim"] for x in rows], "o", label="simulated flow")
    ax[1].plot([x["V"] for x in cf], [x["reward_closed"] for x in cf], "-", label="closed form")
    for a, title in zip(ax, ["support of the limit policy", "expected reward of the limit policy"]):
        a.axvline(bandit.v_mu, color="k", ls="--", lw=1, label="V = V^mu")
        a.set_xlabel("baseline V")
        a.set_title(title)
        a.legend(fontsize=8)
    ax[0].set_yscale("log")
    fig.suptitle(f"Fig. 1 replica: {k}-armed bandit, mu uniform, {steps} expected-gradient steps, lr {lr}")
    fig.tight_layout()
    fig.savefig(out / "fig1_support_vs_v.png", dpi=110)
    plt.close(fig)

    # Fig. 2 starts from a non-uniform mu (pi_0 = mu still): with uniform mu, argmax_y mu(y)(r(y) - V)
    # is the best arm itself, so even V > V^mu would lock onto the right arm and hide the effect.
    start = bandit.with_random_mu(logit_std=2.0, seed=seed + 1)
    curves = {d: policy_iteration(start.mu, start.r, d, rounds, inner, lr) for d in deltas}
    fig, ax = plt.subplots(figsize=(6, 4))
    for d, c in curves.items():
        ax.plot(range(len(c)), c, label=f"V = V^mu {d:+.2f}")
    ax.axhline(bandit.r.max(), color="k", ls=":", lw=1, label="best arm")
    ax.set_xlabel("policy-iteration round (mu <- pi)")
    ax.set_ylabel("expected reward E_pi[r]")
    ax.set_title(f"Fig. 2 replica: {rounds} rounds x {inner} steps, mu_0 = softmax(N(0, 4))")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "fig2_policy_iteration.png", dpi=110)
    plt.close(fig)

    result = {"v_mu": bandit.v_mu, "best_arm_reward": float(bandit.r.max()), "sweep": rows,
              "policy_iteration": {str(d): c for d, c in curves.items()}}
    (out / "bandit.json").write_text(json.dumps(result, indent=1))
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Reproduce the AsymRE paper's bandit figures (Fig. 1 and 2).")
    p.add_argument("--out", default="runs/bandit", help="folder for the PNGs and bandit.json")
    p.add_argument("--arms", type=int, default=100, help="number of arms (paper: 100)")
    p.add_argument("--seed", type=int, default=0, help="seed of the reward draw")
    p.add_argument("--steps", type=int, default=20000, help="expected-gradient steps per V in the sweep")
    p.add_argument("--lr", type=float, default=1.0, help="learning rate (paper: 1)")
    p.add_argument("--rounds", type=int, default=40, help="policy-iteration rounds (paper: 40)")
    p.add_argument("--inner", type=int, default=500, help="steps per round (paper: 500)")
    a = p.parse_args(argv)
    res = make_figures(Path(a.out), a.arms, a.seed, a.steps, a.lr, a.rounds, a.inner)
    print(f"V^mu = {res['v_mu']:.4f}, best arm = {res['best_arm_reward']:.4f}")
    for d, c in res["policy_iteration"].items():
        print(f"policy iteration, V = V^mu {float(d):+.2f}: E[r] {c[0]:.3f} -> {c[-1]:.3f}")
    print(f"figures written to {a.out}/fig1_support_vs_v.png, {a.out}/fig2_policy_iteration.png")


if __name__ == "__main__":
    main()
