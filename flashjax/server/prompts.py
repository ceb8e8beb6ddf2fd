"""A validated request's prompt as token ids, checked against the loaded model.

This runs in the request's thread (not the engine's) so that a prompt too long for the context is a
400 at once, even while the engine is busy with another request: the tokenizer is Rust and safe to
call from several threads, and the chat template is a pure function of the messages.
"""

from __future__ import annotations

import dataclasses

from flashjax.server.errors import ApiError, bad_request
from flashjax.server.schema import CompletionRequest


@dataclasses.dataclass(frozen=True)
class Prompt:
    ids: tuple[int, ...]
    max_tokens: int  # what the engine may generate: the request's, or the default, within the context left


def encode(llm, request: CompletionRequest, context_length: int, default_max_tokens: int) -> Prompt:
    """Token ids as `LLM.chat` / `LLM.generate` build them, so the server's greedy output equals theirs."""
    from flashjax.tokenizer import TokenizerError

    tokenizer = llm.tokenizer
    param = "messages" if request.kind == "chat" else "prompt"
    if tokenizer is None and (request.kind == "chat" or isinstance(request.prompt, str)):
        raise bad_request(f"{llm.name or 'this model'} has no tokenizer: send prompt as a list of token ids", param)
    try:
        if request.kind == "chat":
            text = tokenizer.apply_chat_template(request.message_dicts(), add_generation_prompt=True)
            ids = tokenizer.encode(text, add_special_tokens=False)
        elif isinstance(request.prompt, str):
            ids = tokenizer.encode(request.prompt, add_special_tokens=True)
        else:
            ids = list(request.prompt)
    except TokenizerError as e:  # e.g. a template that insists on alternating roles
        raise bad_request(str(e), param) from None
    vocab = llm.config.vocab_size
    for i, t in enumerate(ids):
        if t >= vocab:
            raise bad_request(f"prompt[{i}] = {t} is not a token id of this model (vocabulary of {vocab})",
                              f"prompt[{i}]")
    if not ids:
        raise bad_request("the prompt is empty (no tokens)", param)
    if len(ids) >= context_length:
        raise ApiError(400, f"this model's context is {context_length} tokens, and the prompt has {len(ids)} "
                            f"(at least one token must be left to generate)", param, "context_length_exceeded")
    room = context_length - len(ids)
    if request.max_tokens is None:
        max_tokens = min(default_max_tokens, room)
    else:
        limit = request.max_tokens_param
        if request.max_tokens > context_length:
            raise bad_request(f"{limit}={request.max_tokens} is more than this model's context of "
                              f"{context_length} tokens", limit)
        # Within the context but past what the prompt leaves: generated up to the end (finish "length").
        max_tokens = min(request.max_tokens, room)
    return Prompt(tuple(int(t) for t in ids), max_tokens)
