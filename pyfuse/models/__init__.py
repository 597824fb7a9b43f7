"""Model adapters: they load models and turn them into forward functions and tasks; they never merge."""

from .clip import ClipClassifier, HFClip, OpenClip, clip_task, map_checkpoint_keys
from .hub import ModelNotFoundError, resolve_model_dir
from .lora import (
    LoraAdapter,
    LoraAdapterError,
    load_lora_adapter,
    lora_deltas,
    lora_factored_task_vectors,
    lora_task_models,
    lora_task_vectors,
)
from .t5 import LabelWordScorer, evaluate_glue, glue_task, glue_task_vectors, load_flan_t5, paper_adapter_id
from .text_classifier import DEFAULT_ENCODER, TextClassifierTask, TextEncoder, class_logits

__all__ = [
    "DEFAULT_ENCODER", "ClipClassifier", "HFClip", "clip_task", "LabelWordScorer", "LoraAdapter", "LoraAdapterError",
    "ModelNotFoundError", "OpenClip", "TextClassifierTask", "TextEncoder", "class_logits", "evaluate_glue",
    "glue_task", "glue_task_vectors", "load_flan_t5", "load_lora_adapter", "lora_deltas",
    "lora_factored_task_vectors", "lora_task_models", "lora_task_vectors", "map_checkpoint_keys", "paper_adapter_id",
    "resolve_model_dir",
]
