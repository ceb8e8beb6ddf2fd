"""Reading checkpoints: Hugging Face safetensors directories and GGUF files.

Every reader hands out one tensor at a time, so loading never holds a whole
checkpoint file in memory.
"""

from flashjax.weights.errors import CheckpointError
from flashjax.weights.source import ModelSource, open_model_source

__all__ = ["CheckpointError", "ModelSource", "open_model_source"]
