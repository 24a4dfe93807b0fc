"""Reward functions and scoring: built-ins on real answers, TRL-shaped user functions, and every bad input
(raises, hangs, NaN, all None, wrong length, unknown name) handled without killing the run."""

import time

import pytest

from asymre.data import Prompt, Trajectory, TrajectoryGroup
from asymre.rewards import RewardError, RewardScorer, resolve_reward
from asymre.rewards.builtin import extract_number, first_number, math_verify, numeric
from tests.helpers import rewards_of


def _groups(texts, answer="5"):
    trajs = [Trajectory([2], t, "stop") for t in texts]
    return [TrajectoryGroup(Prompt("p", [{"role": "user", "content": "What is 2 + 3?"}], {"answer": answer}), [1], trajs, 0)]


def test_numeric_last_number_and_gsm8k_marker():
    completions = ["2 + 3 = 5", "The answer is 5.", "#### 5", "5 apples, not 6"]
    assert numeric([""] * 4, completions, answer=["5", "5", "72\n#### 5", "5"]) == [1.0, 1.0, 1.0, 0.0]
    assert extract_number("She has 1,234.5 dollars") == 1234.5
    assert numeric([""], ["no number"], answer=["5"]) == [0.0]


def test_first_number_wants_the_answer_first():
    assert first_number([""] * 3, ["5", "5.", "2 + 3 = 5"], answer=["5"] * 3) == [1.0, 1.0, 0.0]


def test_math_verify_accepts_equivalent_latex_a_regex_would_not():
    """\\frac{1}{2} vs 0.5 and \\sqrt{8} vs 2\\sqrt{2}: equal to math-verify, different strings/numbers to a regex."""
    got = math_verify(["", "", ""], ["so the answer is $\\boxed{0.5}$", "We get \\boxed{2\\sqrt{2}}", "\\boxed{3}"],
                      answer=["\\frac{1}{2}", "\\sqrt{8}", "4"])
    assert got == [1.0, 1.0, 0.0]
    assert numeric([""], ["We get \\boxed{2\\sqrt{2}}"], answer=["\\sqrt{8}"]) == [0.0]


def trl_style_reward(prompts, completions, **kwargs):
    """A TRL reward function, unchanged: extra dataset columns arrive as keyword lists."""
    return [1.0 if c.strip() == a else 0.0 for c, a in zip(completions, kwargs["answer"])]


def test_trl_style_function_by_dotted_path():
    scorer = RewardScorer(["tests.rewards.test_rewards:trl_style_reward"])
    groups = _groups(["5", " 5 ", "6"])
    m = scorer.score(groups)
    assert rewards_of(groups[0]) == [1.0, 1.0, 0.0] and m["reward/mean"] == pytest.approx(2 / 3)


def test_weights_and_scale():
    groups = _groups(["5", "2 + 3 = 5", "7"])
    RewardScorer(["numeric", "first_number"], weights=[1.0, 0.5], scale="pm1").score(groups)
    assert rewards_of(groups[0]) == [1.5, 0.5, -1.5]


def raises(prompts, completions, **kw):
    raise RuntimeError("boom")


def hangs(prompts, completions, **kw):
    time.sleep(30)
    return [1.0] * len(completions)


def nan_and_none(prompts, completions, **kw):
    return [float("nan"), None, 1.0]


def all_none(prompts, completions, **kw):
    return [None] * len(completions)


def wrong_length(prompts, completions, **kw):
    return [1.0]


@pytest.mark.parametrize("fn, reason", [("raises", "raised"), ("all_none", "none_or_nan")])
def test_failing_reward_alone_stops_the_step_naming_it(fn, reason):
    scorer = RewardScorer([f"tests.rewards.test_rewards:{fn}"], timeout_s=2)
    with pytest.raises(RewardError, match=f"tests.rewards.test_rewards:{fn}:{reason}"):
        scorer.score(_groups(["5", "6", "7"]))


def test_hanging_reward_times_out_and_is_counted():
    scorer = RewardScorer(["numeric", "tests.rewards.test_rewards:hangs"], timeout_s=0.5)
    groups = _groups(["5", "6", "7"])
    t0 = time.time()
    m = scorer.score(groups)
    assert time.time() - t0 < 5
    assert m["reward/dropped_tests.rewards.test_rewards:hangs:timeout"] == 3
    assert rewards_of(groups[0]) == [1.0, 0.0, 0.0]  # the other function still scored them
    scorer.close()


def plus_minus_inf(prompts, completions, **kw):
    return [float("inf"), float("-inf"), 1.0]


def test_infinite_rewards_are_dropped_and_counted():
    """An inf would make the baseline and every advantage of its group inf: dropped like NaN."""
    groups = _groups(["5", "6", "7"])
    m = RewardScorer(["tests.rewards.test_rewards:plus_minus_inf"]).score(groups)
    assert rewards_of(groups[0]) == [None, None, 1.0] and m["reward/dropped_tests.rewards.test_rewards:plus_minus_inf:none_or_nan"] == 2


def test_reward_std_over_scored_samples():
    groups = _groups(["5", "6", "5", "7"])
    m = RewardScorer(["numeric"]).score(groups)
    assert m["reward/mean"] == 0.5 and m["reward/std"] == pytest.approx(0.5)


def test_nan_and_none_samples_are_dropped_and_counted():
    groups = _groups(["5", "6", "7"])
    m = RewardScorer(["tests.rewards.test_rewards:nan_and_none"]).score(groups)
    assert rewards_of(groups[0]) == [None, None, 1.0]
    assert m["reward/dropped"] == 2 and m["reward/dropped_tests.rewards.test_rewards:nan_and_none:none_or_nan"] == 2


@pytest.mark.parametrize("spec, msg", [("nosuch", "not a built-in"), ("no_such_pkg.mod:f", "cannot import module"),
                                       ("tests.rewards.test_rewards:missing", "no callable 'missing'")])
def test_unknown_reward_fails_at_start_up(spec, msg):
    with pytest.raises(RewardError, match=msg):
        resolve_reward(spec)


def test_unknown_reward_fails_before_any_model_loads(tmp_path, monkeypatch):
    """The recipe builds the reward scorer first: a typo costs a second, not a model load."""
    import asymre.models
    from asymre.config import load_config
    from tests.recipe_utils import load_recipe_module

    monkeypatch.setattr(asymre.models, "resolve_model", lambda *a, **k: pytest.fail("model loaded before rewards were checked"))
    mod = load_recipe_module()
    monkeypatch.setattr(mod, "resolve_model", lambda *a, **k: pytest.fail("model loaded before rewards were checked"))
    recipe = mod.AsymRERecipe(load_config(None, ["reward.funcs=[no_such_reward]", f"logging.run_dir={tmp_path}"]))
    with pytest.raises(RewardError, match="no_such_reward"):
        recipe.setup()


def test_format_and_length_rewards():
    from asymre.rewards.builtin import boxed_format, just_number_format, length_penalty

    assert boxed_format([""] * 3, ["so \\boxed{\\frac{1}{2}}", "boxed{2}", "answer: 2"]) == [1.0, 0.0, 0.0]
    assert just_number_format([""] * 4, ["5", " 12. ", "5 apples", "2 + 3 = 5"]) == [1.0, 1.0, 0.0, 0.0]
    assert length_penalty([""] * 3, ["", "x" * 1000, "x" * 5000]) == [0.0, -0.5, -1.0]


def test_every_builtin_is_registered_and_resolvable():
    from asymre.rewards.builtin import REGISTRY

    for name, fn in REGISTRY.items():
        assert resolve_reward(name) is fn


def test_builtins_accept_trl_conversational_completions():
    """In TRL's GRPOTrainer with chat prompts, completions arrive as message lists: our rewards plug in there too."""
    conv = [[{"role": "assistant", "content": "2 + 3 = 5"}], [{"role": "assistant", "content": "6"}]]
    assert numeric(["", ""], conv, answer=["5", "5"]) == [1.0, 0.0]
    assert first_number(["", ""], conv, answer=["5", "6"]) == [0.0, 1.0]


def test_reward_module_in_the_launch_folder_needs_no_pythonpath(tmp_path):
    """`reward.funcs=[my_rewards:fn]` finds my_rewards.py (and my_pkg/rules.py) in the folder the run was launched
    from, though that folder is not on the import path (`python -P`: as under `accelerate launch recipes/train.py`)."""
    import subprocess
    import sys

    (tmp_path / "asymre_test_local_rewards.py").write_text("def fn(prompts, completions, **kw):\n    return [1.0] * len(completions)\n")
    (tmp_path / "asymre_test_local_pkg").mkdir()
    (tmp_path / "asymre_test_local_pkg" / "__init__.py").write_text("")
    (tmp_path / "asymre_test_local_pkg" / "rules.py").write_text("def fn(prompts, completions, **kw):\n    return [2.0] * len(completions)\n")
    code = ("import sys; from asymre.rewards import resolve_reward; assert str(sys.path).count(repr(sys.argv[1])) == 0; "
            "print(resolve_reward('asymre_test_local_rewards:fn')([''], ['x']), resolve_reward('asymre_test_local_pkg.rules:fn')([''], ['x']), "
            "str(sys.path).count(repr(sys.argv[1])))")
    r = subprocess.run([sys.executable, "-P", "-c", code, str(tmp_path)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["[1.0]", "[2.0]", "0"]  # both found, and the import path untouched


def test_a_reward_of_the_wrong_length_stops_the_run_naming_it_and_the_lengths():
    """A list of the wrong length is a bug in the function (it would pair rewards with the wrong completions if
    trusted): the scorer stops, even when another function scored every sample, naming the function and both lengths."""
    from asymre.rewards import RewardContractError

    scorer = RewardScorer(["numeric", "tests.rewards.test_rewards:wrong_length"], timeout_s=2)
    groups = _groups(["5", "6", "7"])
    with pytest.raises(RewardContractError) as e:
        scorer.score(groups)
    assert str(e.value) == ("reward function 'tests.rewards.test_rewards:wrong_length' returned 1 values for 3 completions "
                            "(a reward returns one float per completion, or None to abstain)")
    assert rewards_of(groups[0]) == [None] * 3  # nothing half-scored


class _Env:
    def __init__(self, found):
        self.found = found


def env_reward(completions, environments, **kwargs):
    """A TRL reward that reads the episode's environment, and sees the episode's messages as its completion."""
    assert all(isinstance(c, list) and c[-1]["role"] == "assistant" for c in completions)
    return [float(e.found) for e in environments]


def _episode(text, **record):
    return Trajectory([1, 2, 3], text, "stop", mask=[1, 0, 1],
                      episode={"messages": [{"role": "assistant", "content": text}], "turns": 1, **record})


def test_episodes_are_scored_with_their_environments_get_reward_and_forced_rewards():
    trajs = [_episode("a", env_reward={"FactEnv": 0.5}), _episode("b"), _episode("c", forced_reward=-1.0),
             Trajectory([], "", "dropped", mask=[], episode={"dropped": "reset raised KeyError", "messages": [], "turns": 0})]
    g = TrajectoryGroup(Prompt("p", [{"role": "user", "content": "q"}], conversational=True), [9], trajs, 0)
    g.environments = [_Env(True), _Env(False), _Env(True), None]
    scorer = RewardScorer(["tests.rewards.test_rewards:env_reward"])
    scorer.score([g])
    assert [t.reward for t in trajs] == [1.5, 0.0, -1.0, None]  # + get_reward (weight 1); forced; dropped
    assert trajs[0].scores == {"tests.rewards.test_rewards:env_reward": 1.0, "FactEnv": 0.5}
    assert g.environments is None  # scored: never carried into the buffer
