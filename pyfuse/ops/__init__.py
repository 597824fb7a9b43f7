"""pyfuse's fused ops. `concrete_merge` is the one every merge goes through."""

from .concrete_merge import MODES, concrete_merge, sample_concrete_mask, sample_uniform

__all__ = ["MODES", "concrete_merge", "sample_concrete_mask", "sample_uniform"]
