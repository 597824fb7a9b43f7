"""pyfuse: merge fine-tuned models into one multi-task model with Concrete subspace learning."""

from . import ops
from .layout import FlatLayout
from .taskvectors import TaskVectors

__all__ = ["FlatLayout", "TaskVectors", "ops"]
__version__ = "0.1.0"
