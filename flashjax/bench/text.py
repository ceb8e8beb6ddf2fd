"""The benchmarks' built-in prompt text: plain English prose written for flashjax, varied enough that a
prompt of a few hundred tokens does not repeat itself. `--prompt-text FILE` replaces it.

The prose is a file shipped inside the package (flashjax/bench/data/prompt.txt, package data), not a
string in this module, so a result can name the file its prompt came from and its sha256, and anyone
can check both against a checkout or an installed wheel."""

from __future__ import annotations

import pathlib

PROMPT_PATH = pathlib.Path(__file__).resolve().parent / "data" / "prompt.txt"
PROMPT_NAME = "flashjax/bench/data/prompt.txt"  # the same on every installation: what results record
PROMPT_TEXT = PROMPT_PATH.read_text(encoding="utf-8")
