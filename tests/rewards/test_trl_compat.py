"""TRL's reward contract, exactly: reward functions written for TRL 1.16's GRPOTrainer (tests/trl_rewards.py)
score here as they would there, and the paper's math-verify reward works where the recipe calls it (a helper
thread, a generation worker process). A failing reward costs only its samples and says why, once per step."""

import logging
import threading
import time

import pytest

from asymre.data import Prompt, Trajectory, TrajectoryGroup
from asymre.rewards import RewardScorer
from tests.helpers import rewards_of

R = "tests.trl_rewards"


def _conv_group(texts, solution="\\frac{1}{2}", ids=None, question="What is 1/2?"):
    """One conversational group (TRL's format): the prompt is a message list."""
    ids = ids or [[7] * (i + 1) for i in range(len(texts))]
    trajs = [Trajectory(list(c), t, "stop") for t, c in zip(texts, ids)]
    prompt = Prompt("q", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": question}],
                    {"prompt": [{"role": "user", "content": question}], "solution": solution, "answer": solution},
                    conversational=True)
    return TrajectoryGroup(prompt, [1, 2], trajs, 0)


def _std_group(texts, answer):
    trajs = [Trajectory([2], t, "stop") for t in texts]
    return TrajectoryGroup(Prompt("p", [{"role": "user", "content": "Solve."}], {"answer": answer}), [1], trajs, 0)


def test_math_verify_through_the_scorer_on_a_helper_thread():
    """math-verify's SIGALRM timeouts raise off the main thread: before the fix every sample was dropped
    as 'raised' and the step stopped. Called from a non-main thread, equivalent LaTeX still scores 1."""
    groups = [_std_group(["so $\\boxed{0.5}$", "\\boxed{3}"], "\\frac{1}{2}"), _std_group(["\\boxed{2}"], "2")]
    box = {}
    th = threading.Thread(target=lambda: box.update(m=RewardScorer(["math_verify"], timeout_s=30).score(groups)))
    th.start()
    th.join(60)
    assert "m" in box, "scoring raised or hung on a helper thread"
    assert [rewards_of(g) for g in groups] == [[1.0, 0.0], [1.0]]
    assert box["m"]["reward/dropped"] == 0


def test_trl_accuracy_reward_on_conversational_completions():
    """TRL's accuracy_reward reads completion[0]['content'] and the `solution` column; its log_extra
    column lands on each trajectory (for the sampled-completions log)."""
    g = _conv_group(["The answer is $\\boxed{0.5}$.", "It is \\boxed{\\frac{1}{3}}"])
    m = RewardScorer([f"{R}:accuracy_reward"], timeout_s=30).score([g])
    assert rewards_of(g) == [1.0, 0.0] and m["reward/dropped"] == 0
    parsed = [t.extras["parsed_answer"] for t in g.trajectories]
    assert parsed[0].startswith("[1/2") and parsed[1].startswith("[1/3")


def test_trl_format_prompt_and_completion_ids_rewards():
    g = _conv_group(["<think>\nhmm\n</think>\n0.5", "0.5 <think>late</think>", "What is 1/2?"], ids=[[5] * 2, [5] * 4, [5] * 6])
    RewardScorer([f"{R}:think_format_reward"]).score([g])
    assert rewards_of(g) == [1.0, 0.0, 0.0]
    RewardScorer([f"{R}:token_budget_reward"]).score([g])  # completion_ids: 2, 4 and 6 tokens
    assert rewards_of(g) == pytest.approx([0.0, -0.1, -0.3])
    RewardScorer([f"{R}:prompt_echo_reward"]).score([g])  # prompts arrive as the message list
    assert rewards_of(g) == [0.0, 0.0, 1.0]


def test_trainer_state_and_log_metric():
    """trainer_state.global_step is the learner step the scorer is told; log_metric's values are averaged
    into reward/custom/<name>."""
    g = _conv_group(["a", "b"])
    scorer = RewardScorer([f"{R}:curriculum_reward"], max_steps=20)
    m = scorer.score([g], step=5)
    assert rewards_of(g) == [0.5, 0.5] and m["reward/custom/curriculum_weight"] == 0.5
    assert scorer.score([g], step=20)["reward/custom/curriculum_weight"] == 1.0


def test_async_rewards_are_awaited_concurrently():
    g = _conv_group(["abcd", "ab"])
    RewardScorer([f"{R}:async_length_reward"]).score([g])
    assert rewards_of(g) == pytest.approx([-0.04, -0.02])
    t0 = time.perf_counter()
    m = RewardScorer([f"{R}:async_slow_reward", f"{R}:async_slow_reward_2"], timeout_s=5).score([g])
    assert time.perf_counter() - t0 < 1.1, "two 0.6 s async rewards ran one after the other"
    assert rewards_of(g) == [1.5, 1.5] and m["reward/dropped"] == 0


def test_async_reward_past_the_timeout_is_dropped():
    g = _conv_group(["a", "b"])
    m = RewardScorer(["numeric", f"{R}:async_slow_reward"], timeout_s=0.2).score([g])
    assert m[f"reward/dropped_{R}:async_slow_reward:timeout"] == 2


def test_standard_format_gets_strings():
    """A standard-format dataset: prompts and completions are plain strings (TRL's standard format)."""
    g = _std_group(["5", "the answer: 7"], "5")
    RewardScorer([f"{R}:raises_on_sevens", "numeric"]).score([g])
    assert rewards_of(g) == [2.0, 0.0]  # sample 1: raised (dropped for that function), numeric 0


def test_raising_reward_costs_only_its_samples_and_logs_its_traceback_once_per_step(caplog):
    g = _std_group(["5", "7", "6", "77"], "5")
    scorer = RewardScorer([f"{R}:raises_on_sevens"])
    with caplog.at_level(logging.WARNING, logger="asymre.rewards"):
        m = scorer.score([g], step=3)
        scorer.score([_std_group(["7", "1"], "1")], step=3)  # same step: not logged again
    assert rewards_of(g) == [1.0, None, 1.0, None]
    assert m[f"reward/dropped_{R}:raises_on_sevens:raised"] == 2 and m["reward/dropped"] == 2
    records = [r for r in caplog.records if "raises_on_sevens" in r.getMessage()]
    assert len(records) == 1
    text = records[0].getMessage()
    assert "at step 3" in text and "sample 1 of the batch" in text and "(1 more of 4 samples raised)" in text
    assert "Traceback" in text and "ZeroDivisionError: seven is not allowed" in text and "trl_rewards.py" in text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="asymre.rewards"):
        scorer.score([_std_group(["7", "1"], "1")], step=4)
    assert sum("raises_on_sevens" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("fn, said", [("returns_a_float", "returned float, expected a list of 2 floats"),
                                      ("returns_strings", "returned str '1.0' for sample 0, expected a float or None")])
def test_reward_of_the_wrong_type_stops_the_run_naming_it(fn, said):
    """Numbers and None (None abstains, as under TRL) only: anything else is a bug in the function, which stops the
    run naming it, even when another function scored every sample."""
    from asymre.rewards import RewardContractError

    g = _std_group(["5", "6"], "5")
    with pytest.raises(RewardContractError) as e:
        RewardScorer(["numeric", f"{R}:{fn}"]).score([g])
    assert str(e.value) == f"reward function '{R}:{fn}' {said} (a reward returns one float per completion, or None to abstain)"
    assert rewards_of(g) == [None, None]


@pytest.mark.slow
def test_math_verify_and_a_raising_reward_in_a_generation_worker_process(model_path, caplog):
    """In async mode the worker process scores its own groups: math-verify must work there too, and a
    raising reward's traceback must reach the learner's log, naming the worker and the function."""
    from functools import partial

    from asymre.config import load_config
    from asymre.rollout import make_generator
    from asymre.rollout.base import SamplingSpec
    from asymre.rollout.worker import WorkerPool

    prompts = [Prompt("a", [{"role": "user", "content": "Half?"}], {"answer": "\\frac{1}{2}", "replies": ["$\\boxed{0.5}$", "\\boxed{7}"]}),
               Prompt("b", [{"role": "user", "content": "Two?"}], {"answer": "2", "replies": ["\\boxed{2}", "\\boxed{2.0}"]})]
    scorer_config = load_config(None, [f"reward.funcs=[math_verify,{R}:raises_on_sevens]", "reward.timeout_s=30"])
    pool = WorkerPool(1, partial(make_generator, "tests.fakes:ReplyGenerator", model_path), (), scorer_config, worker_timeout_s=120)
    try:
        with caplog.at_level(logging.WARNING, logger="asymre"):
            pool.submit(prompts, SamplingSpec(n=2, max_new_tokens=8), step=2)
            results = []
            deadline = time.time() + 120
            while not results and not pool.reward_errors and time.time() < deadline:
                results = pool.poll(timeout=1.0)
            for _ in range(5):  # the forwarded log record may trail the groups by a moment
                pool.poll(timeout=0.2)
    finally:
        pool.close()
    assert not pool.reward_errors and results
    _, groups, metrics = results[0]
    assert [rewards_of(g) for g in groups] == [[2.0, 0.0], [2.0, 2.0]]  # math_verify 1/0 plus raises_on_sevens 1/None
    assert metrics[f"reward/dropped_{R}:raises_on_sevens:raised"] == 1
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "(generation worker 0)" in text and "raises_on_sevens" in text and "ZeroDivisionError" in text
