"""Loss functions: exact values on hand-built tensors, vectorised == naive loop, gradients, masking."""

import math

import pytest
import torch

from asymre.advantages import grpo_advantages
from asymre.loss import asymre_loss, grpo_loss, reinforce_loss, token_logprobs


def _case():
    # 3 sequences, 4 positions; mask picks completion tokens (prompt and padding are 0).
    logp = torch.tensor([[-9.0, -1.0, -2.0, -5.0], [-9.0, -9.0, -0.5, -0.5], [-9.0, -3.0, -7.0, -7.0]], requires_grad=True)
    mask = torch.tensor([[0, 1, 1, 0], [0, 0, 1, 1], [0, 1, 0, 0]])
    rewards = torch.tensor([1.0, 0.0, 1.0])
    return logp, mask, rewards


def test_asymre_exact_value():
    """Hand-computed: seq log-probs -3, -1, -3; V = 0.5; loss = -mean((r - V) * logp)."""
    logp, mask, r = _case()
    v = torch.full((3,), 0.5)
    loss, m = asymre_loss(logp, mask, r - v, v)
    expected = -((0.5 * -3.0) + (-0.5 * -1.0) + (0.5 * -3.0)) / 3
    assert loss.item() == pytest.approx(expected)
    assert m["loss/frac_positive"] == pytest.approx(2 / 3) and m["loss/frac_negative"] == pytest.approx(1 / 3)
    assert m["loss/positive_weight_share"] == pytest.approx(1.0 / 1.5)
    assert m["loss/baseline_mean"] == pytest.approx(0.5) and m["loss/logprob_mean"] == pytest.approx(-7 / 3)
    assert m["loss/advantage_mean"] == pytest.approx(0.5 / 3)


def test_token_mean_aggregation():
    logp, mask, r = _case()
    v = torch.full((3,), 0.5)
    loss, _ = asymre_loss(logp, mask, r - v, v, aggregation="token_mean")
    expected = -((0.5 * -3.0) + (-0.5 * -1.0) + (0.5 * -3.0)) / 5  # 5 completion tokens
    assert loss.item() == pytest.approx(expected)


def test_vectorised_equals_naive_loop():
    """The batched loss equals a per-sequence, per-token Python loop, values and gradients."""
    torch.manual_seed(0)
    B, T = 6, 9
    logp = -torch.rand(B, T) * 3
    mask = (torch.rand(B, T) > 0.3).long()
    r = torch.randint(0, 2, (B,)).float()
    v = torch.rand(B)
    a = logp.clone().requires_grad_(True)
    loss, _ = asymre_loss(a, mask, r - v, v)
    loss.backward()
    b = logp.clone().requires_grad_(True)
    total = 0.0
    for i in range(B):
        s = 0.0
        for t in range(T):
            if mask[i, t]:
                s = s + b[i, t]
        total = total + (-(r[i] - v[i]) * s)
    naive = total / B
    naive.backward()
    assert loss.item() == pytest.approx(naive.item(), rel=1e-6)
    assert torch.allclose(a.grad, b.grad)


def test_masked_positions_get_no_gradient():
    logp, mask, r = _case()
    loss, _ = asymre_loss(logp, mask, r - 0.5, torch.full((3,), 0.5))
    loss.backward()
    assert torch.all(logp.grad[mask == 0] == 0)
    assert torch.all(logp.grad[mask == 1] != 0)


def test_lowering_v_raises_weight_on_positive_samples():
    """The asymmetry the paper is about: a lower V pushes successes up harder and failures down less."""
    logp, mask, r = _case()
    grads = []
    for v in (0.8, 0.5, 0.2):
        x = logp.detach().clone().requires_grad_(True)
        loss, m = asymre_loss(x, mask, r - v, torch.full((3,), v))
        loss.backward()
        grads.append((x.grad[0, 1].item(), x.grad[1, 2].item(), m["loss/positive_weight_share"]))
    pos = [-g[0] for g in grads]  # ascent direction on a rewarded sample's token
    neg = [g[1] for g in grads]  # descent strength on an unrewarded sample's token
    share = [g[2] for g in grads]
    assert pos[0] < pos[1] < pos[2]
    assert neg[0] > neg[1] > neg[2]
    assert share[0] < share[1] < share[2]


def test_micro_batch_normalizer_sums_to_full_batch():
    """Summing micro-batch losses with the whole batch's normaliser gives the full-batch loss."""
    logp, mask, r = _case()
    v = torch.full((3,), 0.3)
    for agg, norm in (("seq_mean", 3), ("token_mean", int(mask.sum()))):
        full, _ = asymre_loss(logp, mask, r - v, v, aggregation=agg)
        parts = sum(asymre_loss(logp[i : i + 1], mask[i : i + 1], (r - v)[i : i + 1], v[i : i + 1], agg, norm)[0] for i in range(3))
        assert parts.item() == pytest.approx(full.item())


def test_reinforce_is_asymre_with_zero_baseline():
    logp, mask, r = _case()
    a, _ = reinforce_loss(logp, mask, r)
    b, _ = asymre_loss(logp, mask, r - torch.zeros(3), torch.zeros(3))
    assert a.item() == b.item() == pytest.approx(-(-3.0 + -3.0) / 3)


def test_grpo_clips_the_ratio():
    """With rho > 1 + eps and A > 0 the clipped term wins and the gradient vanishes; at rho = 1 GRPO is
    the advantage-weighted log-prob gradient."""
    mask = torch.ones(1, 2)
    old = torch.tensor([[-1.0, -1.0]])
    cur = torch.tensor([[-0.5, -1.0]], requires_grad=True)  # first token ratio e^0.5 = 1.65 > 1.2
    loss, m = grpo_loss(cur, old, mask, torch.tensor([1.0]), clip_eps=0.2)
    loss.backward()
    assert cur.grad[0, 0].item() == 0.0 and cur.grad[0, 1].item() == pytest.approx(-1.0)
    assert loss.item() == pytest.approx(-(1.2 + 1.0))
    assert m["loss/clip_frac"] == pytest.approx(0.5)


def test_grpo_advantages_group_normalised():
    r = torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    g = torch.tensor([0, 0, 0, 0, 1, 1])
    adv = grpo_advantages(r, g)
    assert adv[:4].mean().abs() < 1e-6 and adv[4:].abs().max() < 1e-6  # all-equal group -> 0
    assert adv[0].item() == pytest.approx(0.25 / (math.sqrt(0.1875) + 1e-4))


def test_token_logprobs_matches_log_softmax():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    ref = torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    assert torch.allclose(token_logprobs(logits, labels), ref, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [1, 3, 1024])
def test_chunked_logprobs_and_entropy_equal_the_plain_path(dtype, chunk):
    """Values and gradients of the chunked path equal autograd through the plain one (fp32 maths on the same logits),
    for a non-contiguous slice of the logits as the learner passes it, chunks that do not divide the length included."""
    from asymre.loss import token_logprobs_and_entropy

    g = torch.Generator().manual_seed(0)
    full = (torch.randn(3, 8, 50, generator=g) * 3).to(dtype).requires_grad_()
    labels = torch.randint(0, 50, (3, 7), generator=g)
    weights = torch.randn(3, 7, generator=g)  # an arbitrary upstream gradient
    before = full.detach().clone()

    logp, ent = token_logprobs_and_entropy(full[:, :-1], labels, chunk=chunk)
    (logp * weights).sum().backward()
    assert torch.equal(full.detach(), before)  # the logits are the model's: never written to
    got_grad, full.grad = full.grad.clone(), None

    lf = full[:, :-1].float()
    ref_logp = token_logprobs(full[:, :-1], labels)
    ref_ent = torch.logsumexp(lf, -1) - (torch.softmax(lf, -1) * lf).sum(-1)
    (ref_logp * weights).sum().backward()
    assert logp.dtype == torch.float32 and not ent.requires_grad
    assert torch.allclose(logp, ref_logp, atol=1e-5) and torch.allclose(ent, ref_ent.detach(), atol=1e-4)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert got_grad.dtype == dtype and torch.allclose(got_grad.float(), full.grad.float(), atol=tol)
    assert got_grad[:, -1].abs().sum() == 0  # the last position predicts nothing: no gradient
