"""Reading models lazily, one tensor at a time, from state dicts, modules and safetensors files."""

from .sources import TensorSource, open_source

__all__ = ["TensorSource", "open_source"]
