"""Config: YAML + dotted overrides into one typed tree; every bad key or type is named in the error."""

from pathlib import Path

import pytest

from asymre.config import Config, ConfigError, describe, load_config

CONFIGS = sorted(Path(__file__).parent.parent.glob("recipes/configs/*.yaml"))


def test_defaults_follow_the_paper():
    """If these break, the defaults drifted from the paper (delta_V = -0.1, G = 8, 16 prompts, N = 250, lr 6e-8)."""
    cfg = load_config()
    assert cfg.loss.delta_v == -0.1 and cfg.loss.baseline == "group_mean" and cfg.loss.name == "asymre"
    assert cfg.rollout.group_size == 8 and cfg.rollout.prompts_per_step == 16
    assert cfg.sync.interval == 250 and cfg.learner.lr == 6e-8


def test_yaml_and_overrides_merge(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("learner:\n  lr: 1.0e-5\nrollout:\n  group_size: 4\n")
    cfg = load_config(f, ["learner.lr=2e-5", "loss.delta_v=-0.2", "task.operations=[+,-]"])
    assert cfg.learner.lr == 2e-5  # override beats file
    assert cfg.rollout.group_size == 4  # file beats default
    assert cfg.loss.delta_v == -0.2 and cfg.task.operations == ["+", "-"]
    assert cfg.logging.run_dir == "runs/asymre"  # interpolation resolved


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["learner.lrr=1"], "learner.lrr"),
        (["nosuch.section=1"], "nosuch"),
        (["learner.steps=many"], "learner.steps"),
        (["loss.baseline=median"], "loss.baseline"),
        (["rollout.group_size=0"], "rollout.group_size"),
        (["reward.weights=[1,2]"], "reward.weights"),
        (["sync.interval=8", "buffer.max_staleness=3"], "buffer.max_staleness"),
        (["rollout.backend=tensorrt"], "rollout.backend"),
        (["buffer.capacity=4", "learner.groups_per_step=8"], "buffer.capacity"),
        (["checkpoint.keep_last=0"], "checkpoint.keep_last"),
        (["sync.timeout_s=0"], "sync.timeout_s"),
    ],
)
def test_bad_override_names_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, overrides)


def test_bad_yaml_key_names_key_and_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("buffer:\n  max_stalenes: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert "buffer.max_stalenes" in str(e.value) and "bad.yaml" in str(e.value)


def test_override_without_equals_is_explained():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["learner.lr"])


def test_every_field_has_help():
    rows = describe(Config)
    assert len(rows) > 50
    missing = [r.key for r in rows if not r.help]
    assert not missing, f"fields without help: {missing}"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load(path):
    """Every shipped config validates, and is headed by its launch command (STYLE.md)."""
    load_config(path)
    head = path.read_text().splitlines()[:3]
    assert any("accelerate launch" in line for line in head if line.startswith("#")), head


@pytest.mark.parametrize("value, want", [("on", "on"), ("off", "off"), ("auto", "auto"), ("true", "on"), ("false", "off")])
def test_shared_prompt_on_off_survive_yaml_booleans(value, want):
    assert load_config(None, [f"learner.shared_prompt={value}"]).learner.shared_prompt == want


def test_a_far_server_cannot_join_a_weight_channel_listening_on_loopback():
    """sync.method=broadcast to a server on another machine: the server's worker connects to sync.channel_host, which
    loopback would never let it reach; a loopback server, or a channel host on the network, is fine."""
    far = ["rollout.mode=async", "sync.method=broadcast", "rollout.server_urls=[http://10.0.0.5:8000]"]
    with pytest.raises(ConfigError, match=r"server http://10\.0\.0\.5:8000 .* sync\.channel_host=127\.0\.0\.1"):
        load_config(None, far)
    assert load_config(None, [*far, "sync.channel_host=10.0.0.1"]).sync.channel_host == "10.0.0.1"
    for near in ("http://localhost:8000", "https://127.0.0.1:8000"):
        assert load_config(None, [*far[:2], f"rollout.server_urls=[{near}]"]).rollout.server_urls == [near]
    with pytest.raises(ConfigError, match="sync.method=broadcast .* rollout.mode=async"):
        load_config(None, ["sync.method=broadcast", "rollout.mode=colocated"])
