"""The learner's GPU-memory estimate (asymre/sizing.py): the parameter count, what each sharding splits over the
ranks, the start-up warning, and docs/scaling.md's table (generated; it must equal a fresh rendering)."""

from __future__ import annotations

import difflib
import logging
from types import SimpleNamespace

import pytest
import torch

from asymre import sizing
from asymre.config import load_config
from asymre.sizing import KNOWN_MODELS, GiB, ModelShape, Sharding, estimate, model_config, warn_if_memory_short
from tests.recipe_utils import ROOT, load_recipe_module

QWEN = ROOT / "recipes" / "configs" / "qwen2.5_3b_math_1gpu.yaml"
CPU = ROOT / "recipes" / "configs" / "smollm2_arithmetic_cpu.yaml"


def _counted(model) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once


@pytest.mark.parametrize("tied", [True, False])
def test_parameter_count_equals_a_built_models(tied):
    """The meta-device count is the count of the model the config builds (tied embeddings once), and the decoder
    layers' share is theirs; if it failed, every estimate's weights, gradients and AdamW would be off."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                         vocab_size=300, tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    shape = ModelShape.from_config(config)
    assert shape.params == _counted(model)
    assert shape.layer_params == sum(p.numel() for p in model.model.layers.parameters())
    assert (shape.layers, shape.hidden, shape.intermediate, shape.kv_dim, shape.vocab) == (3, 64, 96, 2 * 16, 300)


def test_known_embedded_model_config_is_the_real_models():
    """KNOWN_MODELS' entry for the embedded model (what the doc and the estimate use without converting it) counts
    exactly the parameters of the real converted model, and its config.json agrees field by field."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from asymre.models import resolve_model

    path = resolve_model("smollm2-135m-instruct")
    real = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    known = model_config("smollm2-135m-instruct")
    assert ModelShape.from_config(known).params == _counted(real) == ModelShape.from_config(AutoConfig.from_pretrained(path)).params
    on_disk = AutoConfig.from_pretrained(path)
    _, fields = KNOWN_MODELS["smollm2-135m-instruct"]
    assert {k: getattr(on_disk, k) for k in fields} == fields


def test_shipped_hub_models_have_their_published_sizes():
    """Qwen2.5-3B (tied) and Llama-3.1-8B (untied): 3,085,938,688 and 8,030,261,248 parameters, as published."""
    assert ModelShape.from_config(model_config("Qwen/Qwen2.5-3B-Instruct")).params == 3_085_938_688
    assert ModelShape.from_config(model_config("meta-llama/Llama-3.1-8B-Instruct")).params == 8_030_261_248


SHAPE = ModelShape(params=1_000_000_000, layer_params=800_000_000, layers=10, hidden=1024, intermediate=4096, kv_dim=256, vocab=50_000)


def _learner(kind: str, ranks: int = 4):
    cfg = load_config(QWEN, ["rollout.mode=async", "rollout.num_workers=1", "rollout.devices=[7]", "eval.every=0", "eval.at_start=false",
                             "eval.at_end=false"])  # no generation on the learner's GPUs: the learner's parts alone
    return estimate(cfg, SHAPE, Sharding(kind, ranks, "bf16", (0, 1, 2, 3)), 80 * GiB)


def test_each_sharding_splits_its_parts_over_the_ranks():
    """ZeRO-2 splits master weights, gradients and AdamW but keeps the whole bf16 module; ZeRO-3 and FSDP split all
    four; DDP splits nothing and holds its gradients twice (the all-reduce buckets). If it failed, the table would
    call a recipe that fits too big, or one that does not fit, fine."""
    p = SHAPE.params
    single, ddp, zero2, zero3, fsdp = (_learner(k) for k in ("single", "ddp", "zero2", "zero3", "fsdp"))
    assert (single.master, single.grads, single.optimizer) == (4 * p, 4 * p, 8 * p)
    assert (ddp.master, ddp.grads, ddp.optimizer) == (4 * p, 8 * p, 8 * p)
    assert (zero2.weights, zero2.master, zero2.grads, zero2.optimizer) == (2 * p, p, p, 2 * p)
    assert (zero3.weights, zero3.master, zero3.grads, zero3.optimizer) == (p / 2, p, p, 2 * p)
    assert (fsdp.weights, fsdp.master, fsdp.grads, fsdp.optimizer) == (zero3.weights, p, p, 2 * p)
    assert _learner("zero3", ranks=8).optimizer == p  # the split follows the rank count
    # autocast over float32 weights holds bf16 casts of the LM head and (without checkpointing) every layer
    assert single.weights == 2 * SHAPE.vocab * SHAPE.hidden  # the Qwen recipe checkpoints its layers


@pytest.mark.parametrize("name, kind, ranks", [("single_gpu", "single", 1), ("multi_gpu_ddp", "ddp", 4), ("fsdp", "fsdp", 4),
                                               ("deepspeed_zero2", "zero2", 4), ("deepspeed_zero3", "zero3", 4)])
def test_shipped_accelerate_configs_read_as_their_sharding(name, kind, ranks):
    s = Sharding.from_yaml(ROOT / "recipes" / "accelerate" / f"{name}.yaml")
    assert (s.kind, s.ranks, s.mixed_precision) == (kind, ranks, "bf16")


def test_sharding_from_a_prepared_accelerators_state():
    """At run time the set-up comes from the Accelerator: DeepSpeed's ZeRO stage, FSDP's resharding."""
    def acc(distributed, **state):
        return SimpleNamespace(distributed_type=distributed, num_processes=4, mixed_precision="bf16", state=SimpleNamespace(**state))

    zero = lambda stage: SimpleNamespace(zero_stage=stage)  # noqa: E731
    assert Sharding.from_accelerator(acc("DistributedType.DEEPSPEED", deepspeed_plugin=zero(2))).kind == "zero2"
    assert Sharding.from_accelerator(acc("DistributedType.DEEPSPEED", deepspeed_plugin=zero(3))).kind == "zero3"
    assert Sharding.from_accelerator(acc("DistributedType.FSDP", fsdp_plugin=SimpleNamespace(reshard_after_forward=True))).kind == "fsdp"
    assert Sharding.from_accelerator(acc("DistributedType.FSDP", fsdp_plugin=SimpleNamespace(reshard_after_forward=False))).kind == "fsdp_grad_op"
    assert Sharding.from_accelerator(acc("DistributedType.MULTI_GPU")).kind == "ddp"


def test_colocated_vllm_takes_its_share_of_the_gpu_and_async_workers_sit_where_pinned():
    """Colocated, vLLM's share is rollout.gpu_memory_utilization x the GPU; async workers without rollout.devices all
    land on rank 0's GPU."""
    colocated = estimate(load_config(QWEN), SHAPE, Sharding("single", 1, "bf16"), 80 * GiB)
    assert colocated.engine == pytest.approx(0.25 * 80 * GiB)
    unpinned = load_config(QWEN, ["rollout.mode=async", "rollout.num_workers=2", "eval.every=0", "eval.at_start=false",
                                       "eval.at_end=false"])
    est = estimate(unpinned, SHAPE, Sharding("fsdp", 4, "bf16", (0, 1, 2, 3)), 80 * GiB)
    assert (est.rank, est.engine) == (0, pytest.approx(2 * 0.25 * 80 * GiB))
    assert sizing._rank_estimate(unpinned, SHAPE, Sharding("fsdp", 4, "bf16", (0, 1, 2, 3)), 80 * GiB, 1).engine == 0
    pinned = load_config(QWEN, ["rollout.mode=async", "rollout.num_workers=2", "rollout.devices=[1,5]", "eval.every=0",
                                "eval.at_start=false", "eval.at_end=false"])  # worker 0 on GPU 1 (learner rank 1), worker 1 on GPU 5
    est = estimate(pinned, SHAPE, Sharding("fsdp", 4, "bf16", (0, 1, 2, 3)), 80 * GiB)
    assert (est.rank, est.engine) == (1, pytest.approx(0.25 * 80 * GiB))


def _gpu_run(monkeypatch, gib: float):
    monkeypatch.setattr(sizing, "gpu_memory", lambda device: int(gib * GiB))
    accelerator = SimpleNamespace(device=torch.device("cuda", 0), distributed_type="DistributedType.NO", num_processes=1,
                                  mixed_precision="bf16", state=SimpleNamespace())
    return warn_if_memory_short(load_config(QWEN), "Qwen/Qwen2.5-3B-Instruct", accelerator)


def test_warning_when_the_estimate_exceeds_the_gpu(monkeypatch, caplog):
    """One warning line with the breakdown and the keys to change when the estimate exceeds the GPU's memory."""
    caplog.set_level(logging.INFO, logger="asymre")
    est = _gpu_run(monkeypatch, 40)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert est.total > 40 * GiB and len(warnings) == 1
    assert "more than its GPU's 40.0 GiB" in warnings[0] and "optimizer 23.0" in warnings[0]
    assert "learner.micro_batch_tokens" in warnings[0] and "rollout.gpu_memory_utilization" in warnings[0]


def test_no_warning_when_it_fits_and_nothing_off_a_gpu(monkeypatch, caplog):
    """The shipped 1-GPU recipe on an 80 GB card: an info line, no warning. On the CPU: nothing at all."""
    caplog.set_level(logging.INFO, logger="asymre")
    est = _gpu_run(monkeypatch, sizing.CARD_80GB / GiB)
    assert est.total <= sizing.CARD_80GB
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("learner memory: rank 0 needs about" in r.getMessage() for r in caplog.records)
    caplog.clear()
    monkeypatch.undo()
    cpu = SimpleNamespace(device=torch.device("cpu"))
    assert warn_if_memory_short(load_config(CPU), "smollm2-135m-instruct", cpu) is None
    assert not [r for r in caplog.records if r.levelno >= logging.INFO]


def test_the_recipe_warns_before_the_model_loads(monkeypatch, caplog, tmp_path):
    """recipes/train.py's setup estimates before the learner loads the model (here the learner is never built)."""
    mod = load_recipe_module()
    monkeypatch.setattr(sizing, "gpu_memory", lambda device: GiB)

    class Loaded(Exception):
        pass

    def learner(*args, **kwargs):
        raise Loaded

    monkeypatch.setitem(mod.AsymRERecipe.setup.__globals__, "Learner", learner)
    caplog.set_level(logging.INFO, logger="asymre")
    recipe = mod.AsymRERecipe(load_config(CPU, [f"logging.run_dir={tmp_path / 'run'}"]))
    try:
        with pytest.raises(Loaded):
            recipe.setup()
    finally:
        recipe.cleanup()
    assert any(r.levelno == logging.WARNING and "learner memory" in r.getMessage() for r in caplog.records)


def test_every_shipped_gpu_launch_fits_an_80gb_card():
    """What docs/scaling.md promises: each GPU launch line in recipes/ fits; the two it names as not fitting do not."""
    launches = sizing.gpu_launches()
    assert ("recipes/configs/qwen2.5_3b_math_1gpu.yaml", "recipes/accelerate/single_gpu.yaml", ()) in launches
    assert ("recipes/configs/llama3.1_8b_math_8gpu.yaml", "recipes/accelerate/fsdp.yaml", ()) in launches
    for config, acc, overrides in launches + sizing.COMPARISONS:
        cfg = load_config(ROOT / config, list(overrides))
        est = estimate(cfg, ModelShape.from_config(model_config(cfg.model.name)), Sharding.from_yaml(ROOT / acc), sizing.CARD_80GB)
        fits = est.total <= sizing.CARD_80GB
        assert fits == ((config, acc, overrides) not in sizing.COMPARISONS), (config, acc, est.breakdown())


def test_docs_scaling_md_table_is_current():
    """docs/scaling.md's table is generated; when this fails, regenerate it: python -m asymre.sizing --write (or make docs)."""
    text = sizing.DOC.read_text()
    have = text.split(sizing.BEGIN + "\n", 1)[1].split(sizing.END, 1)[0]
    want = sizing.markdown()
    if have != want:
        diff = "".join(list(difflib.unified_diff(have.splitlines(True), want.splitlines(True), "docs/scaling.md", "markdown()"))[:40])
        pytest.fail(f"docs/scaling.md's table is out of date with asymre/sizing.py; run python -m asymre.sizing --write\n{diff}")
