"""Replay buffer: staleness, eviction past max_staleness, FIFO-once and reuse sampling, save/restore."""

import json
from collections import Counter

import pytest

from asymre.buffer import ReplayBuffer
from asymre.data import Prompt, Trajectory, TrajectoryGroup


def _group(version: int, uid: str = "p", reward: float = 1.0) -> TrajectoryGroup:
    t = Trajectory(completion_ids=[3, 4], text="x", finish_reason="stop", reward=reward)
    return TrajectoryGroup(prompt=Prompt(uid=uid, messages=[{"role": "user", "content": "q"}], columns={"answer": "1"}),
                           prompt_ids=[1, 2], trajectories=[t, t], version=version)


def test_fifo_once_oldest_first():
    b = ReplayBuffer(capacity=10, max_staleness=100)
    b.add([_group(0, "a"), _group(1, "b"), _group(2, "c")])
    got = b.sample(2, learner_version=3)
    assert [g.prompt.uid for g in got] == ["a", "b"]
    assert [g.prompt.uid for g in b.sample(5, 3)] == ["c"]
    assert len(b) == 0  # each group trained on once


def test_evicts_past_max_staleness():
    """If this fails, the learner could train on data older than the user allowed."""
    b = ReplayBuffer(capacity=10, max_staleness=2)
    b.add([_group(0, "old"), _group(3, "ok"), _group(5, "new")])
    assert b.available(5) == 2
    got = b.sample(3, learner_version=5)
    assert [g.prompt.uid for g in got] == ["ok", "new"]
    assert b.counts["evicted_stale"] == 1
    assert all(5 - g.version <= 2 for g in got)


def test_on_policy_setting_keeps_only_current_version():
    b = ReplayBuffer(max_staleness=0)
    b.add([_group(4), _group(5)])
    assert [g.version for g in b.sample(10, 5)] == [5]


def test_capacity_drops_oldest():
    b = ReplayBuffer(capacity=2, max_staleness=100)
    b.add([_group(0, "a"), _group(0, "b"), _group(0, "c")])
    assert [g.prompt.uid for g in b.groups] == ["b", "c"] and b.counts["evicted_capacity"] == 1


def test_reuse_sampling_respects_max_reuse():
    b = ReplayBuffer(capacity=10, max_staleness=100, sampling="reuse", max_reuse=3, seed=0)
    b.add([_group(0, str(i)) for i in range(4)])
    seen = {}
    for _ in range(20):
        for g in b.sample(2, 0):
            seen[g.prompt.uid] = seen.get(g.prompt.uid, 0) + 1
    assert seen == {str(i): 3 for i in range(4)}  # each used exactly max_reuse times, then gone
    assert len(b) == 0


def test_stats_and_histogram():
    b = ReplayBuffer(max_staleness=100)
    b.add([_group(1), _group(1), _group(3)])
    s = b.stats(4)
    assert s["buffer/groups"] == 3 and s["buffer/staleness_mean"] == (3 + 3 + 1) / 3 and s["buffer/staleness_max"] == 3
    assert dict(Counter(b.staleness(4))) == {1: 1, 3: 2}


def test_state_round_trip_through_json():
    b = ReplayBuffer(capacity=5, max_staleness=9, sampling="reuse", max_reuse=2, seed=3)
    b.add([_group(i, str(i), reward=i / 10) for i in range(4)])
    b.sample(1, 4)
    state = json.loads(json.dumps(b.state_dict()))
    c = ReplayBuffer(capacity=5, max_staleness=9, sampling="reuse", max_reuse=2, seed=99)
    c.load_state_dict(state)
    assert [g.to_dict() for g in c.groups] == [g.to_dict() for g in b.groups]
    assert [g.prompt.uid for g in c.sample(2, 4)] == [g.prompt.uid for g in b.sample(2, 4)]  # same RNG stream


@pytest.mark.parametrize("key, value", [("capacity", 6), ("max_staleness", 8), ("sampling", "fifo"), ("max_reuse", 3)])
def test_restore_refuses_a_buffer_saved_with_other_settings(key, value):
    """The saved settings are not silently replaced by the new buffer's: restoring into other settings is refused."""
    settings = {"capacity": 5, "max_staleness": 9, "sampling": "reuse", "max_reuse": 2}
    b = ReplayBuffer(**settings)
    b.add([_group(1)])
    c = ReplayBuffer(**{**settings, key: value})
    with pytest.raises(ValueError, match=f"buffer.{key}: the saved buffer was made with"):
        c.load_state_dict(json.loads(json.dumps(b.state_dict())))
    assert len(c) == 0


def test_group_json_stores_prompt_ids_and_version_once():
    """A checkpoint holds each group's prompt token ids and behaviour version once, not once per sample."""
    g = _group(3, reward=0.5)
    d = json.loads(json.dumps(g.to_dict()))
    assert d["prompt_ids"] == [1, 2] and d["version"] == 3 and d["uses"] == 0
    assert all(set(t) == {"completion_ids", "text", "finish_reason", "logprobs", "reward", "extras", "scores", "mask", "episode"}
               for t in d["trajectories"])
    assert TrajectoryGroup.from_dict(d) == g
    old = {k: v for k, v in d.items() if k != "prompt_ids"}
    old["trajectories"] = [{**t, "prompt_ids": [1, 2], "version": 3} for t in d["trajectories"]]
    with pytest.raises(ValueError, match="old format"):
        TrajectoryGroup.from_dict(old)


def test_group_without_any_scored_sample_is_not_buffered():
    """Such a group would give the learner nothing to train on (and, under DDP, one rank an empty step)."""
    b = ReplayBuffer(max_staleness=10)
    dead = _group(0, "dead")
    for t in dead.trajectories:
        t.reward = None
    b.add([dead, _group(0, "ok")])
    assert [g.prompt.uid for g in b.groups] == ["ok"] and b.counts["dropped_unscored"] == 1


def test_capacity_is_checked_for_every_rank_the_buffer_feeds():
    """Async mode: one buffer deals every learner rank its groups, so it must hold groups_per_step x ranks."""
    from asymre.config import ConfigError, load_config

    cfg = load_config(None, ["buffer.capacity=8", "learner.groups_per_step=4", "buffer.min_groups=0"])
    assert ReplayBuffer.from_config(cfg, ranks=2).capacity == 8
    with pytest.raises(ConfigError, match=r"buffer.capacity=8 cannot hold one step's 12 groups \(learner.groups_per_step=4 x 3 learner ranks"):
        ReplayBuffer.from_config(cfg, ranks=3)
