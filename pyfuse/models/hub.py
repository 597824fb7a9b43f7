"""Finding a model on disk or on the Hugging Face hub: `pyfuse.io.hub`, importable from here as before."""

from ..io.hub import WEIGHT_FILES, ModelNotFoundError, resolve_model_dir

__all__ = ["WEIGHT_FILES", "ModelNotFoundError", "resolve_model_dir"]
