"""The OpenAI request bodies flashjax accepts, checked field by field into one frozen `CompletionRequest`.

Everything a request can get wrong without the model (types, ranges, unknown fields, fields whose
meaning flashjax does not implement) is caught here and named in the error's `param`. What needs the
model (the prompt's length against the context, token ids against the vocabulary) is checked in
`prompts.py`.

Unknown fields are refused as OpenAI refuses them: a misspelt `temprature` silently ignored would give
greedy output that looks like a bug. Known OpenAI fields that flashjax does not implement are accepted
only at their neutral value (`frequency_penalty: 0`, `logprobs: false`, ...), so a client that sends
its defaults works, and one that asks for the feature learns it is missing instead of being ignored.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import secrets
from typing import Any

from flashjax.sampling import SamplingParams
from flashjax.server.errors import ApiError, bad_request

MAX_STOPS = 4  # as OpenAI
ROLES = ("system", "user", "assistant")
_ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for the system role

# Accepted and ignored: they do not change what is generated.
_IGNORED = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls"})


def _neutral(*values):
    return lambda v: v is None or any(v == n and type(v) is type(n) for n in values)


# Accepted only at the neutral value (absent or null counts as neutral).
_NEUTRAL_CHAT = {
    "frequency_penalty": _neutral(0, 0.0), "presence_penalty": _neutral(0, 0.0), "logprobs": _neutral(False),
    "top_logprobs": _neutral(0), "logit_bias": _neutral({}), "tools": _neutral([]),
    "tool_choice": _neutral("none", "auto"), "response_format": _neutral({"type": "text"}),
    "modalities": _neutral(["text"]),
}
_NEUTRAL_COMPLETION = {
    "frequency_penalty": _neutral(0, 0.0), "presence_penalty": _neutral(0, 0.0), "logprobs": _neutral(0),
    "logit_bias": _neutral({}), "best_of": _neutral(1), "echo": _neutral(False), "suffix": _neutral(""),
}
_COMMON = frozenset({"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n", "stream",
                     "stream_options"})
_CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens"}
_COMPLETION_FIELDS = _COMMON | {"prompt"}


@dataclasses.dataclass(frozen=True)
class CompletionRequest:
    """One validated request: a chat (`messages`) or a raw completion (`prompt`)."""

    kind: str  # "chat" | "completion"
    messages: tuple[tuple[str, str], ...] = ()  # (role, content); chat only
    prompt: str | tuple[int, ...] | None = None  # text or token ids; completion only
    max_tokens: int | None = None  # None: the server's default, within the context left
    max_tokens_param: str = "max_tokens"  # the field that set it, for errors ("max_completion_tokens" too)
    sampling: SamplingParams = SamplingParams()  # the seed resolved (random when sampling without one)
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage
    model: str | None = None

    def message_dicts(self) -> list[dict]:
        return [{"role": role, "content": content} for role, content in self.messages]


def parse_chat(body: Any) -> CompletionRequest:
    """A /v1/chat/completions body -> CompletionRequest, or ApiError(400) naming the field."""
    body = _object(body)
    _check_fields(body, _CHAT_FIELDS, _NEUTRAL_CHAT)
    if "max_tokens" in body and "max_completion_tokens" in body and \
            body["max_tokens"] is not None and body["max_completion_tokens"] is not None:
        raise bad_request("give max_tokens or max_completion_tokens, not both", "max_completion_tokens")
    limit_field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    return CompletionRequest(kind="chat", messages=_messages(body.get("messages", _MISSING)),
                             max_tokens=_max_tokens(body, limit_field), max_tokens_param=limit_field,
                             **_common(body))


def parse_completion(body: Any) -> CompletionRequest:
    """A /v1/completions body -> CompletionRequest, or ApiError(400) naming the field."""
    body = _object(body)
    _check_fields(body, _COMPLETION_FIELDS, _NEUTRAL_COMPLETION)
    return CompletionRequest(kind="completion", prompt=_prompt(body.get("prompt", _MISSING)),
                             max_tokens=_max_tokens(body, "max_tokens"), **_common(body))


# ---- the parts ----------------------------------------------------------------------------------

_MISSING = object()


def _object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got {_json_type(body)}", None, "invalid_type")
    return body


def _check_fields(body: dict, known: frozenset, neutral: dict) -> None:
    for name, value in body.items():
        if name in known or name in _IGNORED:
            continue
        if name in neutral:
            if not neutral[name](value):
                raise bad_request(f"{name}={value!r} is not supported by flashjax (only its default)", name,
                                  "unsupported_parameter")
            continue
        raise bad_request(f"unrecognized request argument: {name}", name, "unknown_parameter")


def _common(body: dict) -> dict:
    n = body.get("n")
    if n is not None:
        _integer("n", n)
        if n != 1:
            raise bad_request(f"n={n}: flashjax generates one choice per request (n must be 1)", "n")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _wrong_type("model", model, "a string")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _wrong_type("stream", stream, "a boolean")
    stream = bool(stream)
    return dict(sampling=_sampling(body), stop=_stops(body.get("stop")), stream=stream,
                include_usage=_include_usage(body.get("stream_options"), stream), model=model)


def _sampling(body: dict) -> SamplingParams:
    temperature = body.get("temperature")
    temperature = 1.0 if temperature is None else _number("temperature", temperature, 0.0, 2.0)
    top_p = body.get("top_p")
    top_p = 1.0 if top_p is None else _number("top_p", top_p, 0.0, 1.0)
    if top_p == 0.0:
        raise bad_request("top_p must be greater than 0 (1 keeps every token)", "top_p")
    top_k = body.get("top_k")
    top_k = 0 if top_k is None else _integer("top_k", top_k, 0)
    seed = body.get("seed")
    if seed is None:
        # Without a seed, sampled requests differ from one another (as OpenAI's do); greedy ignores it.
        seed = secrets.randbelow(2**32) if temperature > 0 else 0
    else:
        seed = _integer("seed", seed, 0, 2**32 - 1)
    return SamplingParams(float(temperature), int(top_k), float(top_p), int(seed))


def _max_tokens(body: dict, name: str) -> int | None:
    value = body.get(name)
    return None if value is None else _integer(name, value, 1)


def _stops(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list):
        raise _wrong_type("stop", stop, "a string or a list of strings")
    if len(stops) > MAX_STOPS:
        raise bad_request(f"stop has {len(stops)} strings; at most {MAX_STOPS} are allowed", "stop")
    for i, s in enumerate(stops):
        if not isinstance(s, str):
            raise _wrong_type(f"stop[{i}]", s, "a string")
        if not s:
            raise bad_request(f"stop[{i}] is empty", f"stop[{i}]")
    return tuple(stops)


def _include_usage(options, stream: bool) -> bool:
    if options is None:
        return False
    if not stream:
        raise bad_request("stream_options is only allowed when stream is true", "stream_options")
    if not isinstance(options, dict):
        raise _wrong_type("stream_options", options, "an object")
    for key in options:
        if key != "include_usage":
            raise bad_request(f"unrecognized stream option: {key}", f"stream_options.{key}", "unknown_parameter")
    usage = options.get("include_usage")
    if usage is not None and not isinstance(usage, bool):
        raise _wrong_type("stream_options.include_usage", usage, "a boolean")
    return bool(usage)


def _messages(messages) -> tuple[tuple[str, str], ...]:
    if messages is _MISSING or messages is None:
        raise bad_request("messages is required", "messages", "missing_required_parameter")
    if not isinstance(messages, list):
        raise _wrong_type("messages", messages, "a list of messages")
    if not messages:
        raise bad_request("messages is empty", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _wrong_type(where, m, "an object with role and content")
        for key, value in m.items():
            # Clients echo whole message objects back (refusal: null, ...): a null extra is harmless.
            if key not in ("role", "content", "name") and value is not None:
                raise bad_request(f"{where}.{key} is not supported by flashjax (text messages only)",
                                  f"{where}.{key}", "unsupported_parameter")
        role = m.get("role")
        if not isinstance(role, str):
            raise _wrong_type(f"{where}.role", role, "a string")
        role = _ROLE_ALIASES.get(role, role)
        if role not in ROLES:
            raise bad_request(f"unknown role {m['role']!r} in {where}: expected system, developer, user or "
                              f"assistant (flashjax has no tool calls)", f"{where}.role")
        name = m.get("name")
        if name is not None and not isinstance(name, str):
            raise _wrong_type(f"{where}.name", name, "a string")
        out.append((role, _content(m.get("content", _MISSING), f"{where}.content")))
    return tuple(out)


def _content(content, where: str) -> str:
    if content is _MISSING or content is None:
        raise bad_request(f"{where} is required", where, "missing_required_parameter")
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _wrong_type(where, content, "a string or a list of text parts")
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise bad_request(f"{where}[{j}] must be a text part {{\"type\": \"text\", \"text\": ...}} "
                              f"(flashjax serves text only)", f"{where}[{j}]", "invalid_type")
        texts.append(part["text"])
    return "".join(texts)


def _prompt(prompt) -> str | tuple[int, ...]:
    if prompt is _MISSING or prompt is None:
        raise bad_request("prompt is required", "prompt", "missing_required_parameter")
    if isinstance(prompt, str):
        return prompt
    if not isinstance(prompt, list) or not prompt:
        raise _wrong_type("prompt", prompt, "a string, a list of token ids, or a list holding one of those")
    if all(_is_integer(t) for t in prompt):
        return _token_ids(prompt, "prompt")
    if len(prompt) > 1:
        raise bad_request(f"prompt holds {len(prompt)} prompts; flashjax serves one prompt per request", "prompt")
    (only,) = prompt
    if isinstance(only, str):
        return only
    if isinstance(only, list) and only and all(_is_integer(t) for t in only):
        return _token_ids(only, "prompt[0]")
    raise _wrong_type("prompt[0]", only, "a string or a list of token ids")


def _token_ids(ids: list, where: str) -> tuple[int, ...]:
    for i, t in enumerate(ids):
        if t < 0:
            raise bad_request(f"{where}[{i}] is a negative token id ({t})", f"{where}[{i}]")
    return tuple(int(t) for t in ids)


# ---- scalars ------------------------------------------------------------------------------------

def _is_integer(value) -> bool:
    # JSON true is not 1 here: bool is an int subclass in Python.
    return not isinstance(value, bool) and isinstance(value, numbers.Integral)


def _integer(name: str, value, low: int | None = None, high: int | None = None) -> int:
    # 3.0 from a JSON encoder that writes every number as a float is still the integer 3.
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not _is_integer(value):
        raise _wrong_type(name, value, "an integer")
    _check_range(name, value, low, high)
    return int(value)


def _number(name: str, value, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _wrong_type(name, value, "a number")
    if not math.isfinite(value):
        raise bad_request(f"{name} must be a finite number, got {value!r}", name)
    _check_range(name, value, low, high)
    return float(value)


def _check_range(name, value, low, high) -> None:
    if (low is not None and value < low) or (high is not None and value > high):
        if high is None:
            bound = f"at least {low}"
        elif low is None:
            bound = f"at most {high}"
        else:
            bound = f"between {low} and {high}"
        raise bad_request(f"{name} must be {bound}, got {value!r}", name)


def _wrong_type(name: str, value, expected: str) -> ApiError:
    return bad_request(f"{name} must be {expected}, got {_json_type(value)}", name, "invalid_type")


def _json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__
