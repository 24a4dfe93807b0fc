"""Collation and the forward of the two loss paths: a step's samples as tensors, and their log-probs under the model.

Both paths give, per sample, the log-prob and entropy of every completion token and a mask that is 1 on the tokens
the policy sampled and 0 on padding and on the tokens an environment inserted into an episode (tool results: the
trained tokens are the model's own, asymre/rollout/episodes.py). Every completion token is attended to; only the
mask decides what the loss counts.

- `sequence_logps`: each sample its own left-padded prompt + completion row; only the last `max completion length + 1`
  positions reach the LM head (`logits_to_keep`).
- `shared_prompt_logps` (learner.shared_prompt): each group's prompt once with a KV cache, its completions against it
  (the trade-offs are in asymre/learner.py's docstring).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from asymre.loss import token_logprobs_and_entropy


@dataclass
class StepBatch:
    """A step's trajectories flattened, with per-sample advantages computed over the whole step."""

    seqs: list[list[int]]  # prompt + completion ids
    completion_lens: list[int]
    rewards: torch.Tensor  # [B]
    advantages: torch.Tensor  # [B] what multiplies log pi(y|x): r - V (asymre), GRPO's advantage, or r (reinforce)
    baseline: torch.Tensor | None  # [B] the V in r - V (0 for reinforce), for loss/baseline_mean; None for grpo
    old_logps: list[list[float]] | None  # behaviour log-probs (losses in NEEDS_BEHAVIOUR_LOGPROBS)
    refs: list[tuple[int, int]] = field(default_factory=list)  # (group index, trajectory index) of each sample
    prompt_lens: list[int] = field(default_factory=list)  # [B] prompt tokens at the head of each of `seqs`
    groups: list[int] = field(default_factory=list)  # [B] each sample's group (0.. in the order of the step)
    # [B] per completion token, 1 where the policy sampled it (trained), 0 where the environment inserted it; None for a
    # sample whose every token is the policy's (a single completion), or for the whole step when none has a mask
    masks: list[list[int] | None] | None = None

    @property
    def num_tokens(self) -> int:
        return sum(len(s) for s in self.seqs)

    @property
    def trained_tokens(self) -> int:
        """Completion tokens the loss trains (token_mean's normaliser): the policy's own, not the environment's."""
        if self.masks is None:
            return sum(self.completion_lens)
        return sum(c if m is None else sum(m) for c, m in zip(self.completion_lens, self.masks))

    def trained(self, i: int):
        """Sample i's loss mask over its completion: 1 (every token) or its per-token mask."""
        m = None if self.masks is None else self.masks[i]
        return 1 if m is None else torch.tensor(m, dtype=torch.float32)


def bucket_by_length(lengths: list[int], token_budget: int) -> list[list[int]]:
    """Indices grouped into micro-batches: sorted by length, each padded micro-batch <= token_budget
    (a sequence longer than the budget gets a micro-batch of its own)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        if cur and lengths[i] * (len(cur) + 1) > token_budget:
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


def group_buckets(batch: StepBatch, token_budget: int) -> list[list[int]]:
    """Sample indices in micro-batches of whole groups (shared prompts): groups sorted by length, each micro-batch's
    padded prompts plus padded completions within token_budget (a group over it gets a micro-batch of its own)."""
    members: dict[int, list[int]] = {}
    for i, g in enumerate(batch.groups):
        members.setdefault(g, []).append(i)
    size = {g: (batch.prompt_lens[m[0]], max(batch.completion_lens[i] for i in m), len(m)) for g, m in members.items()}
    out: list[list[int]] = []
    cur: list[int] = []
    p_max = c_max = samples = n_groups = 0
    for g in sorted(members, key=lambda g: size[g][0] + size[g][1]):
        p, c, n = size[g]
        cost = (n_groups + 1) * max(p_max, p) + (samples + n) * max(c_max, c)
        if cur and cost > token_budget:
            out.append(cur)
            cur, p_max, c_max, samples, n_groups = [], 0, 0, 0, 0
        cur += members[g]
        p_max, c_max, samples, n_groups = max(p_max, p), max(c_max, c), samples + n, n_groups + 1
    if cur:
        out.append(cur)
    return out


def collate_rows(batch: StepBatch, idx: list[int], pad_id: int, dev):
    """Each sample as its own left-padded row: ids, attention, positions [b, L]; labels, mask, behaviour log-probs
    [b, keep] over the last `keep` positions (the longest completion); the mask is 1 on the policy's own tokens."""
    width = max(len(batch.seqs[i]) for i in idx)
    keep = max(batch.completion_lens[i] for i in idx)  # positions whose next token is a completion token
    ids = torch.full((len(idx), width), pad_id, dtype=torch.long)  # [b, L] left-padded
    attn = torch.zeros((len(idx), width), dtype=torch.long)  # [b, L]
    for row, i in enumerate(idx):
        s = batch.seqs[i]
        ids[row, width - len(s):] = torch.tensor(s)
        attn[row, width - len(s):] = 1
    pos = (attn.cumsum(-1) - 1).clamp(min=0)  # [b, L]
    labels = ids[:, width - keep:]  # [b, keep] the last `keep` tokens
    mask = torch.zeros((len(idx), keep), dtype=torch.float32)  # [b, keep] 1 on completion tokens
    old = torch.zeros((len(idx), keep), dtype=torch.float32) if batch.old_logps is not None else None  # [b, keep]
    for row, i in enumerate(idx):
        c = batch.completion_lens[i]
        mask[row, keep - c:] = batch.trained(i)
        if old is not None:
            old[row, keep - c:] = torch.tensor(batch.old_logps[i][:c])
    to = lambda x: None if x is None else x.to(dev)  # noqa: E731
    return to(ids), to(attn), to(pos), to(labels), to(mask), to(old), keep


def sequence_logps(model, autocast, batch: StepBatch, idx: list[int], pad_id: int, dev):
    """Each sample as its own prompt + completion row: (logp, entropy, mask, behaviour logp), [b, keep] each."""
    ids, attn, pos, labels, mask, old, keep = collate_rows(batch, idx, pad_id, dev)
    # logits for positions L-keep-1 .. L-2 predict tokens L-keep .. L-1
    with autocast():
        out = model(input_ids=ids, attention_mask=attn, position_ids=pos, logits_to_keep=keep + 1, use_cache=False)
    logp, ent = token_logprobs_and_entropy(out.logits[:, :-1], labels)  # [b, keep] each
    return logp, ent, mask, old


def shared_prompt_logps(model, bare, autocast, batch: StepBatch, idx: list[int], pad_id: int, dev):
    """Each group's prompt once, its completions attending to it: (logp, entropy, mask, behaviour logp), [b, C].

    The prompts (left-padded, [n, P]) run once with a KV cache; the cache is gathered to one row per sample
    (`index_select`: its backward sums each sample's gradient into its prompt's keys and values) and the
    completions (right-padded, [b, C], positions continuing after their prompt) run against it. The prompt's
    last position predicts each completion's first token; completion position t predicts token t + 1. Same
    maths as `sequence_logps`, with the prompt's tokens computed once per group instead of G times."""
    first: dict[int, int] = {}  # this micro-batch's groups, in order -> the index of their first sample
    for i in idx:
        first.setdefault(batch.groups[i], i)
    rows = list(first)
    row_of = {g: r for r, g in enumerate(rows)}
    plens = [batch.prompt_lens[first[g]] for g in rows]
    width = max(plens)
    pids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # [n, P] left-padded
    pmask = torch.zeros((len(rows), width), dtype=torch.long)  # [n, P]
    for r, g in enumerate(rows):
        pids[r, width - plens[r]:] = torch.tensor(batch.seqs[first[g]][:plens[r]])
        pmask[r, width - plens[r]:] = 1
    sel = torch.tensor([row_of[batch.groups[i]] for i in idx])  # [b] each sample's prompt row
    c_max = max(batch.completion_lens[i] for i in idx)
    cids = torch.full((len(idx), c_max), pad_id, dtype=torch.long)  # [b, C] right-padded
    real = torch.zeros((len(idx), c_max), dtype=torch.long)  # [b, C] 1 on completion tokens (attended)
    mask = torch.zeros((len(idx), c_max), dtype=torch.float32)  # [b, C] 1 on the policy's own (trained)
    old = torch.zeros((len(idx), c_max), dtype=torch.float32) if batch.old_logps is not None else None  # [b, C]
    for row, i in enumerate(idx):
        c = batch.completion_lens[i]
        cids[row, :c] = torch.tensor(batch.seqs[i][batch.prompt_lens[i]:])
        real[row, :c] = 1
        mask[row, :c] = batch.trained(i)
        if old is not None:
            old[row, :c] = torch.tensor(batch.old_logps[i][:c])
    cpos = torch.tensor(plens)[sel][:, None] + torch.arange(c_max)[None]  # [b, C]
    pids, pmask, sel, cids, real, mask, cpos = (x.to(dev) for x in (pids, pmask, sel, cids, real, mask, cpos))
    with autocast():
        # the prompt pass goes through the bare module: one call of a DDP wrapper per backward (the completions')
        out_p = bare(input_ids=pids, attention_mask=pmask, position_ids=(pmask.cumsum(-1) - 1).clamp(min=0), use_cache=True,
                     logits_to_keep=1)
        cache = out_p.past_key_values
        cache.reorder_cache(sel)  # [n, ...] -> [b, ...]
        attn = torch.cat([pmask[sel], real], dim=1)  # [b, P + C] every completion token, trained or not
        out_c = model(input_ids=cids, attention_mask=attn, position_ids=cpos, past_key_values=cache, use_cache=True,
                      logits_to_keep=c_max)
    lp0, e0 = token_logprobs_and_entropy(out_p.logits[sel], cids[:, :1])  # [b, 1] the first completion token
    lpr, er = token_logprobs_and_entropy(out_c.logits[:, :-1], cids[:, 1:])  # [b, C - 1] the rest
    return torch.cat([lp0, lpr], 1), torch.cat([e0, er], 1), mask, None if old is None else old.to(dev)


def padding_frac(batch: StepBatch, micro: list[list[int]], shared_prompt: bool) -> float:
    """Share of the positions the forward computed that were padding (shared prompts: each prompt counted once)."""
    if not shared_prompt:
        return 1.0 - batch.num_tokens / sum(len(idx) * max(len(batch.seqs[i]) for i in idx) for idx in micro)
    real = padded = 0
    for idx in micro:
        firsts = {batch.groups[i]: i for i in reversed(idx)}
        prompts = [batch.prompt_lens[i] for i in firsts.values()]
        real += sum(prompts) + sum(batch.completion_lens[i] for i in idx)
        padded += len(prompts) * max(prompts) + len(idx) * max(batch.completion_lens[i] for i in idx)
    return 1.0 - real / padded
