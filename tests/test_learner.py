"""Learner: length-bucketed micro-batches with accumulation give the full-batch gradient; the left-padded,
logits_to_keep forward gives the same log-probs as a plain per-sequence forward; a step moves the
policy the way the advantages say. A tiny randomly initialised Llama keeps these fast."""

import pytest
import torch
from accelerate import Accelerator
from transformers import LlamaConfig, LlamaForCausalLM

from asymre.config import load_config
from asymre.data import Prompt, Trajectory, TrajectoryGroup
from asymre.learner import Learner, bucket_by_length
from asymre.loss import token_logprobs


@pytest.fixture(scope="module")
def tiny_model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return str(path)


def _groups(seed: int = 0, n_groups: int = 3, g: int = 4) -> list[TrajectoryGroup]:
    rng = torch.Generator().manual_seed(seed)
    out = []
    for gi in range(n_groups):
        prompt = torch.randint(1, 64, (int(torch.randint(3, 9, (1,), generator=rng)),), generator=rng).tolist()
        trajs = []
        for _ in range(g):
            comp = torch.randint(1, 64, (int(torch.randint(1, 7, (1,), generator=rng)),), generator=rng).tolist()
            trajs.append(Trajectory(prompt, comp, "", "stop", 0, logprobs=[-1.0] * len(comp),
                                    reward=float(torch.randint(0, 2, (1,), generator=rng))))
        out.append(TrajectoryGroup(Prompt(f"p{gi}", [{"role": "user", "content": "q"}]), trajs, 0))
    return out


def _learner(path, **over):
    overrides = [f"{k}={v}" for k, v in over.items()]
    cfg = load_config(None, ["learner.lr=1e-2", "learner.max_grad_norm=0", *overrides])
    return Learner(cfg, path, Accelerator(cpu=True))


def test_bucket_by_length_respects_budget():
    lengths = [5, 30, 7, 12, 6, 40]
    batches = bucket_by_length(lengths, token_budget=30)
    assert sorted(i for b in batches for i in b) == list(range(6))
    for b in batches:
        assert len(b) == 1 or max(lengths[i] for i in b) * len(b) <= 30
    assert [lengths[i] for b in batches for i in b] == sorted(lengths)  # sorted: little padding


def test_left_padded_keep_forward_matches_plain_forward(tiny_model_path):
    """If position ids or the logits_to_keep slice were off, log-probs of completions would be wrong."""
    learner = _learner(tiny_model_path)
    batch = learner.build_batch(_groups())
    idx = list(range(len(batch.seqs)))
    ids, attn, pos, labels, mask, _, keep = learner._collate(batch, idx)
    with torch.no_grad():
        out = learner.model(input_ids=ids, attention_mask=attn, position_ids=pos, logits_to_keep=keep + 1)
        got = token_logprobs(out.logits[:, :-1], labels)
        for row, i in enumerate(idx):
            s = torch.tensor([batch.seqs[i]])
            c = batch.completion_lens[i]
            ref = token_logprobs(learner.model(input_ids=s).logits[:, :-1], s[:, 1:])[0, -c:]
            assert torch.allclose(got[row, keep - c:], ref, atol=1e-5)
            assert mask[row].sum().item() == c


@pytest.mark.parametrize("loss", ["asymre", "grpo", "reinforce"])
@pytest.mark.parametrize("aggregation", ["seq_mean", "token_mean"])
def test_micro_batching_equals_full_batch_gradient(tiny_model_path, loss, aggregation):
    grads = []
    for budget in (100000, 16):
        torch.manual_seed(0)
        learner = _learner(tiny_model_path, **{"loss.name": loss, "loss.aggregation": aggregation, "learner.micro_batch_tokens": budget})
        batch = learner.build_batch(_groups())
        norm = len(batch.seqs) if aggregation == "seq_mean" else sum(batch.completion_lens)
        micro = bucket_by_length([len(s) for s in batch.seqs], budget)
        for idx in micro:
            loss_mb, _ = learner._micro_loss(batch, idx, norm)
            loss_mb.backward()
        grads.append((len(micro), torch.cat([p.grad.flatten() for p in learner.model.parameters() if p.grad is not None])))
    assert grads[0][0] == 1 and grads[1][0] > 2
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-6)


def test_step_raises_logprob_of_rewarded_completion(tiny_model_path):
    """A rewarded completion's log-prob goes up, an unrewarded one's down (AsymRE, group-mean baseline)."""
    prompt = [5, 6, 7]
    good, bad = [10, 11], [20, 21]
    trajs = [Trajectory(prompt, good, "", "stop", 0, reward=1.0), Trajectory(prompt, bad, "", "stop", 0, reward=0.0)]
    groups = [TrajectoryGroup(Prompt("p", [{"role": "user", "content": "q"}]), trajs, 0)]
    learner = _learner(tiny_model_path, **{"learner.lr": 1e-2})

    def lp(comp):
        s = torch.tensor([prompt + comp])
        with torch.no_grad():
            return token_logprobs(learner.model(input_ids=s).logits[:, :-1], s[:, 1:])[0, -len(comp):].sum().item()

    before = lp(good), lp(bad)
    m = learner.train_step(groups)
    after = lp(good), lp(bad)
    assert after[0] > before[0] and after[1] < before[1]
    assert learner.step == 1 and m["loss/frac_positive"] == 0.5 and m["learner/trajectories"] == 2


def test_dropped_samples_are_skipped_and_all_dropped_is_an_error(tiny_model_path):
    learner = _learner(tiny_model_path)
    groups = _groups()
    for t in groups[0].trajectories:
        t.reward = None
    batch = learner.build_batch(groups)
    assert len(batch.seqs) == 8
    for g in groups:
        for t in g.trajectories:
            t.reward = None
    with pytest.raises(ValueError, match="no scored trajectories"):
        learner.build_batch(groups)


def test_grpo_without_behaviour_logprobs_is_an_error(tiny_model_path):
    learner = _learner(tiny_model_path, **{"loss.name": "grpo"})
    groups = _groups()
    groups[1].trajectories[0].logprobs = None
    with pytest.raises(ValueError, match="behaviour log-probs"):
        learner.build_batch(groups)
