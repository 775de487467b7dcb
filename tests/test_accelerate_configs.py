"""configs/accelerate/*.yaml load with accelerate's own config loader and use only keys it knows."""

from pathlib import Path

import pytest

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"


def _launch_options() -> set[str]:
    """Every option ``accelerate launch`` accepts (its argparse destinations)."""
    from accelerate.commands.launch import launch_command_parser

    return {a.dest for a in launch_command_parser()._actions}


@pytest.mark.parametrize(
    "name, kind, section",
    [
        ("ddp.yaml", "MULTI_GPU", None),
        ("fsdp.yaml", "FSDP", "fsdp_config"),
        ("zero2.yaml", "DEEPSPEED", "deepspeed_config"),
        ("zero3.yaml", "DEEPSPEED", "deepspeed_config"),
    ],
)
def test_config_parses_and_names_its_distributed_type(name, kind, section):
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.utils import DistributedType

    cfg = ClusterConfig.from_yaml_file(str(CONFIGS / name))  # raises on a key ClusterConfig does not know
    assert cfg.distributed_type == DistributedType[kind]
    assert cfg.mixed_precision == "no"  # the run's train.precision decides
    # accelerate launch copies the nested keys onto its arguments without checking them: a typo would be
    # silently ignored, so check each against the options it has
    options = _launch_options()
    nested = getattr(cfg, section) if section else {}
    unknown = [k for k in nested if k not in options]
    assert not unknown, f"{name}: {section} keys accelerate launch does not know: {unknown}"
    if section == "fsdp_config":
        assert nested["fsdp_version"] == 2
        assert nested["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        assert nested["fsdp_transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer"
        assert nested["fsdp_reshard_after_forward"] is True  # full shard
        assert nested["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
    if section == "deepspeed_config":
        assert nested["zero_stage"] == int(name[4])


def test_the_fsdp_wrap_class_is_the_tiny_llama_decoder_layer(tiny_model_dir):
    """The class name fsdp.yaml wraps exists in the (Llama-family) models the tests train."""
    import yaml
    from transformers import AutoModelForCausalLM

    name = yaml.safe_load((CONFIGS / "fsdp.yaml").read_text())["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"]
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    assert name in {type(m).__name__ for m in model.modules()}
    assert name in model._no_split_modules
