"""Learner: length-bucketed micro-batches with accumulation give the full-batch gradient; the left-padded,
logits_to_keep forward gives the same log-probs as a plain per-sequence forward; a step moves the
policy the way the advantages say. A tiny randomly initialised Llama keeps these fast."""

import pytest
import torch
from accelerate import Accelerator
from transformers import LlamaConfig, LlamaForCausalLM

from asymre.config import load_config
from asymre.data import Prompt, Trajectory, TrajectoryGroup
from asymre.forward import bucket_by_length, collate_rows
from asymre.learner import Learner
from asymre.loss import token_logprobs


@pytest.fixture(scope="module")
def tiny_model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return str(path)


def _groups(seed: int = 0, n_groups: int = 3, g: int = 4) -> list[TrajectoryGroup]:
    rng = torch.Generator().manual_seed(seed)
    out = []
    for gi in range(n_groups):
        prompt = torch.randint(1, 64, (int(torch.randint(3, 9, (1,), generator=rng)),), generator=rng).tolist()
        trajs = []
        for _ in range(g):
            comp = torch.randint(1, 64, (int(torch.randint(1, 7, (1,), generator=rng)),), generator=rng).tolist()
            trajs.append(Trajectory(comp, "", "stop", logprobs=[-1.0] * len(comp),
                                    reward=float(torch.randint(0, 2, (1,), generator=rng))))
        out.append(TrajectoryGroup(Prompt(f"p{gi}", [{"role": "user", "content": "q"}]), prompt, trajs, 0))
    return out


def _learner(path, **over):
    overrides = [f"{k}={v}" for k, v in over.items()]
    cfg = load_config(None, ["learner.lr=1e-2", "learner.max_grad_norm=0", *overrides])
    return Learner(cfg, path, Accelerator(cpu=True))


def test_bucket_by_length_respects_budget():
    lengths = [5, 30, 7, 12, 6, 40]
    batches = bucket_by_length(lengths, token_budget=30)
    assert sorted(i for b in batches for i in b) == list(range(6))
    for b in batches:
        assert len(b) == 1 or max(lengths[i] for i in b) * len(b) <= 30
    assert [lengths[i] for b in batches for i in b] == sorted(lengths)  # sorted: little padding


def test_left_padded_keep_forward_matches_plain_forward(tiny_model_path):
    """If position ids or the logits_to_keep slice were off, log-probs of completions would be wrong."""
    learner = _learner(tiny_model_path)
    batch = learner.build_batch(_groups())
    idx = list(range(len(batch.seqs)))
    ids, attn, pos, labels, mask, _, keep = collate_rows(batch, idx, learner.pad_id, "cpu")
    with torch.no_grad():
        out = learner.model(input_ids=ids, attention_mask=attn, position_ids=pos, logits_to_keep=keep + 1)
        got = token_logprobs(out.logits[:, :-1], labels)
        for row, i in enumerate(idx):
            s = torch.tensor([batch.seqs[i]])
            c = batch.completion_lens[i]
            ref = token_logprobs(learner.model(input_ids=s).logits[:, :-1], s[:, 1:])[0, -c:]
            assert torch.allclose(got[row, keep - c:], ref, atol=1e-5)
            assert mask[row].sum().item() == c


@pytest.mark.parametrize("loss", ["asymre", "grpo", "reinforce"])
@pytest.mark.parametrize("aggregation", ["seq_mean", "token_mean"])
def test_micro_batching_equals_full_batch_gradient(tiny_model_path, loss, aggregation):
    grads = []
    for budget in (100000, 16):
        torch.manual_seed(0)
        learner = _learner(tiny_model_path, **{"loss.name": loss, "loss.aggregation": aggregation, "learner.micro_batch_tokens": budget})
        batch = learner.build_batch(_groups())
        norm = len(batch.seqs) if aggregation == "seq_mean" else sum(batch.completion_lens)
        micro = bucket_by_length([len(s) for s in batch.seqs], budget)
        for idx in micro:
            loss_mb, _ = learner._micro_loss(batch, idx, norm)
            loss_mb.backward()
        grads.append((len(micro), torch.cat([p.grad.flatten() for p in learner.model.parameters() if p.grad is not None])))
    assert grads[0][0] == 1 and grads[1][0] > 2
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-6)


def test_step_raises_logprob_of_rewarded_completion(tiny_model_path):
    """A rewarded completion's log-prob goes up, an unrewarded one's down (AsymRE, group-mean baseline)."""
    prompt = [5, 6, 7]
    good, bad = [10, 11], [20, 21]
    trajs = [Trajectory(good, "", "stop", reward=1.0), Trajectory(bad, "", "stop", reward=0.0)]
    groups = [TrajectoryGroup(Prompt("p", [{"role": "user", "content": "q"}]), prompt, trajs, 0)]
    learner = _learner(tiny_model_path, **{"learner.lr": 1e-2})

    def lp(comp):
        s = torch.tensor([prompt + comp])
        with torch.no_grad():
            return token_logprobs(learner.model(input_ids=s).logits[:, :-1], s[:, 1:])[0, -len(comp):].sum().item()

    before = lp(good), lp(bad)
    m = learner.train_step(groups)
    after = lp(good), lp(bad)
    assert after[0] > before[0] and after[1] < before[1]
    assert learner.step == 1 and m["loss/frac_positive"] == 0.5 and m["learner/trajectories"] == 2
    assert m["loss/baseline_mean"] == pytest.approx(0.5 - 0.1)  # V = group mean + delta_V


def test_dropped_samples_are_skipped_and_all_dropped_is_an_error(tiny_model_path):
    learner = _learner(tiny_model_path)
    groups = _groups()
    for t in groups[0].trajectories:
        t.reward = None
    batch = learner.build_batch(groups)
    assert len(batch.seqs) == 8
    for g in groups:
        for t in g.trajectories:
            t.reward = None
    with pytest.raises(ValueError, match="no scored trajectories"):
        learner.build_batch(groups)


def test_grpo_without_behaviour_logprobs_is_an_error(tiny_model_path):
    learner = _learner(tiny_model_path, **{"loss.name": "grpo"})
    groups = _groups()
    groups[1].trajectories[0].logprobs = None
    with pytest.raises(ValueError, match="behaviour log-probs"):
        learner.build_batch(groups)


# ---- the learner's baselines and its step's gradient, written out by hand (mutations: delta_V sign, one group
# ---- for the whole step, no normaliser in train_step) ------------------------------------------------------

def _hand_groups():
    """Three groups of different sizes; group 1 is a singleton, group 2 has a dropped (unscored) sample."""
    spec = [(["p0", [3, 4, 5]], [([6, 7], 1.0), ([8], 0.0), ([9, 10, 11], 1.0)]),
            (["p1", [12, 13]], [([14, 15], 0.5)]),
            (["p2", [16, 17, 18, 19]], [([20], 0.0), ([21, 22], 1.0), ([23], None), ([24, 25, 26], 0.0)])]
    return [TrajectoryGroup(Prompt(uid, [{"role": "user", "content": "q"}]), list(pid),
                            [Trajectory(comp, "", "stop", reward=r) for comp, r in trajs], 0)
            for (uid, pid), trajs in spec]


def _expected_baselines(groups, baseline: str, dv: float, constant: float = 0.3) -> list[float]:
    out = []
    for g in groups:
        rs = [t.reward for t in g.trajectories if t.reward is not None]
        for i, r in enumerate(rs):
            others = rs[:i] + rs[i + 1:]
            v_hat = {"group_mean": sum(rs) / len(rs), "constant": constant,
                     "leave_one_out": sum(others) / len(others) if others else r}[baseline]
            out.append(v_hat + dv)
    return out


@pytest.mark.parametrize("baseline", ["group_mean", "leave_one_out", "constant"])
@pytest.mark.parametrize("dv", [-0.1, 0.2])
def test_step_baselines_written_out_by_hand(tiny_model_path, baseline, dv):
    """V per sample = the baseline of its own group (never the whole step's) + delta_V with its sign."""
    learner = _learner(tiny_model_path, **{"loss.baseline": baseline, "loss.delta_v": dv, "loss.constant_v": 0.3})
    groups = _hand_groups()
    batch = learner.build_batch(groups)
    assert batch.refs == [(0, 0), (0, 1), (0, 2), (1, 0), (2, 0), (2, 1), (2, 3)]
    assert batch.rewards.tolist() == [1.0, 0.0, 1.0, 0.5, 0.0, 1.0, 0.0]
    assert batch.baseline.tolist() == pytest.approx(_expected_baselines(groups, baseline, dv))
    assert batch.advantages.tolist() == pytest.approx([r - v for r, v in zip(batch.rewards.tolist(), _expected_baselines(groups, baseline, dv))])


def test_step_advantages_of_grpo_and_reinforce_written_out_by_hand(tiny_model_path):
    """GRPO: (r - group mean) / (group std + 1e-4) within each group, no baseline logged; REINFORCE: A = r, V = 0."""
    groups = _hand_groups()
    grpo = _learner(tiny_model_path, **{"loss.name": "grpo"})
    for g in groups:
        for t in g.trajectories:
            t.logprobs = [-1.0] * len(t.completion_ids)
    batch = grpo.build_batch(groups)
    want = []
    for g in groups:
        rs = [t.reward for t in g.trajectories if t.reward is not None]
        mean = sum(rs) / len(rs)
        std = (sum((r - mean) ** 2 for r in rs) / len(rs)) ** 0.5
        want += [(r - mean) / (std + 1e-4) for r in rs]
    assert batch.advantages.tolist() == pytest.approx(want) and batch.baseline is None and batch.old_logps is not None
    m = grpo.train_step(groups)
    assert "loss/baseline_mean" not in m and "loss/clip_frac" in m
    reinforce = _learner(tiny_model_path, **{"loss.name": "reinforce"})
    batch = reinforce.build_batch(groups)
    assert batch.advantages.tolist() == batch.rewards.tolist() == [1.0, 0.0, 1.0, 0.5, 0.0, 1.0, 0.0]
    assert batch.baseline.tolist() == [0.0] * 7 and batch.old_logps is None
    m = reinforce.train_step(groups)
    assert m["loss/baseline_mean"] == 0.0 and m["loss/advantage_mean"] == pytest.approx(3.5 / 7) and "loss/clip_frac" not in m


def test_unknown_loss_name_is_an_error_at_start(tiny_model_path):
    cfg = load_config(None, [])
    cfg.loss.name = "ppo"  # past config validation, which refuses it too
    with pytest.raises(ValueError, match="unknown loss.name 'ppo'"):
        Learner(cfg, tiny_model_path, Accelerator(cpu=True))


@pytest.mark.parametrize("aggregation", ["seq_mean", "token_mean"])
def test_train_step_gradient_is_the_whole_batch_loss_gradient(tiny_model_path, aggregation):
    """One train_step over several micro-batches must apply the gradient of
    -(1/N) sum_i (r_i - V_i) sum_t log pi(y_it), N = samples (seq_mean) or completion tokens (token_mean),
    computed here from one plain forward per sequence."""
    groups = _hand_groups()
    learner = _learner(tiny_model_path, **{"loss.aggregation": aggregation, "learner.micro_batch_tokens": 8})
    captured = {}
    real_step = learner.optimizer.step

    def capture(*a, **k):
        captured["grads"] = [p.grad.detach().clone() for p in learner.model.parameters()]
        return real_step(*a, **k)

    learner.optimizer.step = capture
    learner.pad_id = 0
    metrics = learner.train_step(groups)
    assert metrics["learner/micro_batches"] > 2  # the budget really splits the step

    ref = _learner(tiny_model_path, **{"loss.aggregation": aggregation})  # the same initial weights
    scored = [(g.prompt_ids, t) for g in groups for t in g.trajectories if t.reward is not None]
    baselines = _expected_baselines(groups, "group_mean", -0.1)
    total = torch.zeros(())
    for (prompt_ids, t), v in zip(scored, baselines):
        seq = torch.tensor([prompt_ids + t.completion_ids])
        logp = token_logprobs(ref.model(input_ids=seq).logits[:, :-1], seq[:, 1:])[0, -len(t.completion_ids):]
        total = total - (t.reward - v) * logp.sum()
    n = len(scored) if aggregation == "seq_mean" else sum(len(t.completion_ids) for _, t in scored)
    (total / n).backward()
    want = [p.grad for p in ref.model.parameters()]
    assert all(torch.allclose(g, w, atol=1e-6) for g, w in zip(captured["grads"], want))


def test_weight_push_is_due_every_interval_steps():
    from asymre.sync import WeightSync

    sync = WeightSync(interval=3, method="inprocess", timeout_s=1.0, folder="/tmp/unused")
    assert [s for s in range(0, 10) if sync.due(s)] == [3, 6, 9]
    assert [s for s in range(0, 4) if WeightSync(1, "inprocess", 1.0, "/tmp/unused").due(s)] == [1, 2, 3]


def test_bf16_learner_keeps_float32_master_weights_and_learns_at_the_papers_lr(tiny_model_path):
    """model.dtype=bfloat16 at lr 6e-8 (the paper's): updates must land. Stepping AdamW on bf16 parameters loses
    almost all of them below bf16's resolution; float32 master weights with bf16 compute keep them."""
    learner = _learner(tiny_model_path, **{"model.dtype": "bfloat16", "learner.lr": 6e-8, "learner.warmup_steps": 0})
    name = "model.layers.0.mlp.down_proj.weight"
    before = learner.unwrapped().state_dict()[name].clone()
    assert before.dtype == torch.float32 and learner.compute_dtype == torch.bfloat16
    seen = []
    hook = learner.unwrapped().model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    for seed in range(3):
        learner.train_step(_groups(seed))
    hook.remove()
    changed = (learner.unwrapped().state_dict()[name] != before).float().mean().item()
    assert changed >= 0.9, changed
    assert set(seen) == {torch.bfloat16}  # the forward computed in bf16


def test_float16_without_accelerate_fp16_is_refused(tiny_model_path):
    from asymre.config import ConfigError

    with pytest.raises(ConfigError, match="mixed_precision: fp16"):
        _learner(tiny_model_path, **{"model.dtype": "float16"})


@pytest.mark.parametrize("loss, aggregation", [("asymre", "seq_mean"), ("asymre", "token_mean"), ("grpo", "seq_mean")])
def test_shared_prompt_gradient_equals_one_row_per_sample(tiny_model_path, loss, aggregation):
    """learner.shared_prompt=on (each group's prompt computed once, its completions attending to its KV cache)
    gives the gradient of the unshared path (each sample its own prompt + completion row), to 1e-4 relative, on
    groups of different prompt and completion lengths split over several micro-batches."""
    grads, metrics = {}, {}
    for shared in ("on", "off"):
        learner = _learner(tiny_model_path, **{"loss.name": loss, "loss.aggregation": aggregation, "learner.micro_batch_tokens": 40,
                                               "learner.shared_prompt": shared})
        assert learner.shared_prompt == (shared == "on")
        real_step = learner.optimizer.step

        def capture(*a, learner=learner, real_step=real_step, shared=shared, **k):
            grads[shared] = torch.cat([p.grad.detach().flatten() for p in learner.model.parameters()])
            return real_step(*a, **k)

        learner.optimizer.step = capture
        metrics[shared] = learner.train_step(_groups(seed=3, n_groups=5, g=3))
    assert metrics["on"]["learner/micro_batches"] >= 2
    assert torch.linalg.norm(grads["on"] - grads["off"]) <= 1e-4 * torch.linalg.norm(grads["off"])
    for key in ("loss/value", "loss/entropy", "loss/logprob_mean"):
        assert metrics["on"][key] == pytest.approx(metrics["off"][key], rel=1e-4, abs=1e-6), key


class _Plugin:
    """The two things `_configure_deepspeed` reads of accelerate's DeepSpeedPlugin."""

    def __init__(self, **ds):
        self.deepspeed_config = {"train_micro_batch_size_per_gpu": "auto", **ds}

    def is_auto(self, key):
        return self.deepspeed_config.get(key) == "auto"


@pytest.mark.parametrize("ds, error", [
    ({"gradient_accumulation_steps": 4, "gradient_clipping": 1.0}, "gradient_accumulation_steps=4: asymre accumulates"),
    ({"gradient_accumulation_steps": 1, "gradient_clipping": 0.5}, r"gradient_clipping=0.5 but learner.max_grad_norm=1"),
])
def test_deepspeed_settings_that_contradict_the_learner_are_refused(ds, error):
    from types import SimpleNamespace

    from asymre.config import ConfigError
    from asymre.learner import _configure_deepspeed

    cfg = load_config("recipes/configs/smollm2_arithmetic_cpu.yaml", [])
    with pytest.raises(ConfigError, match=error):
        _configure_deepspeed(cfg, SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=_Plugin(**ds))))


def test_deepspeed_auto_settings_are_filled_from_the_learner():
    """Without a dataloader accelerate cannot resolve an 'auto' micro-batch size; clipping follows learner.max_grad_norm."""
    from types import SimpleNamespace

    from asymre.learner import _configure_deepspeed

    cfg = load_config("recipes/configs/smollm2_arithmetic_cpu.yaml", ["learner.max_grad_norm=0.7"])
    plugin = _Plugin(gradient_accumulation_steps="auto", gradient_clipping="auto")
    _configure_deepspeed(cfg, SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin)))
    assert plugin.deepspeed_config["train_micro_batch_size_per_gpu"] == 1
    assert plugin.deepspeed_config["gradient_clipping"] == 0.7


def test_accelerate_bf16_mixed_precision_keeps_the_logits_in_bf16(tiny_model_path, monkeypatch):
    """Under Accelerate's native bf16 the forward still computes in bf16, but the logits reach the loss in bf16:
    accelerate's own wrapper would convert them to a float32 copy (twice the memory of the largest tensor)."""
    from accelerate.state import AcceleratorState

    import asymre.forward as learner_module

    cfg = load_config(None, ["learner.lr=1e-2", "learner.max_grad_norm=0", "model.dtype=bfloat16"])
    AcceleratorState._reset_state(reset_partial_state=True)  # the process-wide state would keep an earlier test's precision
    learner = Learner(cfg, tiny_model_path, Accelerator(cpu=True, mixed_precision="bf16"))
    assert learner.accelerator.native_amp
    seen, real = [], learner_module.token_logprobs_and_entropy
    monkeypatch.setattr(learner_module, "token_logprobs_and_entropy", lambda logits, labels: seen.append(logits.dtype) or real(logits, labels))
    name = "model.layers.0.mlp.down_proj.weight"
    before = learner.unwrapped().state_dict()[name].clone()
    learner.train_step(_groups(0))
    assert seen and set(seen) == {torch.bfloat16}
    assert learner.unwrapped().state_dict()[name].dtype == torch.float32
    assert (learner.unwrapped().state_dict()[name] != before).any()


def _episode_groups(seed: int = 5, n_groups: int = 4, g: int = 3) -> list[TrajectoryGroup]:
    """Groups of multi-turn episodes: completions that alternate the policy's tokens (mask 1) and inserted environment
    tokens (mask 0), of different lengths and turn counts, with behaviour log-probs (0.0 on the inserted tokens)."""
    rng = torch.Generator().manual_seed(seed)
    out = []
    for gi in range(n_groups):
        prompt = torch.randint(1, 64, (int(torch.randint(3, 8, (1,), generator=rng)),), generator=rng).tolist()
        trajs = []
        for _ in range(g):
            ids, mask = [], []
            for turn in range(int(torch.randint(1, 4, (1,), generator=rng))):
                if turn:  # a tool result between two model turns
                    k = int(torch.randint(1, 5, (1,), generator=rng))
                    ids += torch.randint(1, 64, (k,), generator=rng).tolist()
                    mask += [0] * k
                k = int(torch.randint(1, 5, (1,), generator=rng))
                ids += torch.randint(1, 64, (k,), generator=rng).tolist()
                mask += [1] * k
            lp = [-1.5 if m else 0.0 for m in mask]
            trajs.append(Trajectory(ids, "", "stop", logprobs=lp, reward=float(torch.randint(0, 2, (1,), generator=rng)), mask=mask))
        out.append(TrajectoryGroup(Prompt(f"e{gi}", [{"role": "user", "content": "q"}]), prompt, trajs, 0))
    return out


def _float64_episode_gradient(learner, groups, aggregation: str, train_inserted: bool = False) -> torch.Tensor:
    """The loss gradient computed independently of the learner's collation: a float64 copy of the model, one plain
    forward per sequence, -(1/N) sum_i A_i sum_t m_it log pi(y_it), m = the model-token mask (all ones when
    `train_inserted`), N = samples (seq_mean) or trained tokens (token_mean)."""
    import copy

    model = copy.deepcopy(learner.unwrapped()).double()
    model.zero_grad(set_to_none=True)
    batch = learner.build_batch(groups)
    total = torch.zeros((), dtype=torch.float64)
    n_tokens = 0
    for (gi, ti), a in zip(batch.refs, batch.advantages.double()):
        t = groups[gi].trajectories[ti]
        seq = torch.tensor([groups[gi].prompt_ids + t.completion_ids])
        logits = model(input_ids=seq).logits[:, :-1].double()
        logp = torch.log_softmax(logits, -1).gather(-1, seq[:, 1:, None])[0, -len(t.completion_ids):, 0]
        m = torch.ones(len(t.mask), dtype=torch.float64) if train_inserted else torch.tensor(t.mask, dtype=torch.float64)
        total = total - a * (m * logp).sum()
        n_tokens += int(m.sum())
    (total / (len(batch.refs) if aggregation == "seq_mean" else n_tokens)).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("shared", ["on", "off"])
@pytest.mark.parametrize("aggregation", ["seq_mean", "token_mean"])
def test_multi_turn_episode_gradient_trains_the_models_tokens_only(tiny_model_path, shared, aggregation):
    """Both loss paths give the float64 gradient of the policy's own tokens (environment tokens masked) to 1e-4, over
    several micro-batches; training the inserted tokens too gives a gradient far from the learner's."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # an earlier test's bf16 mixed precision would stay on
    learner = _learner(tiny_model_path, **{"loss.aggregation": aggregation, "learner.micro_batch_tokens": 40,
                                           "learner.shared_prompt": shared})
    groups = _episode_groups()
    want = _float64_episode_gradient(learner, groups, aggregation)
    wrong = _float64_episode_gradient(learner, groups, aggregation, train_inserted=True)
    captured = {}
    real_step = learner.optimizer.step

    def capture(*a, **k):
        captured["g"] = torch.cat([p.grad.detach().flatten() for p in learner.model.parameters()]).double()
        return real_step(*a, **k)

    learner.optimizer.step = capture
    metrics = learner.train_step(groups)
    assert metrics["learner/micro_batches"] >= 2
    got = captured["g"]
    assert torch.linalg.norm(got - want) <= 1e-4 * torch.linalg.norm(want)
    assert torch.linalg.norm(got - wrong) > 1e-2 * torch.linalg.norm(wrong)  # the mask really matters on this batch


def test_a_supervised_step_is_the_negative_log_likelihood_of_the_models_tokens(tiny_model_path):
    """The warm-start's step (asymre/warm_start.py): advantage 1 whatever the reward and loss.name (GRPO here, which
    would need behaviour log-probs), the loss the mean over demonstrations of their model tokens' summed NLL; the
    learner's version and LR schedule stay put."""
    learner = _learner(tiny_model_path, **{"loss.name": "grpo", "learner.lr_schedule": "linear", "learner.steps": 4})
    groups = _episode_groups(n_groups=3, g=1)
    for g in groups:
        for t in g.trajectories:
            t.reward, t.logprobs = 0.0, None  # a demonstration: no reward of its own, no behaviour log-probs
    batch = learner.build_batch(groups, supervised=True)
    assert batch.advantages.tolist() == [1.0] * 3 and batch.baseline.tolist() == [0.0] * 3
    with torch.no_grad():
        nll = 0.0
        for s, c, m in zip(batch.seqs, batch.completion_lens, batch.masks):
            x = torch.tensor([s])
            lp = token_logprobs(learner.unwrapped()(x).logits[:, :-1], x[:, 1:])[0, -c:]
            nll -= float((lp * torch.tensor(m, dtype=lp.dtype)).sum())
    lr = learner.scheduler.get_last_lr()[0]
    m = learner.train_step(groups, supervised=True)
    assert m["loss/value"] == pytest.approx(nll / 3, rel=1e-5)
    assert learner.step == 0 and learner.scheduler.get_last_lr()[0] == lr and learner.last_batch is None
    assert learner.optimizer_steps() == 1  # the weights did move
