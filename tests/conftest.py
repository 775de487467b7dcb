import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama + ChatML BPE tokenizer in HF format (built once per session)."""
    from alignforge.models.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    p = SHARED / "data"
    if not p.exists():
        pytest.skip("../shared/data is not present")
    return p


@pytest.fixture(scope="session")
def tiny_rm_dir(tmp_path_factory, tiny_model_dir, tiny_tokenizer):
    """A tiny reward model on the tiny Llama, its score head spread (std 5) so that scores differ."""
    import torch

    from alignforge.models.reward import RewardModel, load_reward_backbone, save_reward_model

    torch.manual_seed(0)
    rm = RewardModel(load_reward_backbone(str(tiny_model_dir)))
    with torch.no_grad():
        rm.model.score.weight.normal_(std=5.0)
    return save_reward_model(rm, tiny_tokenizer, tmp_path_factory.mktemp("rm") / "rm", {"mean": 0.0, "std": 1.0})
