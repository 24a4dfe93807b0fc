"""The recipe's interface to generation (`asymre/rollout/modes.py`): async evaluation runs on the generation worker
processes (two real ones, with the reply fake), never on an engine built in the learner's process, and evaluating
between pushes leaves the off-policy regime as it was."""

from types import SimpleNamespace

import pytest
import torch

import asymre.rollout
from asymre.config import load_config
from asymre.data import Prompt
from asymre.evaluate import evaluate
from asymre.rewards import RewardScorer
from asymre.rollout.base import SamplingSpec
from asymre.rollout.modes import AsyncRollout
from asymre.sync import WeightSync

MAIN = SimpleNamespace(is_main_process=True, num_processes=1, process_index=0)


def _no_engine_here(*args, **kwargs):
    raise AssertionError(f"an engine was built in the learner's process: make_generator{args}")


def _prompts(n: int, tag: str, sleep: float = 0.0) -> list[Prompt]:
    """Prompt i asks for i and is answered with i when i is even (the reply fake answers with `replies`, after `sleep` s)."""
    return [Prompt(f"{tag}{i}", [{"role": "user", "content": f"Say {i}."}],
                   {"answer": str(i), "replies": [str(i) if i % 2 == 0 else "no"], "sleep": sleep}) for i in range(n)]


@pytest.fixture(scope="module")
def rollout(model_path, tmp_path_factory):
    """Two reply-fake workers in async mode, evaluating every step and pushing every 2 (evaluations between pushes);
    the learner's weights are one tensor whose sum a test sets (`rollout.learner["w"]`)."""
    folder = tmp_path_factory.mktemp("async-eval")
    cfg = load_config(None, ["rollout.mode=async", "rollout.backend=tests.fakes:ReplyGenerator", "rollout.num_workers=2",
                             "rollout.worker_timeout_s=120", "eval.every=1", "sync.interval=2", "sync.method=disk",
                             f"logging.run_dir={folder}"])
    learner = {"w": torch.ones(2)}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(asymre.rollout, "make_generator", _no_engine_here)  # the workers (spawned) build their own
        r = AsyncRollout(cfg, MAIN, str(model_path), _prompts(4, "t"), WeightSync.from_config(cfg, folder), lambda: dict(learner),
                         vocab_size=49152)
    r.learner = learner
    yield r
    r.close()


def test_async_evaluation_goes_to_the_workers_and_comes_back_in_prompt_order(rollout, monkeypatch):
    """If evaluation were answered out of order, each prompt's answer would be scored against another prompt's reference;
    if it ran on an engine built in the learner's process (the old transformers copy, a collective of one rank under
    ZeRO-3), `make_generator` would be called here."""
    monkeypatch.setattr(asymre.rollout, "make_generator", _no_engine_here)
    prompts = _prompts(7, "e")
    step = rollout.pool.workers[0].version  # the weights the workers hold: nothing to lend
    with rollout.evaluation_engine(step) as engine:
        groups = engine.generate(prompts, SamplingSpec(n=1, temperature=0.0, max_new_tokens=8))
        out = evaluate(engine, prompts, RewardScorer(["numeric"]), max_new_tokens=8)
    assert [g.prompt.uid for g in groups] == [p.uid for p in prompts]
    assert [g.trajectories[0].text for g in groups] == [p.columns["replies"][0] for p in prompts]
    pids = [g.trajectories[0].extras["pid"] for g in groups]
    assert pids == [pids[0]] * 4 + [pids[4]] * 3 and pids[0] != pids[4]  # split in order over both workers
    assert {pids[0], pids[4]} == {w.proc.pid for w in rollout.pool.workers}
    assert out["eval/pass@1"] == pytest.approx(4 / 7) and out["eval/prompts"] == 7


def test_async_evaluation_between_pushes_lends_the_learners_weights_then_gives_the_behaviour_back(rollout):
    """Evaluation scores the learner's weights at its step, while the workers lag (sync.interval=2): they are lent them.
    If they kept them, or took a queued generation request while holding them, training groups would come from weights
    newer than their version tag says (the off-policy regime changed by evaluating)."""
    pool = rollout.pool
    rollout.learner["w"] = torch.full((2,), 3.0)
    rollout.push(2)  # the behaviour weights, sum 6, version 2
    rollout.learner["w"] = torch.full((2,), 5.0)  # the learner at step 3, sum 10
    train_prompts, spec = _prompts(2, "q", sleep=0.3), SamplingSpec(n=2, max_new_tokens=8)
    for _ in range(6):  # queued on both workers while they evaluate
        pool.submit(train_prompts, spec, step=3)
    with rollout.evaluation_engine(3) as engine:
        groups = engine.generate(_prompts(5, "e"), SamplingSpec(n=1, temperature=0.0, max_new_tokens=8))
    assert {(g.version, t.extras["weights_sum"]) for g in groups for t in g.trajectories} == {(3, 10.0)}
    assert [w.version for w in pool.workers] == [2, 2]
    trained = []
    while pool.outstanding():
        trained += [g for _, gs, _ in pool.poll(timeout=30.0) for g in gs]
    pool.submit(train_prompts, spec, step=3)  # generated after the evaluation
    while pool.outstanding():
        trained += [g for _, gs, _ in pool.poll(timeout=30.0) for g in gs]
    assert len(trained) == 14
    assert {(g.version, t.extras["weights_sum"]) for g in trained for t in g.trajectories} == {(2, 6.0)}
    assert not (rollout.sync.folder / "lent").exists() and (rollout.sync.folder / "latest").is_dir()


def test_an_evaluation_right_after_a_push_gathers_no_weights(rollout, monkeypatch):
    """The workers hold a push's weights already: gathering them again (a collective over every rank under ZeRO-3 or
    FSDP) would cost a model's worth of traffic per evaluation for nothing. Between pushes the learner's are gathered."""
    gathers = []
    real = rollout.weights
    monkeypatch.setattr(rollout, "weights", lambda: gathers.append(1) or real())
    rollout.push(4)
    with rollout.evaluation_engine(4) as engine:
        groups = engine.generate(_prompts(2, "e"), SamplingSpec(n=1, temperature=0.0, max_new_tokens=8))
    assert len(gathers) == 1 and {g.version for g in groups} == {4}  # the push's gather only
    with rollout.evaluation_engine(5) as engine:
        groups = engine.generate(_prompts(2, "e"), SamplingSpec(n=1, temperature=0.0, max_new_tokens=8))
    assert len(gathers) == 2 and {g.version for g in groups} == {5}


def test_round_seeds_differ_by_rank_and_round_and_repeat_by_run_seed():
    """Each colocated rank samples its own prompts: a round seed that ignored the rank gave sample i of every rank the
    same random numbers. The seed follows from (rollout.seed, rank, round) alone, so a resumed run repeats it."""
    from asymre.rollout.base import derive_seed
    from asymre.rollout.modes import Rollout

    def seeds(rank, run_seed=0, rounds=3):
        r = Rollout.__new__(Rollout)
        r.cfg, r.rank, r.rounds = load_config(None, [f"rollout.seed={run_seed}"]), rank, 0
        r.train_spec = SamplingSpec(n=2)
        return [r._spec().seed for _ in range(rounds)]

    assert seeds(0) == seeds(0) and len(set(seeds(0))) == 3
    assert not set(seeds(0)) & set(seeds(1))
    assert seeds(0, run_seed=1) != seeds(0)
    assert seeds(1)[0] == derive_seed(0, 1, 1) and all(0 <= s < 2**62 for s in seeds(1))


def test_a_behaviour_copy_is_in_the_engine_dtype_and_holds_a_tied_tensor_once():
    """The host copy of the weights a lagging engine holds is made in the engine's dtype (what it holds: giving it back
    is exact, at half the memory of float32 masters for bf16), integers as they are, a tied tensor copied once."""
    import torch

    from asymre.rollout.modes import host_copy

    emb = torch.randn(4, 3)
    copy = host_copy({"embed": emb, "lm_head": emb, "step": torch.tensor([2])}, torch.bfloat16)
    assert copy["embed"].dtype == torch.bfloat16 and copy["step"].dtype == torch.int64
    assert torch.equal(copy["embed"], emb.to(torch.bfloat16)) and copy["lm_head"] is copy["embed"]


@pytest.mark.parametrize("main", [True, False])
def test_only_the_main_colocated_rank_keeps_the_behaviour_weights(main, model_path, tmp_path):
    """A lagging colocated engine's weights (sync.interval > 1) are kept once, by the main process, which alone
    evaluates and checkpoints: at the start, after a push and after a resume. On the other ranks a second host copy
    of the model per rank (8 for 8B on one node) would buy nothing."""
    from asymre.rollout.modes import ColocatedRollout

    cfg = load_config(None, ["rollout.backend=tests.fakes:ReplyGenerator", "sync.interval=2", "sync.method=disk",
                             f"logging.run_dir={tmp_path}", "model.dtype=bfloat16"])
    acc = SimpleNamespace(is_main_process=main, num_processes=2, process_index=0 if main else 1, state=SimpleNamespace(deepspeed_plugin=None))
    learner = {"w": torch.ones(3)}
    r = ColocatedRollout(cfg, acc, str(model_path), _prompts(2, "t"), WeightSync.from_config(cfg, tmp_path), lambda: dict(learner),
                         RewardScorer(["numeric"]))
    kept = [dict(r.last_pushed)]
    learner["w"] = torch.full((3,), 2.0)
    r.push(2)
    kept.append(dict(r.last_pushed))
    r.load_state_dict(r.state_dict(3), {"w": torch.full((3,), 5.0, dtype=torch.bfloat16)}, learner_step=3)
    kept.append(dict(r.last_pushed))
    if main:
        assert [k["w"].tolist() for k in kept] == [[1.0] * 3, [2.0] * 3, [5.0] * 3] and kept[1]["w"].dtype == torch.bfloat16
    else:
        assert kept == [{}, {}, {}]
    r.close()


@pytest.mark.parametrize("main", [True, False])
def test_a_sharded_learners_push_streams_one_tensor_at_a_time_and_every_rank_reads_it_all(main, model_path, tmp_path):
    """Under FSDP2 / ZeRO-3 a colocated push reads the learner's weights as a stream (each tensor all-gathered as it
    is read): the engine loads it as it comes, the main process keeps its host copy of the behaviour weights (a tied
    tensor once), and every rank reads the stream to its end even when its engine stops early with an error (else the
    ranks' all-gathers would stop matching and the node hang); the error still reaches the caller."""
    from asymre.rollout.modes import ColocatedRollout

    cfg = load_config(None, ["rollout.backend=tests.fakes:ReplyGenerator", "sync.interval=2", f"logging.run_dir={tmp_path}"])
    acc = SimpleNamespace(is_main_process=main, num_processes=2, process_index=0 if main else 1, state=SimpleNamespace(deepspeed_plugin=None))
    read: list[str] = []
    learner = {"emb": torch.ones(2, 2), "w": torch.full((3,), 2.0)}

    def stream():
        for name in ("emb", "w", "lm_head"):
            read.append(name)
            yield name, learner["emb" if name == "lm_head" else name]

    def whole():
        raise AssertionError("a sharded learner's push gathered a whole copy")

    r = ColocatedRollout(cfg, acc, str(model_path), _prompts(2, "t"), WeightSync.from_config(cfg, tmp_path), whole,
                         RewardScorer(["numeric"]), stream=stream)
    assert read == ["emb", "w", "lm_head"]  # the start's behaviour copy
    read.clear()
    r.push(2)
    assert read == ["emb", "w", "lm_head"] and r.engine.version == 2 and r.engine.weights_sum == 4 + 6 + 4
    if main:
        assert sorted(r.last_pushed) == ["emb", "lm_head", "w"] and r.last_pushed["lm_head"] is r.last_pushed["emb"]
        assert r.last_pushed["w"].tolist() == [2.0] * 3 and r.last_pushed["w"] is not learner["w"]
    else:
        assert r.last_pushed == {}

    def stops_after_one(weights, version):
        next(iter(weights))
        raise RuntimeError("engine refused a weight")

    read.clear()
    r.engine.load_weights = stops_after_one
    with pytest.raises(RuntimeError, match="engine refused"):
        r.push(4)
    assert read == ["emb", "w", "lm_head"]
    read.clear()
    del r.engine.load_weights  # the fake's own again
    with r.evaluation_engine(4) as engine:  # the engine lags: the learner's weights lent on the main process only
        assert read == ["emb", "w", "lm_head"] and (engine is r.engine if main else engine is None)
    r.close()
