"""Inference: generation backends (RAIN, PPO rollouts and evaluation build on these).

Light at import time; ``alignforge.inference.generate`` imports torch only when used.
"""

from alignforge.inference.generate import (
    GeneratedSequence,
    GenerationBackend,
    GenerationConfig,
    HFBackend,
)

__all__ = ["GeneratedSequence", "GenerationBackend", "GenerationConfig", "HFBackend"]
