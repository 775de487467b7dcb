import pytest

from alignforge.config import dump_config, load_config, valid_keys
from alignforge.errors import ConfigError
from alignforge.trainers.sft import SFTConfig


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_yaml_and_overrides_are_typed(tmp_path):
    p = write(tmp_path, "train:\n  lr: 1e-5\n  epochs: 3\ndata:\n  train_files: [a.jsonl]\n")
    cfg = load_config(
        SFTConfig,
        p,
        [
            "train.per_device_batch_size=8",
            "lora.enabled=true",
            "data.train_files=[x.jsonl, y.jsonl]",
            "data.max_prompt_length=null",
        ],
    )
    assert cfg.train.lr == 1e-5 and isinstance(cfg.train.lr, float)  # YAML reads "1e-5" as a string
    assert cfg.train.epochs == 3
    assert cfg.train.per_device_batch_size == 8
    assert cfg.lora.enabled is True
    assert cfg.data.train_files == ["x.jsonl", "y.jsonl"]
    assert cfg.data.max_prompt_length is None
    assert cfg.model.name_or_path == "embedded"  # default kept


def test_unknown_yaml_key_lists_valid_keys(tmp_path):
    p = write(tmp_path, "train:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(SFTConfig, p)
    msg = str(e.value)
    assert "unknown config key 'train.lrr'" in msg and str(p) in msg
    assert "train.lr," in msg and "train.epochs" in msg  # the keys of that section


def test_unknown_section_lists_all_keys(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'optim'.*model.name_or_path.*data.train_files"):
        load_config(SFTConfig, write(tmp_path, "optim: {}\n"))


def test_unknown_override_key(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'trian.lr'.*Valid keys: .*train.lr"):
        load_config(SFTConfig, None, ["trian.lr=1"])


@pytest.mark.parametrize(
    "item,frag",
    [
        ("train.lr=fast", "expected float"),
        ("train.epochs=1.5", "expected int"),
        ("train.scheduler=cubic", "'cosine' | 'linear' | 'constant'"),
        ("train.resume=maybe", "expected bool"),
        ("train.lr", "key=value"),
    ],
)
def test_bad_values(item, frag):
    with pytest.raises(ConfigError, match=frag.replace("|", r"\|").replace("'", "'")):
        load_config(SFTConfig, None, [item])


def test_bad_yaml_shapes(tmp_path):
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(SFTConfig, write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="section 'train' must be a mapping"):
        load_config(SFTConfig, write(tmp_path, "train: 3\n"))
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(SFTConfig, write(tmp_path, "train: [\n"))
    with pytest.raises(ConfigError, match="not found"):
        load_config(SFTConfig, tmp_path / "missing.yaml")


def test_roundtrip(tmp_path):
    cfg = load_config(SFTConfig, None, ["train.lr=3e-4", "data.train_files=a.jsonl"])
    dump_config(cfg, tmp_path / "out.yaml")
    again = load_config(SFTConfig, tmp_path / "out.yaml")
    assert again == cfg


def test_valid_keys_cover_sections():
    keys = valid_keys(SFTConfig)
    assert "model.name_or_path" in keys and "lora.r" in keys and "train.save_every" in keys


def test_shipped_configs_load():
    from pathlib import Path

    from alignforge.trainers.ppo import PPOConfig
    from alignforge.trainers.rm import RMConfig

    root = Path(__file__).parents[1] / "configs"
    for pattern, cls in (("sft*.yaml", SFTConfig), ("rm*.yaml", RMConfig), ("ppo*.yaml", PPOConfig)):
        files = list(root.glob(pattern))
        assert files, pattern
        for p in files:
            load_config(cls, p)


def test_a_trainer_section_default_survives_overrides_in_that_section(tmp_path):
    """RMConfig's data section defaults to max_length=512, overlong=truncate_prompt (DataConfig's own
    defaults are 1024 and truncate): naming data.train_files must not reset the others."""
    from alignforge.trainers.rm import RMConfig

    cfg = load_config(RMConfig, None, ["data.train_files=a.jsonl", "train.seed=3"])
    assert (cfg.data.max_length, cfg.data.overlong, cfg.data.train_files) == (512, "truncate_prompt", ["a.jsonl"])
    assert (cfg.train.output_dir, cfg.train.lr, cfg.train.seed) == ("outputs/rm", 1e-5, 3)
    p = tmp_path / "rm.yaml"
    p.write_text("data:\n  max_length: 64\n")
    cfg = load_config(RMConfig, p, ["data.overlong=truncate"])
    assert (cfg.data.max_length, cfg.data.overlong) == (64, "truncate")
