"""The Triton backend's phase functions (see `pyfuse.ops.reference`): the dense op's kernels, which the factored
op shares for its mask, and the factored op's two own phases."""

from .concrete_merge import backward_accumulate, backward_logits, mask_sums, merge_apply, uniform
from .lora_concrete_merge import lora_backward_accumulate, lora_merge_apply

__all__ = ["backward_accumulate", "backward_logits", "lora_backward_accumulate", "lora_merge_apply", "mask_sums",
           "merge_apply", "uniform"]
