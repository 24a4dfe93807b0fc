"""Advantages per loss (asymre/advantages.py) and the loss table (asymre/loss.py): one entry per loss.name,
each giving what multiplies log pi(y|x) and what the metrics report."""

import math

import pytest
import torch

from asymre.advantages import ADVANTAGES, asymre_advantages, grpo_advantages, reinforce_advantages
from asymre.baselines import RunningBaseline
from asymre.config import ConfigError, load_config
from asymre.loss import LOSSES, NEEDS_BEHAVIOUR_LOGPROBS, asymre_loss, grpo_loss, reinforce_loss
from tests.helpers import mixed_groups


def test_asymre_advantage_is_reward_minus_group_mean_plus_delta_v():
    r, g = mixed_groups()
    a = asymre_advantages(r, g, "group_mean", delta_v=-0.1)
    assert a.baseline.tolist() == pytest.approx([0.4, 0.4, 0.4, 0.4, 0.9, 0.4])
    assert a.advantages.tolist() == pytest.approx([0.6, -0.4, -0.4, 0.6, 0.1, 0.1])
    assert torch.equal(a.advantages, r - a.baseline)  # exactly r - V, in float32
    assert a.advantages.dtype == torch.float32


def test_reinforce_advantage_is_the_reward_with_zero_baseline():
    r, _ = mixed_groups()
    a = reinforce_advantages(r)
    assert torch.equal(a.advantages, r) and torch.equal(a.baseline, torch.zeros(6))


@pytest.mark.parametrize("step, dv", [(0, -0.3), (2, -0.1), (9, 0.1)])
def test_table_entry_for_asymre_reads_the_config_and_the_delta_v_schedule(step, dv):
    """delta_V at the learner's step (linear from -0.3 to 0.1 over 4 steps), V_hat by loss.baseline."""
    r, g = mixed_groups()
    lc = load_config(None, ["loss.baseline=constant", "loss.constant_v=0.25", "loss.delta_v=-0.3",
                            "loss.delta_v_final=0.1", "loss.delta_v_steps=4"]).loss
    a = ADVANTAGES["asymre"](lc, r, g, step, RunningBaseline(), ["a", "b", "c"])
    assert a.baseline.tolist() == pytest.approx([0.25 + dv] * 6)
    assert a.advantages.tolist() == pytest.approx([x - 0.25 - dv for x in r.tolist()])


def test_table_entries_for_grpo_and_reinforce():
    r, g = mixed_groups()
    lc = load_config(None, []).loss
    grpo = ADVANTAGES["grpo"](lc, r, g, 0, RunningBaseline(), ["a", "b", "c"])
    assert torch.equal(grpo.advantages, grpo_advantages(r, g)) and grpo.baseline is None
    assert grpo.advantages[0].item() == pytest.approx(0.5 / (0.5 + 1e-4)) and grpo.advantages[4:].abs().max() < 1e-6
    rf = ADVANTAGES["reinforce"](lc, r, g, 0, RunningBaseline(), ["a", "b", "c"])
    assert torch.equal(rf.advantages, r) and torch.equal(rf.baseline, torch.zeros(6))


def test_every_configurable_loss_has_advantages_and_a_loss_and_others_fail_clearly():
    from asymre.config import _CHOICES

    assert set(LOSSES) == set(ADVANTAGES) == _CHOICES["loss.name"]
    assert NEEDS_BEHAVIOUR_LOGPROBS <= set(LOSSES)
    with pytest.raises(ConfigError, match=r"loss\.name='ppo' is not one of"):
        load_config(None, ["loss.name=ppo"])


def _case():
    logp = torch.tensor([[-9.0, -1.0, -2.0, -5.0], [-9.0, -9.0, -0.5, -0.5], [-9.0, -3.0, -7.0, -7.0]])
    old = logp - torch.tensor([[0.0, 0.1, -0.3, 0.0], [0.0, 0.0, 0.2, 0.05], [0.0, -0.4, 0.0, 0.0]])
    mask = torch.tensor([[0, 1, 1, 0], [0, 0, 1, 1], [0, 1, 0, 0]])
    return logp, old, mask


@pytest.mark.parametrize("aggregation, normalizer", [("seq_mean", 7), ("token_mean", 11)])
def test_loss_table_entries_are_the_pure_losses(aggregation, normalizer):
    """Each entry passes the right arguments to its loss; metric names per loss are what the learner logs."""
    logp, old, mask = _case()
    adv, v = torch.tensor([0.6, -0.4, 0.3]), torch.tensor([0.4, 0.4, 0.7])
    opts = {"clip_eps": 0.1, "aggregation": aggregation, "normalizer": normalizer}
    got = LOSSES["asymre"](logp, mask, adv, v, None, **opts)
    want = asymre_loss(logp, mask, adv, v, aggregation, normalizer)
    assert got[0].item() == want[0].item() and got[1] == want[1]
    assert got[1]["loss/baseline_mean"] == pytest.approx(0.5) and "loss/clip_frac" not in got[1]
    got = LOSSES["reinforce"](logp, mask, adv, torch.zeros(3), None, **opts)
    want = reinforce_loss(logp, mask, adv, aggregation, normalizer)
    assert got[0].item() == want[0].item() and got[1] == want[1] and got[1]["loss/baseline_mean"] == 0.0
    got = LOSSES["grpo"](logp, mask, adv, None, old, **opts)
    want = grpo_loss(logp, old, mask, adv, 0.1, aggregation, normalizer)
    assert got[0].item() == want[0].item() and got[1] == want[1]
    assert "loss/baseline_mean" not in got[1] and got[1]["loss/clip_frac"] > 0 and not math.isnan(got[1]["loss/ratio_mean"])
