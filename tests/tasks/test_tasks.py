"""Tasks: the arithmetic task is seeded, answers are right, train and eval never share a problem; the
prompt stream is endless, reshuffled per epoch, sharded per rank and resumable."""

from asymre.config import load_config
from asymre.tasks import PromptStream, build_task
from asymre.tasks.arithmetic import build


def test_arithmetic_is_seeded_correct_and_split():
    tr, ev = build(300, 40, max_operand=9, operations=["+", "*"], seed=3)
    tr2, ev2 = build(300, 40, max_operand=9, operations=["+", "*"], seed=3)
    assert [p.uid for p in tr] == [p.uid for p in tr2] and [p.uid for p in ev] == [p.uid for p in ev2]
    assert len(tr) == 300 and len(ev) == 40
    assert not {p.uid for p in tr} & {p.uid for p in ev}
    for p in tr[:50]:
        q = p.messages[-1]["content"]
        a, op, b = q.split()[2], q.split()[3], q.split()[4].rstrip("?")
        assert int(p.columns["answer"]) == (int(a) + int(b) if op == "+" else int(a) * int(b))


def test_system_prompt_and_template():
    cfg = load_config(None, ["task.system_prompt=Be brief.", "task.template='{a}{op}{b}='", "task.eval_size=5"])
    tr, _ = build_task(cfg.task)
    assert tr[0].messages[0] == {"role": "system", "content": "Be brief."}
    assert tr[0].messages[1]["content"].endswith("=")


def test_prompt_stream_epochs_shards_and_resume():
    prompts, _ = build(20, 0, seed=0)
    s = PromptStream(prompts, seed=1)
    first = [p.uid for p in s.take(20)]
    assert sorted(first) == sorted(p.uid for p in prompts)
    s.take(5)
    state = s.state_dict()
    cont = [p.uid for p in s.take(30)]
    r = PromptStream(prompts, seed=1)
    r.load_state_dict(state)
    assert [p.uid for p in r.take(30)] == cont
    a, b = PromptStream(prompts, 0, 0, 2), PromptStream(prompts, 0, 1, 2)
    assert not {id(p) for p in a.prompts} & {id(p) for p in b.prompts}
