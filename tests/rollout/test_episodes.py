"""The episode loop (asymre/rollout/episodes.py) on a scripted engine with the embedded model's real tokenizer and the
shipped chatml-tools template: token lists are the model's sampled tokens plus the template's rendering of each tool
message, masks say which is which, and every fault reaches the model as the tool's result and is counted."""

from __future__ import annotations

import json
import time
from dataclasses import replace

import pytest

from asymre.data import Prompt, Trajectory
from asymre.envs.templates import environment_suffix, resolve_chat_template
from asymre.models import load_tokenizer
from asymre.rollout.base import SamplingSpec, eos_token_ids
from asymre.rollout.episodes import EpisodeSpec, episode_metrics, run_episodes

TEMPLATE = resolve_chat_template("chatml-tools")


class FactEnv:
    """A TRL-style environment: one instance per episode, reset(**row), public methods are its tools."""

    def reset(self, **kwargs):
        if kwargs.get("broken"):
            raise RuntimeError("no such database")
        self.person = kwargs.get("person", "Ada")
        self.looked_up = 0
        return None

    def lookup(self, name: str) -> str:
        """Look up where a person lives.

        Args:
            name: The person's full name.
        """
        self.looked_up += 1
        return {"Ada": "London", "Alan": "Wilmslow"}.get(name, "no such record")

    def explode(self) -> str:
        """A tool that raises."""
        raise ValueError("kaboom")

    def hang(self) -> str:
        """A tool that never answers in time."""
        time.sleep(30)
        return "late"

    def get_reward(self) -> float:
        return 0.5 * self.looked_up


def double(x: int) -> int:
    """Double a number.

    Args:
        x: The number.
    """
    return 2 * x


class ScriptedEngine:
    """An engine whose policy says, at its k-th turn of an episode, script[k] (then its end-of-turn token)."""

    def __init__(self, tok, script, per_prompt=None):
        self.tokenizer, self.script, self.per_prompt = tok, script, per_prompt or {}
        self.max_prompt_tokens, self.chat_template_kwargs, self.version = 2048, {}, 3
        self.eos = eos_token_ids(tok)
        self.calls: list[list[list[int]]] = []

    def sample(self, token_lists, spec, max_new_tokens=None):
        self.calls.append([list(x) for x in token_lists])
        out = []
        for i, ids in enumerate(token_lists):
            text = self.tokenizer.decode(ids)
            turn = text.count("</tool_response>")
            script = next((s for key, s in self.per_prompt.items() if key in text), self.script)
            said = script[min(turn, len(script) - 1)]
            new = self.tokenizer(said, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
            cap = (max_new_tokens or [spec.max_new_tokens] * len(token_lists))[i]
            finish = "stop" if len(new) <= cap else "length"
            new = new[:cap]
            out.append([Trajectory(new, said, finish, logprobs=[-0.5] * len(new) if spec.logprobs else None) for _ in range(spec.n)])
        return out


@pytest.fixture(scope="module")
def tok(model_path):
    return load_tokenizer(model_path)


def _call(tool, **args) -> str:
    return "<tool_call>\n" + json.dumps({"name": tool, "arguments": args}) + "\n</tool_call>"


def _spec(**ep) -> SamplingSpec:
    base = dict(tools=("tests.rollout.test_episodes:double",), environment="tests.rollout.test_episodes:FactEnv", max_turns=4,
                tool_timeout_s=1.0, chat_template=TEMPLATE)
    return SamplingSpec(n=2, max_new_tokens=64, seed=5, logprobs=True, episode=EpisodeSpec(**{**base, **ep}))


def _prompts(**columns) -> list[Prompt]:
    return [Prompt("p0", [{"role": "user", "content": "Where does Ada live?"}], dict(columns), conversational=True)]


def _segments(t: Trajectory) -> list[tuple[int, list[int]]]:
    out: list[tuple[int, list[int]]] = []
    for tid, m in zip(t.completion_ids, t.mask):
        if out and out[-1][0] == m:
            out[-1][1].append(tid)
        else:
            out.append((m, [tid]))
    return out


def test_an_episode_is_the_models_tokens_plus_the_templates_rendering_of_each_tool_message(tok):
    engine = ScriptedEngine(tok, [_call("lookup", name="Ada"), _call("double", x=21), "Ada lives in London."])
    groups = run_episodes(engine, _prompts(), _spec())
    g = groups[0]
    assert g.version == 3 and len(g.trajectories) == 2 and len(g.environments) == 2
    t = g.trajectories[0]
    segs = _segments(t)
    assert [m for m, _ in segs] == [1, 0, 1, 0, 1]
    eos = eos_token_ids(tok)
    said = [_call("lookup", name="Ada"), _call("double", x=21), "Ada lives in London."]
    for (_, ids), text in zip(segs[::2], said):  # the model's turns: exactly what the engine sampled
        assert ids == tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    for (_, ids), result, name in zip(segs[1::2], ["London", "42"], ["lookup", "double"]):  # the environment's: the template's
        assert ids == environment_suffix(tok, [{"role": "tool", "name": name, "content": result}], eos, TEMPLATE)
        # written out: the newline ChatML puts after the model's <|im_end|>, the tool turn, the next assistant header
        literal = f"\n<|im_start|>tool\n<tool_response>\n{result}\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
        assert ids == tok(literal, add_special_tokens=False)["input_ids"]
    # each turn continued the episode's exact token list (no re-tokenisation of the model's tokens)
    assert engine.calls[1][0] == g.prompt_ids + segs[0][1] + segs[1][1]
    assert engine.calls[2][0] == g.prompt_ids + [x for _, ids in segs[:4] for x in ids]
    assert t.logprobs == [-0.5 if m else 0.0 for m in t.mask]
    assert t.text == "Ada lives in London." and t.finish_reason == "stop"
    msgs = t.episode["messages"]
    assert [m["role"] for m in msgs] == ["assistant", "tool", "assistant", "tool", "assistant"]
    assert msgs[0]["tool_calls"][0]["function"] == {"name": "lookup", "arguments": {"name": "Ada"}}
    assert t.episode["tool_calls"] == {"lookup": 1, "double": 1} and t.episode["turns"] == 3
    assert t.episode["env_reward"] == {"FactEnv": 0.5}  # get_reward, read at the episode's end
    # the prompt renders the tools (the environment's methods and the plain function) in the system turn
    prompt = tok.decode(g.prompt_ids)
    assert '"name": "lookup"' in prompt and '"name": "double"' in prompt and '"name": "reset"' not in prompt
    m = episode_metrics(groups)
    assert m["episode/turns"] == 3 and m["episode/tool_calls"] == 4 and m["episode/calls/lookup"] == 2
    assert 0 < m["episode/env_token_frac"] < 1 and m["episode/tool_errors"] == 0


def test_without_tools_the_episode_is_one_completion_as_before(tok):
    engine = ScriptedEngine(tok, [_call("lookup", name="Ada")])
    groups = run_episodes(engine, _prompts(), SamplingSpec(n=2, max_new_tokens=64, seed=5))
    t = groups[0].trajectories[0]
    assert len(engine.calls) == 1 and t.mask is None and t.episode is None and t.text == _call("lookup", name="Ada")
    assert groups[0].environments is None and episode_metrics(groups) == {}


@pytest.mark.parametrize("said, kind, needle", [
    ('<tool_call>\n{"name": "lookup", "arguments": {"name": }\n</tool_call>', "bad_json", "Error: the tool call is not valid JSON"),
    (_call("teleport", to="Mars"), "unknown_tool", "Error: unknown tool 'teleport'"),
    (_call("lookup", person="Ada"), "bad_arguments", "Error: wrong arguments for lookup"),
    (_call("double", x="two"), "bad_arguments", "argument 'x' must be int"),
    (_call("explode"), "raised", "Error: explode raised ValueError: kaboom"),
    (_call("hang"), "timeout", "Error: hang did not answer within 1 s"),
])
def test_each_fault_reaches_the_model_as_the_tools_result_and_is_counted(tok, said, kind, needle):
    engine = ScriptedEngine(tok, [said, "Sorry."])
    t0 = time.monotonic()
    groups = run_episodes(engine, _prompts(), _spec())
    assert time.monotonic() - t0 < 10  # a hung tool costs one tool_timeout_s, never the 30 s it sleeps
    t = groups[0].trajectories[0]
    assert t.episode["tool_errors"] == {kind: 1} and t.finish_reason == "stop" and t.text == "Sorry."
    env_tokens = [ids for m, ids in _segments(t) if m == 0]
    assert len(env_tokens) == 1 and needle in tok.decode(env_tokens[0])  # the second turn saw the error
    assert needle in engine.tokenizer.decode(engine.calls[1][0])
    m = episode_metrics(groups)
    assert m[f"episode/tool_errors/{kind}"] == 2 and m["episode/tool_errors"] == 2  # both samples of the group


@pytest.mark.parametrize("policy, reward", [("end", None), ("reward", -1.0)])
def test_on_bad_tool_call_can_end_the_episode_instead(tok, policy, reward):
    engine = ScriptedEngine(tok, [_call("teleport"), "never said"])
    groups = run_episodes(engine, _prompts(), _spec(on_bad_tool_call=policy, bad_tool_call_reward=-1.0))
    t = groups[0].trajectories[0]
    assert len(engine.calls) == 1 and t.finish_reason == "tool_error" and set(t.mask) == {1}
    assert t.episode.get("forced_reward") == reward


def test_a_reset_that_raises_drops_that_sample_only(tok, caplog):
    engine = ScriptedEngine(tok, ["Ada lives in London."])
    prompts = _prompts(broken=True) + [Prompt("p1", [{"role": "user", "content": "Where does Alan live?"}], {"person": "Alan"}, True)]
    with caplog.at_level("WARNING", logger="asymre.episodes"):
        groups = run_episodes(engine, prompts, _spec())
    assert "FactEnv.reset raised on row 'p0' (RuntimeError: no such database): that sample is dropped" in caplog.text
    dropped, kept = groups
    assert all(t.completion_ids == [] and t.finish_reason == "dropped" for t in dropped.trajectories)
    assert all(t.completion_ids and t.text == "Ada lives in London." for t in kept.trajectories)
    assert episode_metrics(groups)["episode/dropped"] == 2


def test_limits_turns_episode_tokens_and_tool_result_tokens(tok):
    always = ScriptedEngine(tok, [_call("lookup", name="Ada")])
    t = run_episodes(always, _prompts(), _spec(max_turns=2))[0].trajectories[0]
    assert t.episode["turns"] == 2 and t.finish_reason == "length"  # out of turns with a call still to make
    short = ScriptedEngine(tok, [_call("lookup", name="Ada"), "x " * 100])
    t = run_episodes(short, _prompts(), _spec(max_tokens=80))[0].trajectories[0]
    assert len(t.completion_ids) <= 80 and t.finish_reason == "length"

    class Long(ScriptedEngine):
        pass

    long_env = "tests.rollout.test_episodes:VerboseEnv"
    t = run_episodes(Long(tok, [_call("read"), "ok"]), _prompts(), _spec(environment=long_env, tools=(), max_tool_result_tokens=8))[0].trajectories[0]
    result = t.episode["messages"][1]["content"]
    assert result.endswith(" ... [truncated]") and len(tok(result.removesuffix(" ... [truncated]"))["input_ids"]) <= 8


class VerboseEnv:
    def reset(self, **kwargs):
        return "\n\nThe document is long."

    def read(self) -> str:
        """Read the document."""
        return "word " * 500


def test_a_reset_observation_is_appended_to_the_last_user_message(tok):
    engine = ScriptedEngine(tok, ["ok"])
    g = run_episodes(engine, _prompts(), _spec(environment="tests.rollout.test_episodes:VerboseEnv", tools=()))[0]
    assert "Where does Ada live?\n\nThe document is long.<|im_end|>" in tok.decode(g.prompt_ids)


def test_the_same_seed_gives_the_same_episodes_and_turn_seeds_differ(tok):
    seen = []

    class Seeds(ScriptedEngine):
        def sample(self, token_lists, spec, max_new_tokens=None):
            seen.append(spec.seed)
            return super().sample(token_lists, spec, max_new_tokens)

    spec = _spec()
    a = run_episodes(Seeds(tok, [_call("lookup", name="Ada"), "done"]), _prompts(), spec)
    b = run_episodes(Seeds(tok, [_call("lookup", name="Ada"), "done"]), _prompts(), replace(spec))
    assert [t.completion_ids for t in a[0].trajectories] == [t.completion_ids for t in b[0].trajectories]
    assert seen[0] == 5 and seen[1] != 5 and seen[:2] == seen[2:]  # turn 1 keeps the round's seed (single-turn unchanged)


# ------------------------------------------------------------------------------------------------ a real vLLM engine
class LookupEnv:
    """TRL's documented form, as a user copies it: reset(**kwargs), one tool method with a Google-style docstring."""

    def reset(self, **kwargs) -> str | None:
        self.looked_up = 0
        return None

    def lookup(self, name: str) -> str:
        """
        Look up where a person lives.

        Args:
            name: The person's full name.

        Returns:
            The city the person lives in.
        """
        self.looked_up += 1
        return {"Ada": "London", "Alan": "Wilmslow"}.get(name, "no such record")


CALL_REGEX = r'<tool_call>\n\{"name": "lookup", "arguments": \{"name": "(Ada|Alan)"\}\}\n</tool_call>'


@pytest.mark.slow
def test_a_real_vllm_engine_runs_three_turn_episodes_token_exact(vllm_engine, tok):
    """SmolLM2 never calls a tool unaided (0 of 128 samples), so vLLM's structured outputs constrain every turn to a
    lookup call (rollout.generation_kwargs: structured_outputs: {regex: ...}): episodes of 3 model turns, 2 tool
    results, cut at max_turns. The token list is each turn's sampled tokens, exactly, then the template's rendering of
    the tool's answer; the behaviour log-probs are the engine's on the model's tokens and 0.0 on the environment's."""
    from tests.recipe_utils import lend_engine

    engine = lend_engine(vllm_engine, max_prompt_tokens=1024)
    ep = dict(max_turns=3, max_tokens=400, tools=(), environment="tests.rollout.test_episodes:LookupEnv")
    spec = replace(_spec(**ep), n=2, temperature=1.0, max_new_tokens=40,
                   extra={"structured_outputs": {"regex": CALL_REGEX}})
    groups = engine.generate(_prompts() + [Prompt("p1", [{"role": "user", "content": "Where does Alan live?"}], {}, True)], spec)
    eos = eos_token_ids(tok)
    for g in groups:
        for t in g.trajectories:
            segs = _segments(t)
            assert [m for m, _ in segs] == [1, 0, 1, 0, 1] and t.episode["turns"] == 3 and t.finish_reason == "length"
            names = [c["tool_calls"][0]["function"]["arguments"]["name"] for c in t.episode["messages"] if c["role"] == "assistant"]
            for (_, ids), name in zip(segs[::2], names):  # the model's tokens: what it sampled, ending on its <|im_end|>
                assert ids[-1] == tok.eos_token_id and tok.decode(ids[:-1]) == _call("lookup", name=name)
            for (_, ids), name in zip(segs[1::2], names):
                answer = {"Ada": "London", "Alan": "Wilmslow"}[name]
                assert ids == environment_suffix(tok, [{"role": "tool", "name": "lookup", "content": answer}], eos, TEMPLATE)
            assert all(lp < 0 or lp == 0.0 for lp in t.logprobs) and all(lp == 0.0 for lp, m in zip(t.logprobs, t.mask) if not m)
            assert any(lp < 0 for lp in t.logprobs)
            assert t.episode["tool_calls"] == {"lookup": 2} and g.environments[g.trajectories.index(t)].looked_up == 2
    # the engine continues an episode's exact tokens: re-sampling its last turn from its own context gives the same turn
    t = groups[0].trajectories[0]
    last = [i for i, m in enumerate(t.mask) if m == 0][-1] + 1
    greedy = replace(spec, n=1, temperature=0.0, episode=None)
    again = engine.sample([groups[0].prompt_ids + t.completion_ids[:last]], greedy)[0][0]
    assert tok.decode(again.completion_ids[:-1]).startswith('<tool_call>\n{"name": "lookup"')


@pytest.mark.slow
def test_single_completions_on_vllm_are_what_they_were_before_episodes(vllm_engine):
    """The one-turn episode on the real engine: the same seed gives the tokens, text and log-probs recorded before the
    episode loop existed (tests/data/single_turn_vllm_reference.json: the default task's first 3 prompts, 3 samples)."""
    from pathlib import Path

    from asymre.config import load_config
    from asymre.tasks import build_task
    from tests.recipe_utils import lend_engine

    root = Path(__file__).resolve().parents[2]
    ref = json.loads((root / "tests/data/single_turn_vllm_reference.json").read_text())
    train, _ = build_task(load_config(root / "recipes/configs/smollm2_arithmetic_cpu.yaml").task)
    engine = lend_engine(vllm_engine, max_prompt_tokens=384)
    groups = engine.generate(train[:3], SamplingSpec(n=3, temperature=1.0, max_new_tokens=12, seed=1234, logprobs=True))
    got = [{"uid": g.prompt.uid, "prompt_ids": g.prompt_ids,
            "samples": [{"ids": t.completion_ids, "logprobs": t.logprobs, "text": t.text, "finish": t.finish_reason} for t in g.trajectories]}
           for g in groups]
    # tokens, text and finish exactly; the log-probs to float32 kernel noise: the same code gave them 3.5e-5 apart on
    # two installs of the same versions (the reference was re-recorded from 6e579e0^ with
    # tests/data/record_single_turn_references.py); a temperature, offset or wrong-token change moves them far more
    logprobs = [[s.pop("logprobs") for s in g["samples"]] for g in got]
    want = [[s.pop("logprobs") for s in g["samples"]] for g in ref]
    assert got == ref
    for have, expect in zip(logprobs, want, strict=True):
        for a, b in zip(have, expect, strict=True):
            assert a == pytest.approx(b, abs=2e-4), (a, b)


# ------------------------------------------------------------------------------------------------ start-up checks
def _startup(model_path, *over):
    from asymre.config import load_config
    from asymre.rollout import check_episodes

    cfg = load_config(None, ["rollout.environment=tests.rollout.test_episodes:LookupEnv", *over])
    return check_episodes(cfg, model_path)


def test_startup_refuses_a_template_without_tools_and_one_that_re_renders_earlier_turns(model_path):
    from asymre.config import ConfigError

    with pytest.raises(ConfigError, match="smollm2-135m-instruct's own chat template does not show the tools"):
        _startup(model_path)  # SmolLM2's own template ignores tools=
    assert _startup(model_path, "model.chat_template=chatml-tools").chat_template == TEMPLATE
    # a template that drops an earlier assistant turn's text once a later one exists (as reasoning templates drop <think>)
    dropping = TEMPLATE.replace("{{- '<|im_start|>assistant\\n' + (message['content'] or '') -}}",
                                "{{- '<|im_start|>assistant\\n' + ((message['content'] or '') if loop.last else '') -}}")
    assert dropping != TEMPLATE
    with pytest.raises(ConfigError, match="differently once a tool turn follows it|re-renders earlier turns"):
        _startup(model_path, f"model.chat_template={json.dumps(dropping)}")


@pytest.mark.parametrize("over, error", [
    (["rollout.tools=[tests.rollout.test_episodes:nope]"], r"rollout.tools: 'tests.rollout.test_episodes:nope': module .* has no 'nope'"),
    (["rollout.tools=[tests.rollout.test_episodes:_undocumented]"], "cannot build its tool schema"),
    (["rollout.environment=tests.rollout.test_episodes:NeedsArgs"], "NeedsArgs cannot be built with no arguments"),
    (["rollout.tool_parser=xml"], "rollout.tool_parser='xml'"),
    (["rollout.backend=tests.fakes:make", "model.chat_template=chatml-tools"], "has only `generate`"),
])
def test_startup_names_a_bad_tool_environment_or_parser(model_path, over, error):
    from asymre.config import ConfigError

    with pytest.raises(ConfigError, match=error):
        _startup(model_path, "model.chat_template=chatml-tools", *over)


def _undocumented(x):
    return x


class NeedsArgs:
    def __init__(self, db):
        self.db = db

    def reset(self, **kwargs):
        return None


def test_auto_reads_calls_with_the_tokenizers_own_response_template(model_path):
    """A tokenizer with a response format (transformers 5.19 `response_template`, TRL's Qwen3 one here: the same ChatML
    anchors) is parsed by `tokenizer.parse_response`; malformed JSON is a bad_json fault; without one, hermes."""
    from asymre.envs.parsing import ToolCall, ToolFault, hermes, make_parser

    tok = load_tokenizer(model_path)
    assert make_parser("auto", tok) is hermes
    tok.response_template = {"defaults": {"role": "assistant"}, "start_anchor": "<|im_start|>assistant\n", "fields": {
        "tool_calls": {"open": "<tool_call>", "close_pattern": r"</tool_call>\s*", "repeats": True, "content": "json",
                       "transform": {"type": "function", "function": "{content}"}},
        "content": {"close_pattern": r"<\|im_end\|>\s*", "content": "text"}}}
    parse = make_parser("auto", tok)
    assert parse is not hermes
    assert parse("Let me look.\n" + _call("lookup", name="Ada")) == ("Let me look.", [ToolCall("lookup", {"name": "Ada"})])
    content, calls = parse('<tool_call>\n{"name": "lookup", "arguments": {"name": }\n</tool_call>')
    assert len(calls) == 1 and isinstance(calls[0], ToolFault) and calls[0].kind == "bad_json"
    assert parse("Just text.") == ("Just text.", [])
