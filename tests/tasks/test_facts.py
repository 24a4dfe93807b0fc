"""The facts task (asymre/tasks/facts.py): the seeded database, the splits, the lookup tool, both call parsers, the
reward; the warm-start's demonstrations are the episodes the loop would record had the policy written them."""

from __future__ import annotations

import pytest

from asymre.config import ConfigError, load_config
from asymre.data import Prompt
from asymre.envs.parsing import ToolCall, ToolFault, find, hermes
from asymre.models import load_tokenizer
from asymre.rollout.base import SamplingSpec, eos_token_ids
from asymre.rollout.episodes import EpisodeSpec, run_episodes
from asymre.tasks import build_task
from asymre.tasks.facts import ATTRIBUTES, COUNTRIES, NO_RECORD, FactsDatabase, database, demonstrations, facts_reward, split


def _task(*over):
    return load_config(None, ["task.name=facts", "task.train_size=0", "task.eval_size=1000", *over]).task


def test_the_same_seed_gives_the_same_database_and_another_seed_another():
    a, b, c = database(50, 3), database.__wrapped__(50, 3), database(50, 4)
    assert a == b  # rebuilt from scratch, not the cached object
    assert a != c
    assert database(80, 3)[:50] == a  # a larger database with the same seed keeps the smaller one's people
    assert len({p.name for p in database(2000, 0)}) == 2000
    for p in a:
        d, m, y = (int(x) for x in p.birth_date.split("/"))
        assert 1 <= d <= 31 and 1 <= m <= 12 and 1950 <= y <= 2000
        assert p.birth_place in COUNTRIES
    with pytest.raises(ValueError, match="num_people"):
        database(10**6, 0)


def test_held_out_people_are_never_named_by_a_training_prompt():
    task = _task("task.facts.num_people=40", "task.facts.held_out_share=0.25")
    train, evals = build_task(task)
    trained, held = split(database(40, 0), 0.25, 0)
    assert len(held) == 10 and len(trained) == 30
    text = " ".join(m["content"] for p in train for m in p.messages)
    assert not [p.name for p in held if p.name in text]
    assert {p.columns["person"] for p in train} == {p.name for p in trained}
    assert len(train) == 30 * len(ATTRIBUTES) * 3  # every person x attribute x phrasing
    assert {p.columns["person"] for p in evals} == {p.name for p in held}
    assert all(p.columns["answer"] == next(q for q in held if q.name == p.columns["person"]).get(p.columns["attribute"]) for p in evals)
    _, recall = build_task(_task("task.facts.num_people=40", "task.facts.held_out_share=0.25", "task.facts.eval_on=trained"))
    assert {p.columns["person"] for p in recall} == {p.name for p in trained}


def test_in_tool_prompts_teach_the_call_syntax_and_in_weight_prompts_have_none():
    train, _ = build_task(_task("task.facts.num_people=4"))
    assert "FIND <attribute> FOR <full name>" in train[0].messages[0]["content"]
    json_train, _ = build_task(_task("task.facts.num_people=4"), tool_parser="hermes")
    assert "lookup tool" in json_train[0].messages[0]["content"]
    weight, _ = build_task(_task("task.facts.num_people=4", "task.facts.mode=in_weight"))
    assert [m["role"] for m in weight[0].messages] == ["user"]


@pytest.mark.parametrize("over, key", [(["task.facts.attributes=[height]"], "task.facts.attributes"),
                                       (["task.facts.mode=in_head"], "task.facts.mode"),
                                       (["task.facts.held_out_share=1.0"], "task.facts.held_out_share"),
                                       (["task.facts.mode=in_weight", "rollout.environment=asymre.tasks.facts:FactsDatabase"],
                                        "in_weight")])
def test_bad_facts_settings_name_the_key(over, key):
    with pytest.raises((ConfigError, ValueError), match=key):
        build_task(load_config(None, ["task.name=facts", *over]).task)


def test_lookup_answers_from_the_rows_database_and_no_record_otherwise():
    train, _ = build_task(_task("task.facts.num_people=8"))
    env = FactsDatabase()
    assert env.reset(prompt="q", **train[0].columns) is None
    person = next(p for p in database(8, 0) if p.name == train[0].columns["person"])
    assert env.lookup(person.name, "address") == person.address
    assert env.lookup("  " + person.name.upper() + " ", " Occupation") == person.occupation
    assert env.lookup("Nobody Atall", "address") == NO_RECORD
    assert env.lookup(person.name, "shoe_size") == NO_RECORD
    assert env.queries[0] == (person.name, "address")
    other, stranger = FactsDatabase(), database(8, 1)[0]  # another seed: another database, read from the row
    other.reset(facts_num_people=8, facts_seed=1)
    assert other.lookup(stranger.name, "birth_date") == stranger.birth_date


def test_the_papers_find_block_is_a_lookup_call():
    assert find("```\nFIND birth_place FOR Ada Baker\n```") == ("", [ToolCall("lookup", {"name": "Ada Baker", "attribute": "birth_place"})])
    content, calls = find("Let me check.\n```text\nFIND  address  FOR Leo   Nash\n```")
    assert content == "Let me check." and calls == [ToolCall("lookup", {"name": "Leo Nash", "attribute": "address"})]
    assert find("```\nFIND occupation FOR Ada Baker") [1] == [ToolCall("lookup", {"name": "Ada Baker", "attribute": "occupation"})]
    assert find("Ada was born in 1970.") == ("Ada was born in 1970.", [])
    assert find("```python\nprint(1)\n```") == ("```python\nprint(1)\n```", [])  # another fenced block is text
    (fault,) = find("```\nFIND address\n```")[1]
    assert isinstance(fault, ToolFault) and fault.kind == "bad_arguments"
    two = find("```\nFIND address FOR A B\n```\n```\nFIND occupation FOR C D\n```")[1]
    assert [c.arguments["name"] for c in two] == ["A B", "C D"]


def test_the_json_form_of_the_call_parses_with_hermes():
    _, calls = hermes('<tool_call>\n{"name": "lookup", "arguments": {"name": "Ada Baker", "attribute": "address"}}\n</tool_call>')
    assert calls == [ToolCall("lookup", {"name": "Ada Baker", "attribute": "address"})]


def test_the_reward_normalises_and_matches_whole_values_in_the_final_answer():
    r = facts_reward(None, ["He was born on 03/07/1975.", "PARIS!", "Parisian", "It is 13/7/1975", "a police officer, yes"],
                     answer=["3/7/1975", "Paris", "Paris", "3/7/1975", "police officer"])
    assert r == [1.0, 1.0, 0.0, 0.0, 1.0]
    episode = [{"role": "assistant", "content": ""}, {"role": "tool", "content": "Tokyo"}, {"role": "assistant", "content": "I do not know."}]
    assert facts_reward(None, [episode], answer=["Tokyo"]) == [0.0]  # the tool said it, the answer did not
    episode[-1]["content"] = "She lives in Tokyo."
    assert facts_reward(None, [episode], answer=["Tokyo"]) == [1.0]
    with pytest.raises(ValueError, match="answer"):
        facts_reward(None, ["x"])


class _Scripted:
    """A policy that writes, at its k-th turn, script[k] and its end-of-turn token (SmolLM2's own template)."""

    def __init__(self, tok, scripts):
        self.tokenizer, self.scripts = tok, scripts
        self.max_prompt_tokens, self.chat_template_kwargs, self.version = 2048, {}, 0
        self.eos = eos_token_ids(tok)

    def sample(self, token_lists, spec, max_new_tokens=None):
        from asymre.data import Trajectory

        out = []
        for ids in token_lists:
            text = self.tokenizer.decode(ids)
            script = next(s for key, s in self.scripts.items() if key in text)
            said = script[text.count("<|im_start|>tool")]
            new = self.tokenizer(said, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
            out.append([Trajectory(new, said, "stop", logprobs=[-0.5] * len(new)) for _ in range(spec.n)])
        return out


def test_demonstrations_are_the_episodes_the_loop_records_token_for_token(model_path):
    from asymre.warm_start import encode

    tok = load_tokenizer(model_path)
    train, _ = build_task(_task("task.facts.num_people=6"))
    prompts = train[:3]
    demos = demonstrations(prompts, "in_tool")
    engine = _Scripted(tok, {p.messages[-1]["content"]: [d[0]["content"], d[2]["content"]] for p, d in zip(prompts, demos)})
    ep = EpisodeSpec(environment="asymre.tasks.facts:FactsDatabase", max_turns=2, tool_parser="find")
    groups = run_episodes(engine, prompts, SamplingSpec(n=1, max_new_tokens=64, episode=ep))
    for p, d, g in zip(prompts, demos, groups):
        t = g.trajectories[0]
        assert t.episode["tool_calls"] == {"lookup": 1} and facts_reward(None, [t.text], answer=[p.columns["answer"]]) == [1.0]
        pid, cid, mask = encode(tok, p.messages, d, eos_token_ids(tok))
        assert pid == g.prompt_ids
        assert cid == t.completion_ids and mask == t.mask  # the environment's tokens masked the same way
        assert 0 in mask and mask[-1] == 1


def test_a_warm_start_file_names_its_bad_row(tmp_path, model_path):
    from asymre.config import InputError
    from asymre.warm_start import demonstration_groups

    f = tmp_path / "demos.jsonl"
    f.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n{"messages": "oops"}\n')
    cfg = load_config(None, ["warm_start.steps=1", f"warm_start.data={f}"])
    with pytest.raises(InputError, match=r"demos.jsonl row 2: needs a `messages` list"):
        demonstration_groups(cfg, load_tokenizer(model_path), [])
    f.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n')
    groups = demonstration_groups(cfg, load_tokenizer(model_path), [])
    assert len(groups) == 16 and len({id(g) for g in groups}) == 1  # one step of batch_size 16: the one demonstration, rendered once
    t = groups[0].trajectories[0]
    assert t.reward == 1.0 and t.mask is None and load_tokenizer(model_path).decode(t.completion_ids) == "hello<|im_end|>"
    with pytest.raises(ConfigError, match="warm_start.data=task"):
        demonstration_groups(load_config(None, ["warm_start.steps=1"]), load_tokenizer(model_path), [Prompt("a", [])])


def test_the_warm_start_trains_steps_x_batch_size_demonstrations_in_passes_split_over_ranks():
    from asymre.warm_start import demonstration_groups

    cfg = load_config(None, ["task.name=facts", "task.train_size=0", "task.facts.num_people=4", "task.facts.mode=in_weight", "warm_start.steps=8",
                             "warm_start.batch_size=4"])
    train, _ = build_task(cfg.task)
    from asymre.models import resolve_model

    tok = load_tokenizer(resolve_model("smollm2-135m-instruct"))
    whole = demonstration_groups(cfg, tok, train)
    assert len(train) == 24 and len(whole) == 32  # 2 trained people x 4 attributes x 3 phrasings; 8 steps x 4
    assert sorted(g.prompt.uid for g in whole[:24]) == sorted(f"demo:{i}" for i in range(24))  # a whole pass first
    halves = [demonstration_groups(cfg, tok, train, r, 2) for r in (0, 1)]
    assert [len(h) for h in halves] == [32, 32] and not {g.prompt.uid for g in halves[0][:12]} & {g.prompt.uid for g in halves[1][:12]}


def test_a_warm_start_is_refused_where_it_cannot_run():
    with pytest.raises(ConfigError, match="warm_start.steps.*colocated"):
        load_config(None, ["warm_start.steps=2", "rollout.mode=async"])


def test_the_find_syntax_runs_on_smollm2s_own_template_and_json_calls_need_one_that_shows_tools(model_path):
    from asymre.rollout import check_episodes

    def cfg(*over):
        return load_config(None, ["task.name=facts", "rollout.environment=asymre.tasks.facts:FactsDatabase", "rollout.max_turns=2", *over])

    check_episodes(cfg("rollout.tool_parser=find"), model_path)  # the prompt teaches the call: no schema needed
    with pytest.raises(ConfigError, match="does not show the tools"):
        check_episodes(cfg("rollout.tool_parser=hermes"), model_path)
    check_episodes(cfg("rollout.tool_parser=hermes", "model.chat_template=chatml-tools"), model_path)
