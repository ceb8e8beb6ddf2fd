"""flashjax serve's parts that need no model: request validation, stop strings, response shapes."""

import itertools

import pytest

from flashjax.server.config import ServerConfig
from flashjax.server.errors import ApiError
from flashjax.server.responses import Reply
from flashjax.server.schema import parse_chat, parse_completion
from flashjax.server.stops import StopMatcher
from flashjax.server.worker import Finished

USER = [{"role": "user", "content": "hi"}]


# ---- stop strings ---------------------------------------------------------------------------------

def run_stops(stops, pieces):
    m = StopMatcher(tuple(stops))
    out = [m.feed(p) for p in pieces]
    out.append(m.flush())
    return out, m.stopped


@pytest.mark.parametrize("text,stops,expected", [
    ("Hello world. User: hi", ["User:"], "Hello world. "),
    ("abcabd", ["abd"], "abc"),
    ("no stop here", ["zzz"], "no stop here"),
    ("a\n\nb\n\nUser", ["\n\nUser", "b"], "a\n\n"),  # the earliest stop wins
    ("ends with a partial Us", ["User"], "ends with a partial Us"),  # held back, then released at the end
    ("stop", ["stop"], ""),
])
def test_stop_strings_cut_exactly_however_the_text_is_split(text, stops, expected):
    # Every way of cutting the text into three pieces: the output never depends on the chunking.
    for i, j in itertools.combinations(range(len(text) + 1), 2):
        pieces = [text[:i], text[i:j], text[j:]]
        out, stopped = run_stops(stops, pieces)
        assert "".join(out) == expected
        assert stopped == any(s in text for s in stops)
        # Never a piece of a stop string sent: every prefix of what was sent is a prefix of the answer.
        sent = ""
        for piece in out:
            sent += piece
            assert expected.startswith(sent)


def test_text_after_a_stop_is_dropped():
    m = StopMatcher(("END",))
    assert m.feed("abEN") == "ab"
    assert m.feed("Dxyz") == ""
    assert m.stopped and m.feed("more") == "" and m.flush() == ""


# ---- request validation ---------------------------------------------------------------------------

def error_of(parse, body) -> ApiError:
    with pytest.raises(ApiError) as info:
        parse(body)
    assert info.value.status == 400
    body = info.value.body()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return info.value


@pytest.mark.parametrize("body,param,code", [
    ([1, 2], None, "invalid_type"),
    ({}, "messages", "missing_required_parameter"),
    ({"messages": "hi"}, "messages", "invalid_type"),
    ({"messages": []}, "messages", "invalid_value"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "invalid_value"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role", "invalid_value"),
    ({"messages": [{"role": "user"}]}, "messages[0].content", "missing_required_parameter"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "invalid_type"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0]", "invalid_type"),
    ({"messages": USER, "max_tokens": 0}, "max_tokens", "invalid_value"),
    ({"messages": USER, "max_tokens": "9"}, "max_tokens", "invalid_type"),
    ({"messages": USER, "max_tokens": True}, "max_tokens", "invalid_type"),
    ({"messages": USER, "max_completion_tokens": -1}, "max_completion_tokens", "invalid_value"),
    ({"messages": USER, "max_tokens": 5, "max_completion_tokens": 6}, "max_completion_tokens", "invalid_value"),
    ({"messages": USER, "temperature": 3}, "temperature", "invalid_value"),
    ({"messages": USER, "temperature": "hot"}, "temperature", "invalid_type"),
    ({"messages": USER, "top_p": 0}, "top_p", "invalid_value"),
    ({"messages": USER, "top_k": -2}, "top_k", "invalid_value"),
    ({"messages": USER, "seed": 2**40}, "seed", "invalid_value"),
    ({"messages": USER, "n": 2}, "n", "invalid_value"),
    ({"messages": USER, "stop": ["a", "b", "c", "d", "e"]}, "stop", "invalid_value"),
    ({"messages": USER, "stop": [""]}, "stop[0]", "invalid_value"),
    ({"messages": USER, "stop": 7}, "stop", "invalid_type"),
    ({"messages": USER, "stream": "yes"}, "stream", "invalid_type"),
    ({"messages": USER, "stream_options": {"include_usage": True}}, "stream_options", "invalid_value"),
    ({"messages": USER, "stream": True, "stream_options": {"x": 1}}, "stream_options.x", "unknown_parameter"),
    ({"messages": USER, "temprature": 0.5}, "temprature", "unknown_parameter"),
    ({"messages": USER, "logprobs": True}, "logprobs", "unsupported_parameter"),
    ({"messages": USER, "tools": [{"type": "function"}]}, "tools", "unsupported_parameter"),
    ({"messages": USER, "frequency_penalty": 0.5}, "frequency_penalty", "unsupported_parameter"),
])
def test_chat_body_errors_name_the_field(body, param, code):
    error = error_of(parse_chat, body)
    assert (error.param, error.code) == (param, code)
    assert error.type == "invalid_request_error"


@pytest.mark.parametrize("body,param", [
    ({}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": [[1, 2], [3]]}, "prompt"),
    ({"prompt": [1, -2]}, "prompt[1]"),
    ({"prompt": "x", "echo": True}, "echo"),
    ({"prompt": "x", "best_of": 3}, "best_of"),
])
def test_completion_body_errors_name_the_field(body, param):
    assert error_of(parse_completion, body).param == param


def test_valid_bodies_parse():
    req = parse_chat({"model": "any", "messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": "ok", "refusal": None}],
        "max_completion_tokens": 7, "temperature": 0, "top_k": 3, "seed": 5, "stop": "x", "n": 1,
        "stream": True, "stream_options": {"include_usage": True}, "user": "me", "frequency_penalty": 0})
    assert req.messages == (("system", "be brief"), ("user", "ab"), ("assistant", "ok"))
    assert (req.max_tokens, req.max_tokens_param) == (7, "max_completion_tokens")
    assert req.sampling.greedy and req.sampling.top_k == 3 and req.sampling.seed == 5
    assert req.stop == ("x",) and req.stream and req.include_usage
    assert parse_completion({"prompt": [[1, 2, 3]]}).prompt == (1, 2, 3)
    assert parse_completion({"prompt": ["text"]}).prompt == "text"
    # OpenAI's default temperature is 1; without a seed each sampled request gets its own.
    seeds = {parse_completion({"prompt": "x"}).sampling.seed for _ in range(4)}
    assert len(seeds) > 1
    assert parse_completion({"prompt": "x", "max_tokens": 3.0}).max_tokens == 3


def test_server_config_is_checked_once():
    with pytest.raises(ValueError, match="port"):
        ServerConfig(port=70000)
    with pytest.raises(ValueError, match="queue_limit"):
        ServerConfig(queue_limit=0)
    with pytest.raises(ValueError, match="API key"):
        ServerConfig(api_key=" ")


# ---- response shapes ------------------------------------------------------------------------------

def test_stream_chunks_have_openai_shape():
    done = Finished("length", 3, 2, {"tokens_per_s": 10.0})
    chat = Reply.new("chat", "m")
    assert chat.first_chunk(True)["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    last, usage = chat.final_chunks(done, True)
    assert last["choices"][0]["finish_reason"] == "length" and last["flashjax"]["tokens_per_s"] == 10.0
    assert usage["choices"] == [] and usage["usage"] == {"prompt_tokens": 3, "completion_tokens": 2,
                                                         "total_tokens": 5}
    text = Reply.new("completion", "m")
    assert text.first_chunk(False) is None and text.id.startswith("cmpl-")
    assert text.body("ab", done)["choices"][0]["text"] == "ab"
    assert text.text_chunk("a", False)["object"] == "text_completion"
