"""OpenAI's response bodies and stream chunks for chat and text completions.

flashjax's per-request figures ride in a "flashjax" field that OpenAI clients keep as an extra and
otherwise ignore.
"""

from __future__ import annotations

import dataclasses
import time
import uuid

from flashjax.server.worker import Finished

EXTENSION = "flashjax"


@dataclasses.dataclass(frozen=True)
class Reply:
    """Who is answering: the fields every body and chunk of one request share."""

    kind: str  # "chat" | "completion"
    id: str
    model: str
    created: int

    @classmethod
    def new(cls, kind: str, model: str) -> "Reply":
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        return cls(kind, f"{prefix}-{uuid.uuid4().hex[:24]}", model, int(time.time()))

    @property
    def object(self) -> str:
        return "chat.completion" if self.kind == "chat" else "text_completion"

    def _head(self, object_name: str) -> dict:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model,
                "system_fingerprint": "flashjax"}

    # -- a whole response --

    def body(self, text: str, done: Finished) -> dict:
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": done.finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": done.finish_reason}
        return {**self._head(self.object), "choices": [choice], "usage": usage(done), EXTENSION: done.figures}

    # -- stream chunks --

    def _chunk(self, choices: list, include_usage: bool) -> dict:
        chunk = {**self._head("chat.completion.chunk" if self.kind == "chat" else "text_completion"),
                 "choices": choices}
        if include_usage:  # OpenAI: with include_usage every chunk has "usage", null until the last
            chunk["usage"] = None
        return chunk

    def _choice(self, text: str | None, finish_reason: str | None, role: bool = False) -> dict:
        if self.kind == "chat":
            delta = {} if text is None else {"content": text}
            if role:
                delta = {"role": "assistant", "content": ""}
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}

    def first_chunk(self, include_usage: bool) -> dict | None:
        """Chat streams open with the assistant's role (as OpenAI's do); text completions do not."""
        return self._chunk([self._choice(None, None, role=True)], include_usage) if self.kind == "chat" else None

    def text_chunk(self, text: str, include_usage: bool) -> dict:
        return self._chunk([self._choice(text, None)], include_usage)

    def final_chunks(self, done: Finished, include_usage: bool) -> list[dict]:
        last = self._chunk([self._choice(None, done.finish_reason)], include_usage)
        last[EXTENSION] = done.figures
        chunks = [last]
        if include_usage:
            chunks.append({**self._chunk([], False), "usage": usage(done)})
        return chunks


def usage(done: Finished) -> dict:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}
