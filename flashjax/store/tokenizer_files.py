"""Writing a model's tokenizer into a flash model directory as Hugging Face files.

Whatever the source (a Hugging Face directory or a GGUF file), the converted model carries
tokenizer.json, tokenizer_config.json and generation_config.json, so `Tokenizer.from_hf_dir` rebuilds
the same tokenizer (same ids, same end-of-generation ids, same chat template).
"""

from __future__ import annotations

import json
import os


def write_tokenizer_files(tokenizer, directory: str) -> None:
    """Writes `tokenizer` (a flashjax.tokenizer.Tokenizer) into `directory`."""
    with open(os.path.join(directory, "tokenizer.json"), "w", encoding="utf-8") as f:
        f.write(tokenizer.backend.to_str())
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": tokenizer.bos_token,
              "eos_token": tokenizer.eos_token, "chat_template": tokenizer.chat_template}
    _write_json(os.path.join(directory, "tokenizer_config.json"), config)
    # from_hf_dir puts the id of eos_token first, then these: the model's eos already leads this list.
    generation = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": list(tokenizer.eos_token_ids)}
    _write_json(os.path.join(directory, "generation_config.json"), generation)


def _write_json(path: str, value: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1, ensure_ascii=False)
