"""pyfuse's fused ops. `concrete_merge` is the one every merge goes through; given `LoraFactors` it runs
`lora_concrete_merge`, the same merge with the task vectors kept factored."""

from .concrete_merge import DEFAULT_TEMPERATURE, MODES, concrete_merge, sample_concrete_mask, sample_uniform
from .factors import LoraFactors
from .lora_concrete_merge import lora_concrete_merge

__all__ = [
    "DEFAULT_TEMPERATURE", "MODES", "LoraFactors", "concrete_merge", "lora_concrete_merge", "sample_concrete_mask",
    "sample_uniform",
]
