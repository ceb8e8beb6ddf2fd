"""Reading checkpoints: Hugging Face safetensors directories and GGUF files.

Every reader hands out one tensor at a time, so loading never holds a whole
checkpoint file in memory. This package is below flashjax.store (the flash
format builds on these readers) and never imports it: `open_checkpoint` opens
checkpoints; `flashjax.store.open_model_source` opens whatever `--model` names,
converted models included.
"""

from flashjax.weights.errors import CheckpointError
from flashjax.weights.source import BUILTIN_MODELS, ModelSource, open_checkpoint

__all__ = ["BUILTIN_MODELS", "CheckpointError", "ModelSource", "open_checkpoint"]

