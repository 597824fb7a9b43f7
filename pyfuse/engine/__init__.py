"""The merge engine, in rooms that say what they hold:

- `plan`: a merge checked from headers alone (inputs, the method's checks, the memory model, the dry-run summary);
- `read`: sources read a bounded chunk at a time on a pool of threads, and the merged tensors as chunks;
- `write`: the result gathered in memory, or streamed into shards with their index and committed atomically,
  with the report;
- `distributed`: each process's share of the work under torchrun;
- `run`: `merge` and `merge_to_dir`, a plan and then its run.

`pyfuse.merge` (the module) re-exports the public names from here, where they have always been importable.
"""

from ..memory import rss_anon_bytes
from .plan import MergePlan, parse_dtype, plan_merge
from .read import CHUNK_ELEMENTS
from .run import merge, merge_to_dir
from .write import DEFAULT_SHARD_SIZE, REPORT_NAME

__all__ = ["CHUNK_ELEMENTS", "DEFAULT_SHARD_SIZE", "REPORT_NAME", "MergePlan", "merge", "merge_to_dir", "parse_dtype",
           "plan_merge", "rss_anon_bytes"]
