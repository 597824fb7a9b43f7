"""Reading models lazily, one tensor at a time, and writing merged checkpoints, all or nothing."""

from .sources import TensorSource, checkpoint_files, open_source
from .writer import ShardedWriter

__all__ = ["ShardedWriter", "TensorSource", "checkpoint_files", "open_source"]
