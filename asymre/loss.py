"""Policy-gradient losses as pure tensor functions: tensors in, (loss, metrics) out.

AsymRE (Arnal et al. 2025, Eq. 3-4): maximise  J(pi) = E_{x, y~mu}[(r(x,y) - V) * log pi(y|x)],
so the loss is  -(r - V) * log pi(y|x)  with log pi(y|x) = sum of the completion's token log-probs.
No importance ratio, no clipping, no KL, no reference model: the behaviour policy mu enters only
through which samples were drawn. Lowering V puts weight on successes; V >= V^mu collapses.

Comparison losses for the paper's experiments: GRPO (group-normalised advantage, PPO-style clipped
ratio pi/mu, needs behaviour log-probs) and plain REINFORCE (V = 0).

Each loss takes the per-sample advantages A (what multiplies log pi(y|x)) ready-made: asymre/advantages.py
computes them over the whole step (r - V, GRPO's normalised advantage, or r). `LOSSES` maps `loss.name`
to each loss under one signature, so the learner makes one call whatever the loss.

Aggregation: 'seq_mean' (default; the paper's maths) sums token terms per sequence and averages over
sequences; 'token_mean' (Trinity-RFT style) averages over all completion tokens. For micro-batching,
pass `normalizer` = the whole step's sequence count (seq_mean) or token count (token_mean) so that
summing micro-batch losses gives the full-batch loss exactly.
"""

from __future__ import annotations

from typing import Protocol

import torch


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log pi(label_t | prefix) for each position. logits [B, T, V] predict labels [B, T] -> [B, T].

    Memory-lean: log-softmax via logsumexp, gathered, no [B, T, V] log-prob tensor kept.
    """
    logits = logits.float()  # [B, T, V]
    picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # [B, T]
    return picked - torch.logsumexp(logits, dim=-1)  # [B, T]


class _ChunkedLogProbEntropy(torch.autograd.Function):
    """log pi(label_t | prefix) with its gradient, and the policy entropy at each position (no gradient), computed
    `chunk` positions at a time in float32 from logits kept in their own dtype.

    Memory: the plain path (`token_logprobs` plus an entropy) materialises float32 copies of the whole [B, T, V]
    logits, a softmax and their product, and autograd keeps some for backward: several times the logits tensor.
    Here forward saves only the logits (already alive: the LM head made them) and one log-normaliser per position;
    backward recomputes each chunk's softmax and writes d logp / d logits = onehot(label) - softmax straight into
    the gradient tensor (the gradient itself is one logits-sized tensor, as in any path). Peak extra memory is that
    gradient plus one float32 chunk. Values equal the plain path's up to float rounding."""

    @staticmethod
    def forward(ctx, logits, labels, chunk):  # logits [B, T, V], labels [B, T]
        b, t, _ = logits.shape
        with torch.autocast(logits.device.type, enabled=False):  # float32 maths whatever the caller's autocast
            return _ChunkedLogProbEntropy._forward(ctx, logits, labels, chunk, b, t)

    @staticmethod
    def _forward(ctx, logits, labels, chunk, b, t):
        logp = torch.empty((b, t), dtype=torch.float32, device=logits.device)  # [B, T]
        ent = torch.empty_like(logp)  # [B, T]
        lse = torch.empty_like(logp)  # [B, T] log-normaliser, saved for backward
        for i in range(b):
            for s in range(0, t, chunk):
                lf = logits[i, s:s + chunk].float()  # [c, V]
                z = torch.logsumexp(lf, dim=-1)  # [c]
                lse[i, s:s + chunk] = z
                logp[i, s:s + chunk] = lf.gather(-1, labels[i, s:s + chunk, None]).squeeze(-1) - z
                p = (lf - z[:, None]).exp_()  # [c, V] softmax, in place of its own temporary
                ent[i, s:s + chunk] = z - (p[:, None, :] @ lf[:, :, None]).view(-1)  # sum_v p * logit, without a [c, V] product
        ctx.save_for_backward(logits, labels, lse)
        ctx.chunk = chunk
        ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp, _grad_ent):  # grad_logp [B, T]
        logits, labels, lse = ctx.saved_tensors
        with torch.autocast(logits.device.type, enabled=False):
            return _ChunkedLogProbEntropy._backward(ctx, grad_logp, logits, labels, lse)

    @staticmethod
    def _backward(ctx, grad_logp, logits, labels, lse):
        grad = torch.empty_like(logits)  # [B, T, V] in the logits' dtype
        b, t, _ = logits.shape
        for i in range(b):
            for s in range(0, t, ctx.chunk):
                g = grad_logp[i, s:s + ctx.chunk].float()  # [c]
                d = logits[i, s:s + ctx.chunk].to(torch.float32, copy=True)  # [c, V], a copy even when the logits are float32
                d.sub_(lse[i, s:s + ctx.chunk, None]).exp_().mul_(-g[:, None])  # -g * softmax
                d.scatter_add_(-1, labels[i, s:s + ctx.chunk, None], g[:, None])  # + g at the label
                grad[i, s:s + ctx.chunk].copy_(d)
        return grad, None, None


CHUNK_BYTES = 32 * 2**20  # one float32 chunk of logits: its few temporaries stay small beside the logits themselves


def token_logprobs_and_entropy(logits: torch.Tensor, labels: torch.Tensor, chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(log pi(label_t | prefix) [B, T] with gradient, policy entropy [B, T] without) from logits [B, T, V] predicting
    labels [B, T], `chunk` positions at a time (default: CHUNK_BYTES of float32 logits; see `_ChunkedLogProbEntropy`:
    peak extra memory about one logits tensor, where the plain path takes several)."""
    if chunk is None:
        chunk = max(1, CHUNK_BYTES // (4 * logits.shape[-1]))
    return _ChunkedLogProbEntropy.apply(logits, labels, chunk)


def _aggregate(per_token: torch.Tensor, mask: torch.Tensor, aggregation: str, normalizer: float | None) -> torch.Tensor:
    """per_token [B, T], mask [B, T] -> scalar."""
    masked = per_token * mask  # [B, T]
    if aggregation == "seq_mean":
        denom = normalizer if normalizer is not None else mask.shape[0]
        return masked.sum() / max(denom, 1)
    if aggregation == "token_mean":
        denom = normalizer if normalizer is not None else mask.sum().item()
        return masked.sum() / max(denom, 1)
    raise ValueError(f"unknown aggregation {aggregation!r}; expected 'seq_mean' or 'token_mean'")


def _advantage_metrics(adv: torch.Tensor, seq_logp: torch.Tensor, prefix: str) -> dict[str, float]:
    """adv [B], seq_logp [B]: what a user watches for asymmetry and collapse."""
    abs_total = adv.abs().sum().clamp(min=1e-12)
    return {
        f"{prefix}/advantage_mean": adv.mean().item(),
        f"{prefix}/frac_positive": (adv > 0).float().mean().item(),
        f"{prefix}/frac_negative": (adv < 0).float().mean().item(),
        f"{prefix}/positive_weight_share": (adv.clamp(min=0).sum() / abs_total).item(),
        f"{prefix}/logprob_mean": seq_logp.mean().item(),
    }


def asymre_loss(
    logp: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    baseline: torch.Tensor,
    aggregation: str = "seq_mean",
    normalizer: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Asymmetric REINFORCE:  loss = -(r - V) * log pi(y|x).

    logp [B, T] token log-probs under the current policy; mask [B, T] 1 on completion tokens, 0 on
    prompt and padding; advantages [B] = r - V (asymre.advantages.asymre_advantages); baseline V [B]
    (already including delta_V), reported as loss/baseline_mean.
    """
    mask = mask.to(logp.dtype)  # [B, T]
    adv = advantages.detach().to(logp.dtype)  # [B]
    per_token = -adv[:, None] * logp  # [B, T]
    loss = _aggregate(per_token, mask, aggregation, normalizer)
    seq_logp = (logp.detach() * mask).sum(-1)  # [B]
    metrics = _advantage_metrics(adv, seq_logp, "loss")
    metrics["loss/baseline_mean"] = baseline.float().mean().item()
    return loss, metrics


def reinforce_loss(
    logp: torch.Tensor, mask: torch.Tensor, rewards: torch.Tensor, aggregation: str = "seq_mean", normalizer: float | None = None
) -> tuple[torch.Tensor, dict[str, float]]:
    """Plain REINFORCE: AsymRE with V = 0, so the advantage is r.  logp [B, T], mask [B, T], rewards [B]."""
    return asymre_loss(logp, mask, rewards, torch.zeros_like(rewards), aggregation, normalizer)


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    clip_eps: float = 0.2,
    aggregation: str = "seq_mean",
    normalizer: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """GRPO / PPO-clip surrogate without KL:  loss = -min(rho * A, clip(rho, 1-eps, 1+eps) * A),
    rho = pi(y_t) / mu(y_t) per token.

    logp [B, T] current token log-probs; old_logp [B, T] behaviour (mu) token log-probs;
    mask [B, T]; advantages [B] (e.g. (r - group mean) / (group std + eps)).
    """
    mask_f = mask.to(logp.dtype)  # [B, T]
    adv = advantages.detach().to(logp.dtype)[:, None]  # [B, 1]
    log_ratio = (logp - old_logp.detach()) * mask_f  # [B, T]
    ratio = torch.exp(log_ratio)  # [B, T]
    unclipped = ratio * adv  # [B, T]
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * adv  # [B, T]
    per_token = -torch.minimum(unclipped, clipped)  # [B, T]
    loss = _aggregate(per_token, mask_f, aggregation, normalizer)
    seq_logp = (logp.detach() * mask_f).sum(-1)  # [B]
    metrics = _advantage_metrics(advantages.detach().float(), seq_logp, "loss")
    n_tok = mask_f.sum().clamp(min=1)
    metrics["loss/clip_frac"] = (((ratio - 1).abs() > clip_eps).to(logp.dtype) * mask_f).sum().item() / n_tok.item()
    metrics["loss/ratio_mean"] = ((ratio * mask_f).sum() / n_tok).item()
    return loss, metrics


class Loss(Protocol):
    """A `LOSSES` entry: logp [B, T], mask [B, T], advantages [B], baseline V [B] or None, behaviour token
    log-probs old_logp [B, T] or None -> (scalar loss, metrics). Each entry reads what its loss needs."""

    def __call__(self, logp: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor, baseline: torch.Tensor | None,
                 old_logp: torch.Tensor | None, *, clip_eps: float, aggregation: str,
                 normalizer: float | None) -> tuple[torch.Tensor, dict[str, float]]: ...


LOSSES: dict[str, Loss] = {
    "asymre": lambda logp, mask, advantages, baseline, old_logp, *, clip_eps, aggregation, normalizer: asymre_loss(
        logp, mask, advantages, baseline, aggregation, normalizer),
    "grpo": lambda logp, mask, advantages, baseline, old_logp, *, clip_eps, aggregation, normalizer: grpo_loss(
        logp, old_logp, mask, advantages, clip_eps, aggregation, normalizer),
    "reinforce": lambda logp, mask, advantages, baseline, old_logp, *, clip_eps, aggregation, normalizer: reinforce_loss(
        logp, mask, advantages, aggregation, normalizer),  # advantages = r
}

NEEDS_BEHAVIOUR_LOGPROBS = frozenset({"grpo"})  # the losses whose ratio pi/mu needs the engine's token log-probs
