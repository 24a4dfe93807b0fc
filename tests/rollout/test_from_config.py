"""Engines built from the run's config (`generator_from_config`): what reaches a backend's factory."""

from types import SimpleNamespace

import pytest

from asymre.config import ConfigError, load_config
from asymre.rollout import check_rollout_config, generator_from_config

BUILT = []


def factory(model_path, dtype="float32", seed=0, chat_template_kwargs=None):
    """A user's backend factory (rollout.backend='pkg.mod:factory') that records its arguments."""
    BUILT.append({"model_path": model_path, "dtype": dtype, "seed": seed, "chat_template_kwargs": chat_template_kwargs})
    return SimpleNamespace(version=0)


def old_factory(model_path, dtype="float32", seed=0):
    return SimpleNamespace(version=0)


def test_custom_backend_gets_the_runs_dtype_rank_seed_and_chat_template_kwargs():
    BUILT.clear()
    cfg = load_config(None, [f"rollout.backend={__name__}:factory", "rollout.seed=7", "model.dtype=bfloat16",
                             "task.chat_template_kwargs={enable_thinking: false}"])
    check_rollout_config(cfg)
    generator_from_config(cfg, "/models/m", rank=2)
    assert BUILT == [{"model_path": "/models/m", "dtype": "bfloat16", "seed": 9, "chat_template_kwargs": {"enable_thinking": False}}]
    generator_from_config(load_config(None, [f"rollout.backend={__name__}:old_factory"]), "/models/m")  # none set: not passed


def test_custom_backend_that_cannot_take_chat_template_kwargs_is_refused_at_start_up():
    cfg = load_config(None, [f"rollout.backend={__name__}:old_factory", "task.chat_template_kwargs={enable_thinking: false}"])
    with pytest.raises(ConfigError, match="old_factory: the factory takes no chat_template_kwargs"):
        check_rollout_config(cfg)
    with pytest.raises(ConfigError, match="cannot load the factory"):
        check_rollout_config(load_config(None, [f"rollout.backend={__name__}:missing", "task.chat_template_kwargs={a: 1}"]))


class _SleepyLLM:
    """What VLLMGenerator calls on vLLM's LLM around sleep mode, recorded in order."""

    def __init__(self):
        self.calls = []

    def sleep(self, level):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tuple(tags)))

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))

    def collective_rpc(self, fn, args=(), kwargs=None):
        self.calls.append(("rpc",))
        return [False]  # no fast refresh: vLLM's own reload_weights path

    def generate(self, prompts, params, use_tqdm=False):
        self.calls.append(("generate",))
        return []


class _ExecutorSleep(_SleepyLLM):
    """vLLM 0.32's sleep bookkeeping (v1/executor/abstract.py, Executor.sleep / wake_up): `sleep` does nothing while
    "weights" sleeps, else every allocation ends asleep; `wake_up` wakes the tags named."""

    def __init__(self):
        super().__init__()
        self.sleeping: set[str] = set()

    def sleep(self, level):
        super().sleep(level)
        if "weights" not in self.sleeping:
            self.sleeping |= {"weights", "kv_cache"}

    def wake_up(self, tags=None):
        super().wake_up(tags)
        self.sleeping -= set(tags)


def test_a_half_awake_engine_goes_fully_back_to_sleep():
    """A push after a sleep wakes the weights alone; when no round follows before the learner trains again (a push due
    with the engine not generating, or an evaluation swap), the next sleep must release the weights too: skipping it
    because part of the engine still sleeps kept the weights on the GPU through the learner's step."""
    from asymre.rollout.vllm_engine import VLLMGenerator

    engine = VLLMGenerator.__new__(VLLMGenerator)
    engine.llm, engine.sleep_level, engine.asleep, engine.fast_refresh, engine.version = _ExecutorSleep(), 1, set(), None, 0
    engine.sleep()
    engine.load_weights([], 1)  # wakes the weights only
    assert engine.llm.sleeping == {"kv_cache"}
    engine.sleep()
    assert engine.llm.sleeping == {"weights", "kv_cache"} and engine.asleep == {"weights", "kv_cache"}
    calls = len(engine.llm.calls)
    engine.sleep()  # fully asleep: nothing more
    assert len(engine.llm.calls) == calls
    engine.asleep = engine.llm.sleeping = {"weights"}  # the cache awake beside sleeping weights: woken, then all asleep
    engine.sleep()
    assert engine.llm.sleeping == {"weights", "kv_cache"} and engine.llm.calls[-2:] == [("wake_up", ("weights",)), ("sleep", 1)]


def test_sleep_mode_wakes_the_weights_for_a_push_and_the_cache_for_a_round():
    """rollout.sleep_level: the engine sleeps while the learner trains; a push wakes only the weights (it fills them;
    the KV cache stays released), the next round wakes the cache and resets the prefix cache it dropped."""
    from asymre.rollout.base import SamplingSpec
    from asymre.rollout.vllm_engine import VLLMGenerator

    engine = VLLMGenerator.__new__(VLLMGenerator)
    engine.llm, engine.sleep_level, engine.asleep, engine.fast_refresh, engine.version = _SleepyLLM(), 1, set(), None, 0
    engine.tokenizer, engine.max_prompt_tokens, engine.chat_template_kwargs = None, 16, {}
    engine.sleep()
    engine.sleep()  # already asleep: nothing more
    engine.load_weights([], 1)
    engine.generate([], SamplingSpec(n=1, temperature=1.0, max_new_tokens=4, seed=0))
    assert engine.llm.calls == [("sleep", 1), ("wake_up", ("weights",)), ("rpc",), ("rpc",), ("wake_up", ("kv_cache",)),
                                ("reset_prefix_cache",), ("generate",)]
    assert engine.asleep == set() and engine.version == 1


@pytest.mark.parametrize("overrides, said", [
    (["rollout.sleep_level=1"], "rollout.sleep_level=1 frees a colocated vLLM engine's GPU memory"),
    (["rollout.sleep_level=2", "sync.interval=2", "buffer.max_staleness=1"], "rollout.sleep_level=2 drops the engine's weights"),
])
def test_sleep_mode_is_refused_where_it_cannot_work(overrides, said):
    """No sleep mode in vLLM on CPU (nor for workers or transformers engines); level 2 would lose the behaviour
    weights a lagging engine still generates with."""
    from asymre.config import ConfigError, load_config
    from asymre.rollout import check_rollout_config

    with pytest.raises(ConfigError, match=said):
        check_rollout_config(load_config("recipes/configs/smollm2_arithmetic_cpu.yaml", overrides))


def test_a_vllm_outside_the_checked_versions_is_refused_at_start_up(monkeypatch, model_path):
    """vllm>=0.10 admitted versions without the APIs the engine calls; the installed one is checked by its metadata,
    at start-up and again where the engine is built (a caller of make_generator may skip the config check)."""
    import asymre.rollout.vllm_engine as vllm_engine

    assert vllm_engine.check_vllm_version(vllm_engine.installed_vllm_version()) is None  # what `make install` put here
    monkeypatch.setattr(vllm_engine, "installed_vllm_version", lambda: "0.10.2")
    with pytest.raises(ConfigError, match=r"rollout.backend=vllm: vLLM 0.10.2 is installed, but asymre's vLLM engine was checked "
                                          r"against vLLM 0.32.x"):
        check_rollout_config(load_config("recipes/configs/smollm2_arithmetic_cpu.yaml", ["rollout.backend=vllm"]))
    with pytest.raises(RuntimeError, match=r"vLLM 0.10.2 is installed, .* install vllm==0.32.\*"):
        vllm_engine.VLLMGenerator(model_path)  # refused before vLLM is imported or the model loads
