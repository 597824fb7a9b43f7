"""`pyfuse.merge`: merges of whole models, in memory or streamed from and to safetensors.

The engine lives in `pyfuse.engine` (plan, read, write, distributed, run); this module keeps every name it has
always exported importable from here.
"""

from .engine import (
    CHUNK_ELEMENTS,
    DEFAULT_SHARD_SIZE,
    REPORT_NAME,
    MergePlan,
    merge,
    merge_to_dir,
    parse_dtype,
    plan_merge,
    rss_anon_bytes,
)

__all__ = ["MergePlan", "merge", "merge_to_dir", "parse_dtype", "plan_merge", "rss_anon_bytes"]
__all__ += ["CHUNK_ELEMENTS", "DEFAULT_SHARD_SIZE", "REPORT_NAME"]
