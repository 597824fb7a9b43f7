"""Task data: the paper's benchmarks (vision, GLUE) and the embedded offline text benchmark."""

from . import vision
from .embedded import EMBEDDED_TASKS, TextTask, load_embedded_tasks
from .glue import GLUE_TASKS, GlueDataNotFoundError, GlueSpec, glue_batches, glue_spec, glue_test_data, load_glue
from .vision import TASKS as VISION_TASKS
from .vision import DatasetUnavailableError, ImageBatches, VisionTaskSpec, class_names, get_spec, load_split

__all__ = [
    "EMBEDDED_TASKS", "GLUE_TASKS", "VISION_TASKS", "DatasetUnavailableError", "GlueDataNotFoundError", "GlueSpec",
    "ImageBatches", "TextTask", "VisionTaskSpec", "class_names", "get_spec", "glue_batches",
    "glue_spec", "glue_test_data", "load_embedded_tasks", "load_glue", "load_split",
]


def __getattr__(name: str):
    """`clip_task`, now `pyfuse.models.clip.clip_task`: a deprecated alias (see `pyfuse.data.vision`)."""
    if name == "clip_task":
        return vision.__getattr__(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
