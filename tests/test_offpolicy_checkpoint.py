"""Off-policy checkpoints, in the fast tier: between two weight pushes (sync.interval = 3) the engine lags the
learner, so a checkpoint must keep the weights the engine holds (the behaviour policy mu), not the learner's,
with the groups left in the buffer and the running baseline; resuming gives the engine exactly those weights
back. The whole recipe runs in this process on a tiny model, with a generation backend that records every
push (no engine start, no model download); the SIGKILL test in test_resume.py checks the same run bit for bit
with a real model."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from asymre.config import load_config
from asymre.models import load_tokenizer
from asymre.tracking import read_metrics
from tests.fakes import SlowGenerator
from tests.recipe_utils import load_recipe_module


class RecordingGenerator(SlowGenerator):
    """Answers like SlowGenerator (no sleep) and keeps a copy of every weight push it gets: LOADS[i] is the
    i-th engine's list of (version, weights)."""

    LOADS: list[list[tuple[int, dict]]] = []

    def __init__(self, model_path, dtype="float32", seed=0):
        super().__init__(model_path, dtype, seed)
        self.sleep = 0.0
        self.loads: list[tuple[int, dict]] = []
        RecordingGenerator.LOADS.append(self.loads)

    def load_weights(self, weights, version):
        weights = {k: v.detach().clone() for k, v in weights}
        self.loads.append((version, weights))
        super().load_weights(iter(weights.items()), version)


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory, model_path):
    """A two-layer Llama with the embedded model's tokenizer (and vocabulary size), saved as a model folder."""
    path = tmp_path_factory.mktemp("tiny_llm")
    tok = load_tokenizer(model_path)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=1, max_position_embeddings=256, tie_word_embeddings=True)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _run(cfg):
    recipe = load_recipe_module().AsymRERecipe(cfg)
    recipe.setup()
    try:
        recipe.train()
    finally:
        recipe.cleanup()
    return recipe


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_between_pushes_keeps_the_engines_weights_and_resume_gives_them_back(tiny_llm, tmp_path):
    RecordingGenerator.LOADS.clear()
    run = tmp_path / "run"
    args = [f"model.name={tiny_llm}", f"rollout.backend={__name__}:RecordingGenerator", "sync.interval=3", "buffer.max_staleness=2",
            "checkpoint.every=2", "checkpoint.keep_last=3", "rollout.prompts_per_step=3", "learner.groups_per_step=2",
            "rollout.group_size=2", "loss.baseline=running", "learner.lr=1e-2", "learner.warmup_steps=0", "eval.at_start=false",
            "eval.at_end=false", "checkpoint.save_final_model=false", "logging.progress=false", f"logging.run_dir={run}"]
    _run(load_config(None, [*args, "learner.steps=4"]))
    (first,) = RecordingGenerator.LOADS
    # one push after step 3 (the engine served steps 1-3 with the initial weights), then the final policy for the
    # final evaluation, after the final checkpoint was written
    assert [v for v, _ in first] == [3, 4]
    rows = [r for r in read_metrics(run) if "loss/value" in r]
    # staleness from the versions the engine put on its groups: v0 samples at learner steps 0, 1, 2, then v3 ones
    assert [r["rollout/staleness_max"] for r in rows] == [0, 1, 2, 0]
    initial = load_file(str(tiny_llm / "model.safetensors"))
    ck = run / "checkpoints"
    for step, engine_weights, version in ((2, initial, 0), (4, first[0][1], 3)):
        state = json.loads((ck / f"step-{step:06d}" / "trainer_state.json").read_text())
        assert state["learner_step"] == step and state["engine_version"] == version
        behaviour = load_file(str(ck / f"step-{step:06d}" / "behaviour" / "model.safetensors"))
        learner = load_file(str(next((ck / f"step-{step:06d}" / "accelerate").glob("model*.safetensors"))))
        assert all(torch.equal(behaviour[k], engine_weights[k]) for k in engine_weights), f"step {step}: not the engine's weights"
        assert not torch.equal(behaviour["model.norm.weight"], learner["model.norm.weight"])  # the learner has moved on
        assert state["buffer"]["groups"] and state["running_baseline"]["estimates"]  # leftovers and estimates travel too
    saved = json.loads((ck / "step-000004" / "trainer_state.json").read_text())

    recipe = load_recipe_module().AsymRERecipe(load_config(None, [*args, "learner.steps=6", "resume=auto"]))
    recipe.setup()
    try:
        (version, weights), = RecordingGenerator.LOADS[1]  # the resumed engine got mu back, tagged with its version
        assert version == 3 and _same(weights, first[0][1])
        assert [g.to_dict() for g in recipe.rollout.buffer.groups] == saved["buffer"]["groups"]
        assert recipe.learner.running.estimates == saved["running_baseline"]["estimates"]
        assert recipe.rollout.rounds == saved["rounds"] and recipe.learner.step == 4
        recipe.train()
    finally:
        recipe.cleanup()
    assert [v for v, _ in RecordingGenerator.LOADS[1]] == [3, 6]
