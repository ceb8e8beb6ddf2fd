"""`flashjax serve` as a real process on the real default model, driven by real clients: the official
`openai` client, plain HTTP, many threads at once, a client that leaves mid-stream, bad input, a long
run of requests for leaks, the chat page in headless chromium, and SIGTERM.

One server serves the whole module (loading and compiling once); its answers are checked against
`flashjax.load(...)` in this process (`default_llm`)."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import psutil
import pytest

import flashjax
from _ci import skip_or_fail

pytestmark = pytest.mark.slow

KEY = "test-key-5f2c"
BODY_LIMIT = 100_000
FINISH = {"eos": "stop", "length": "length"}  # LLM.generate's finish reasons, as OpenAI names them


class Server:
    """The server process, with a small HTTP client of our own (so what is sent is exactly what we say)."""

    def __init__(self, proc: subprocess.Popen, port: int, log_path):
        self.proc, self.port, self.log_path = proc, port, log_path
        self.first_health = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def connect(self, timeout: float = 120) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def request(self, method: str, path: str, body=None, headers=None, auth: bool = True):
        """(status, headers with lower-case names, body bytes); `body` a dict (sent as JSON) or bytes."""
        all_headers = {"Content-Type": "application/json", **(headers or {})}
        if auth:
            all_headers.setdefault("Authorization", f"Bearer {KEY}")
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
        conn = self.connect()
        try:
            conn.request(method, path, body=body, headers=all_headers)
            response = conn.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            conn.close()

    def post(self, path: str, body: dict) -> dict:
        status, _, raw = self.request("POST", path, body)
        assert status == 200, raw
        return json.loads(raw)

    def openai(self):
        import openai

        return openai.OpenAI(base_url=self.base_url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def events_of(response):
    """The `data:` payloads of an SSE response, as they arrive."""
    while True:
        line = response.readline()
        if not line:
            return
        line = line.decode().rstrip("\n")
        if line.startswith("data: "):
            yield line[len("data: "):]


def stream_text(server: Server, path: str, body: dict) -> str:
    """A streamed request's text, chunks concatenated."""
    conn = server.connect()
    try:
        conn.request("POST", path, json.dumps({**body, "stream": True}),
                     {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200, response.read()
        text = []
        for data in events_of(response):
            if data == "[DONE]":
                return "".join(text)
            chunk = json.loads(data)
            assert "error" not in chunk, chunk
            for choice in chunk["choices"]:
                text.append(choice["delta"].get("content") or "" if "delta" in choice else choice["text"])
        raise AssertionError("the stream ended without [DONE]")
    finally:
        conn.close()


def _server_env() -> dict:
    # conftest gives this process four virtual CPU devices; the server runs as a user would run it.
    env = dict(os.environ)
    env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", "")).strip()
    return env


@contextlib.contextmanager
def _running_server(model, log_dir, *options):
    """`flashjax serve --model model` on a free port with the tests' settings, ready (health 200)."""
    log_path = log_dir / "server.log"
    cmd = [sys.executable, "-m", "flashjax", "serve", "--model", str(model), "--port", "0",
           "--api-key", KEY, "--queue-limit", "16", "--default-max-tokens", "64",
           "--max-body-bytes", str(BODY_LIMIT), "--shutdown-timeout", "5", *options]
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=_server_env())
    server = None
    try:
        deadline = time.monotonic() + 60
        while server is None:
            match = re.search(r"on http://127\.0\.0\.1:(\d+)", log_path.read_text(errors="replace"))
            if match:
                server = Server(proc, int(match.group(1)), log_path)
            elif proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"flashjax serve did not start:\n{log_path.read_text(errors='replace')[-3000:]}")
            else:
                time.sleep(0.1)
        deadline = time.monotonic() + 300
        while True:
            status, _, raw = server.request("GET", "/health", auth=False)
            if server.first_health is None:
                server.first_health = (status, json.loads(raw))
            if status == 200:
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"flashjax serve never became ready:\n{server.log()[-3000:]}")
            time.sleep(0.5)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def server(default_gguf, tmp_path_factory):
    with _running_server(default_gguf, tmp_path_factory.mktemp("serve")) as running:
        yield running


# ---- endpoints ------------------------------------------------------------------------------------

def test_health_is_503_while_loading_then_ok(server):
    status, body = server.first_health
    assert status == 503 and body["status"] == "loading" and body["error"]["code"] == "model_loading"
    status, _, raw = server.request("GET", "/health", auth=False)
    assert (status, json.loads(raw)) == (200, {"status": "ok"})


def test_models_lists_the_model_with_context_and_memory_plan(server, default_gguf):
    status, _, raw = server.request("GET", "/v1/models", auth=False)
    assert status == 401 and json.loads(raw)["error"]["type"] == "authentication_error"
    models = server.openai().models.list().data
    assert [m.id for m in models] == [str(default_gguf)]
    card = models[0].model_extra
    assert card["context_length"] == 8192
    assert card["memory_plan"]["engine"] == "dense" and card["memory_plan"]["weights_bytes"] > 0
    assert "dense engine" in card["memory_plan"]["description"]


def test_openai_chat_equals_llm_chat(server, default_llm):
    client = server.openai()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    expected = default_llm.chat(messages, max_tokens=24)
    reply = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=24, temperature=0)
    assert reply.choices[0].message.content == expected.text
    assert reply.choices[0].finish_reason == FINISH[expected.finish_reason]
    assert reply.usage.prompt_tokens == len(expected.prompt_tokens)
    assert reply.usage.completion_tokens == len(expected.tokens)
    assert reply.usage.total_tokens == len(expected.prompt_tokens) + len(expected.tokens)
    figures = reply.model_extra["flashjax"]
    assert figures["time_to_first_token_ms"] > 0 and figures["tokens_per_s"] > 0 and figures["engine"] == "dense"

    chunks = list(client.chat.completions.create(model="smollm2", messages=messages, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [FINISH[expected.finish_reason]]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(expected.tokens)
    assert all(c.usage is None for c in chunks[:-1])


def test_openai_completions_equal_llm_generate(server, default_llm):
    client = server.openai()
    prompt = "The capital of France is"
    expected = default_llm.generate(prompt, max_tokens=12)
    reply = client.completions.create(model="smollm2", prompt=prompt, max_tokens=12, temperature=0)
    assert reply.choices[0].text == expected.text
    assert reply.choices[0].finish_reason == FINISH[expected.finish_reason] == "length"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(expected.prompt_tokens), 12)
    chunks = list(client.completions.create(model="smollm2", prompt=prompt, max_tokens=12, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected.text
    # Sampling with a seed (and the top_k extension) is the library's too.
    expected = default_llm.generate(prompt, max_tokens=12, temperature=0.8, top_k=40, top_p=0.9, seed=7)
    reply = client.completions.create(model="smollm2", prompt=prompt, max_tokens=12, temperature=0.8, top_p=0.9,
                                      seed=7, extra_body={"top_k": 40})
    assert reply.choices[0].text == expected.text


def test_stop_strings_end_the_text_exactly(server, default_llm):
    client = server.openai()
    prompt = "Once upon a time, in a small village by the sea,"
    full = default_llm.generate(prompt, max_tokens=32)
    # A stop string that straddles a token boundary, so it arrives in two pieces.
    ends = [len(default_llm.tokenizer.decode(full.tokens[:i])) for i in range(1, len(full.tokens))]
    boundary = next(b for b in ends[len(ends) // 2:] if full.text.find(full.text[b - 2:b + 3]) == b - 2)
    stop = full.text[boundary - 2:boundary + 3]
    expected = full.text[:boundary - 2]
    for stops in ([stop], ["never in this text", stop]):
        reply = client.completions.create(model="m", prompt=prompt, max_tokens=32, temperature=0, stop=stops)
        assert reply.choices[0].text == expected and reply.choices[0].finish_reason == "stop"
        assert reply.usage.completion_tokens < 32
        chunks = list(client.completions.create(model="m", prompt=prompt, max_tokens=32, temperature=0, stop=stops,
                                                stream=True))
        assert "".join(c.choices[0].text for c in chunks) == expected
        assert chunks[-1].choices[0].finish_reason == "stop"
    chat = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Say hello."}],
                                          max_tokens=32, temperature=0)
    text = chat.choices[0].message.content
    stop = text[len(text) // 2:len(text) // 2 + 3]
    cut = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Say hello."}],
                                         max_tokens=32, temperature=0, stop=stop)
    assert cut.choices[0].message.content == text[:text.find(stop)]


def test_sse_stream_read_with_plain_http_is_well_formed(server):
    body = {"prompt": "List three colors:", "max_tokens": 16, "temperature": 0}
    status, headers, raw = server.request("POST", "/v1/completions", {**body, "stream": True})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    blocks = raw.decode().split("\n\n")
    assert blocks[-1] == "", "the stream must end with a blank line"
    blocks = blocks[:-1]
    assert all(b.startswith("data: ") and "\n" not in b for b in blocks), blocks
    assert blocks[-1] == "data: [DONE]" and sum(b == "data: [DONE]" for b in blocks) == 1
    chunks = [json.loads(b[len("data: "):]) for b in blocks[:-1]]
    assert len({c["id"] for c in chunks}) == 1 and {c["object"] for c in chunks} == {"text_completion"}
    assert [c["choices"][0]["finish_reason"] for c in chunks][:-1] == [None] * (len(chunks) - 1)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and "flashjax" in chunks[-1]
    whole = server.post("/v1/completions", body)
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"] != ""


# ---- load and faults ------------------------------------------------------------------------------

def test_concurrent_clients_each_get_their_single_client_answer(server, default_llm):
    """16 clients x 4 requests at once: all complete, and each answer is the one the request gets alone."""
    subjects = ["a color", "a fruit", "a planet", "an animal"]
    cases = []
    for i, subject in enumerate(subjects):
        messages = [{"role": "user", "content": f"Name {subject}."}]
        cases.append((messages, dict(temperature=0)))
        cases.append((messages, dict(temperature=0.9, top_p=0.95, seed=100 + i)))
    expected = [default_llm.chat(m, max_tokens=4, **o).text for m, o in cases]
    results, errors = {}, []

    def client(c: int) -> None:
        try:
            for k in range(4):
                case = (c + k) % len(cases)
                messages, options = cases[case]
                body = {"messages": messages, "max_tokens": 4, **options}
                if (c + k) % 2:
                    text = stream_text(server, "/v1/chat/completions", body)
                else:
                    text = server.post("/v1/chat/completions", body)["choices"][0]["message"]["content"]
                results[(c, k)] = (case, text)
        except Exception as e:  # noqa: BLE001 - reported below with the client's number
            errors.append(f"client {c}: {e!r}")

    threads = [threading.Thread(target=client, args=(c,)) for c in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    assert len(results) == 64
    for (c, k), (case, text) in results.items():
        assert text == expected[case], (c, k, cases[case])


def test_a_full_queue_answers_503_with_retry_after(server):
    n = 24  # the server takes 1 running + 16 waiting
    barrier, answers = threading.Barrier(n), []

    def client() -> None:
        barrier.wait()
        answers.append(server.request("POST", "/v1/completions", {"prompt": "Count: 1, 2,", "max_tokens": 8,
                                                                  "temperature": 0}))

    threads = [threading.Thread(target=client) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    statuses = sorted(status for status, _, _ in answers)
    assert len(answers) == n and set(statuses) <= {200, 503}, statuses
    refused = [(h, json.loads(raw)) for status, h, raw in answers if status == 503]
    assert refused, "no request was refused although more arrived than the queue holds"
    for headers, body in refused:
        assert int(headers["retry-after"]) >= 1 and body["error"]["code"] == "queue_full"
    for status, _, raw in answers:
        if status == 200:
            assert json.loads(raw)["usage"]["completion_tokens"] == 8


def test_a_client_leaving_mid_stream_frees_the_engine_at_once(server):
    conn = server.connect()
    conn.request("POST", "/v1/chat/completions",
                 json.dumps({"messages": [{"role": "user", "content": "Write a long story about a dragon."}],
                             "max_tokens": 400, "temperature": 0, "stream": True}),
                 {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    response = conn.getresponse()
    content_chunks, request_id = 0, None
    for data in events_of(response):
        chunk = json.loads(data)
        request_id = chunk["id"]
        if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
            content_chunks += 1
            if content_chunks == 3:
                break
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    # 400 tokens would hold the engine for many seconds; the next request must start at once.
    started = time.monotonic()
    reply = server.post("/v1/completions", {"prompt": "Hi", "max_tokens": 2, "temperature": 0})
    assert reply["flashjax"]["queue_ms"] < 2000, reply["flashjax"]
    assert time.monotonic() - started < 10
    pattern = re.compile(re.escape(request_id) + r": client disconnected after (\d+) tokens; generation stopped")
    match = pattern.search(server.log())
    assert match, server.log()[-2000:]
    assert int(match.group(1)) < 20  # stopped at the next token, not at the end of 400


BAD_INPUTS = [
    # (name, path, body bytes, headers, status, param, code)
    ("malformed JSON", "/v1/chat/completions", b'{"messages": [', None, 400, None, "invalid_json"),
    ("not UTF-8", "/v1/completions", b'{"prompt": "\xff\xfe"}', None, 400, None, "invalid_json"),
    ("empty body", "/v1/completions", b"", None, 400, None, "invalid_json"),
    ("nested too deeply", "/v1/completions", b"[" * 50_000 + b"]" * 50_000, None, 400, None, "invalid_json"),
    ("not an object", "/v1/completions", b'"prompt"', None, 400, None, "invalid_type"),
    ("wrong type", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}',
     None, 400, "temperature", "invalid_type"),
    ("unknown role", "/v1/chat/completions", b'{"messages": [{"role": "wizard", "content": "hi"}]}', None, 400,
     "messages[0].role", "invalid_value"),
    ("unknown field", "/v1/completions", b'{"prompt": "hi", "temprature": 0}', None, 400, "temprature",
     "unknown_parameter"),
    ("n > 1", "/v1/completions", b'{"prompt": "hi", "n": 2}', None, 400, "n", "invalid_value"),
    ("max_tokens 0", "/v1/completions", b'{"prompt": "hi", "max_tokens": 0}', None, 400, "max_tokens",
     "invalid_value"),
    ("max_tokens past the context", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 100000}', None, 400,
     "max_completion_tokens", "invalid_value"),
    ("prompt longer than the context", "/v1/completions",
     json.dumps({"prompt": "hello " * 9000}).encode(), None, 400, "prompt", "context_length_exceeded"),
    ("token id outside the vocabulary", "/v1/completions", b'{"prompt": [1, 2, 999999]}', None, 400, "prompt[2]",
     "invalid_value"),
    ("body over the limit", "/v1/completions", json.dumps({"prompt": "x" * BODY_LIMIT}).encode(), None, 413, None,
     "body_too_large"),
    ("wrong API key", "/v1/completions", b'{"prompt": "hi"}', {"Authorization": "Bearer nope"}, 401, None,
     "invalid_api_key"),
    ("unknown path", "/v1/nothing", b"{}", None, 404, None, "not_found"),
]


@pytest.mark.parametrize("name,path,body,headers,status,param,code", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_gets_an_openai_shaped_4xx(server, name, path, body, headers, status, param, code):
    got, _, raw = server.request("POST", path, body, headers)
    error = json.loads(raw)["error"]
    assert (got, error["param"], error["code"]) == (status, param, code), error
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == ("authentication_error" if status == 401 else "invalid_request_error")


def test_the_server_keeps_serving_after_bad_input(server):
    assert server.request("GET", "/health", auth=False)[0] == 200
    assert server.post("/v1/completions", {"prompt": "Hi", "max_tokens": 1})["usage"]["completion_tokens"] == 1
    assert "Traceback" not in server.log()


def test_nothing_leaks_over_many_requests(server):
    """Memory, threads and open files stay flat over a run of requests, some left mid-stream."""
    proc = psutil.Process(server.proc.pid)

    def burst(n: int) -> None:
        for i in range(n):
            if i % 10 == 9:  # a client that leaves after the first chunk
                conn = server.connect()
                conn.request("POST", "/v1/completions", json.dumps({"prompt": "Tell me", "max_tokens": 50,
                                                                    "stream": True}),
                             {"Authorization": f"Bearer {KEY}"})
                next(events_of(conn.getresponse()))
                conn.close()
            elif i % 2:
                stream_text(server, "/v1/chat/completions",
                            {"messages": [{"role": "user", "content": f"Say {i}"}], "max_tokens": 2})
            else:
                server.post("/v1/completions", {"prompt": f"Number {i}:", "max_tokens": 2})

    burst(20)  # warm-up: thread pools, allocator arenas
    before = (proc.memory_info().rss, proc.num_threads(), proc.num_fds())
    burst(200)  # the 200 requests in a row, every tenth left mid-stream
    time.sleep(0.5)
    after = (proc.memory_info().rss, proc.num_threads(), proc.num_fds())
    assert after[0] <= before[0] * 1.10, f"RSS grew from {before[0] / 1e6:.0f} MB to {after[0] / 1e6:.0f} MB"
    assert after[1] <= before[1] + 2, f"threads: {before[1]} -> {after[1]}"
    assert after[2] <= before[2] + 2, f"open files: {before[2]} -> {after[2]}"


def test_metrics_in_prometheus_text_format(server):
    from prometheus_client.parser import text_string_to_metric_families

    status, headers, raw = server.request("GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(raw.decode())}
    value = lambda name, suffix="_total", **labels: sum(
        s.value for s in families[name].samples if s.name == name + suffix and labels.items() <= s.labels.items())
    assert value("flashjax_requests", route="/v1/chat/completions", status="200") > 0
    assert value("flashjax_requests", route="/v1/completions", status="503") > 0
    assert value("flashjax_prompt_tokens") > 0 and value("flashjax_generated_tokens") > 0
    assert value("flashjax_generations", finish_reason="cancelled") > 0
    assert value("flashjax_time_to_first_token_seconds", "_count") > 0
    assert value("flashjax_time_per_output_token_seconds", "_count") > 0
    assert value("flashjax_bytes_read") == 0  # the dense engine reads nothing from disk
    assert value("flashjax_queue_length", "") == 0 and "flashjax_cache_hit_rate" in families


def test_the_flash_engine_serves_a_quantized_model_under_a_budget(default_gguf, tmp_path_factory):
    """A q4 conversion of the default model served by the flash engine under a budget that streams:
    the reply equals the same engine's `LLM.chat`, the response's flashjax figures and /metrics say
    what was read from disk, and /v1/models gives the memory plan."""
    from flashjax.store import convert

    root = tmp_path_factory.mktemp("serve-flash")
    model = root / "smollm2-q4"
    convert(str(default_gguf), str(model), quant="q4", progress=False)
    options = ("--sparsity", "hybrid", "--memory-budget", "75%")
    messages = [{"role": "user", "content": "Name a colour."}]
    with flashjax.load(str(model), sparsity="hybrid", memory_budget="75%") as llm:
        want = llm.chat(messages, max_tokens=12)
    with _running_server(model, root, *options) as flash_server:
        body = flash_server.post("/v1/chat/completions", {"messages": messages, "max_tokens": 12, "temperature": 0})
        assert body["choices"][0]["message"]["content"] == want.text
        assert body["flashjax"]["bytes_read_per_token"] > 0
        status, _, raw = flash_server.request("GET", "/v1/models")
        plan = json.loads(raw)["data"][0]["memory_plan"]
        assert status == 200 and "budget" in json.dumps(plan)
        status, _, raw = flash_server.request("GET", "/metrics")
        read = [line for line in raw.decode().splitlines() if line.startswith("flashjax_bytes_read_total")]
        assert read and float(read[0].split()[-1]) > 0


# ---- the chat page --------------------------------------------------------------------------------

def _browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        skip_or_fail("no headless browser: install Debian's chromium and chromium-driver "
                     "(apt-get install chromium chromium-driver) to test the chat page")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        skip_or_fail("selenium is not installed (pip install -e '.[test]')")
    options = Options()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1100,800"):
        options.add_argument(arg)
    # The driver's path is given, so selenium never looks for (or downloads) one.
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


def test_chat_page_streams_a_reply_in_headless_chromium(server, default_llm, tmp_path_factory, capsys):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    browser = _browser()
    try:
        browser.get(server.base_url + "/")
        wait = WebDriverWait(browser, 120, poll_frequency=0.1)
        key = browser.find_element(By.ID, "api-key")
        key.send_keys(KEY + Keys.TAB)  # "change": the page stores the key and asks for the model
        wait.until(lambda b: "dense engine" in b.find_element(By.ID, "plan").text)
        conversation = []
        for n, message in enumerate(["What is the capital of France?", "And of Germany?"], start=1):
            browser.find_element(By.ID, "prompt").send_keys(message + Keys.ENTER)
            done = '.message.assistant[data-done="true"]'
            wait.until(lambda b, n=n: len(b.find_elements(By.CSS_SELECTOR, done)) == n)
            reply = browser.find_elements(By.CSS_SELECTOR, ".message.assistant")[-1]
            text = browser.execute_script("return arguments[0].firstChild.data", reply)
            conversation.append({"role": "user", "content": message})
            expected = default_llm.chat(conversation, max_tokens=256)
            assert text == expected.text
            assert int(reply.get_attribute("data-chunks")) > 1, "the reply came in one piece, not streamed"
            conversation.append({"role": "assistant", "content": text})
        assert len(browser.find_elements(By.CSS_SELECTOR, ".message")) == 4
        assert "tokens/s" in browser.find_element(By.ID, "stats").text
        assert not browser.find_elements(By.CSS_SELECTOR, ".message.error")
        path = tmp_path_factory.getbasetemp() / "flashjax-chat-page.png"
        assert browser.save_screenshot(str(path))
        with capsys.disabled():
            print(f"\nchat page screenshot: {path}")
    finally:
        browser.quit()


# ---- shutdown (last: it stops the module's server) -----------------------------------------------

def test_sigterm_finishes_the_running_request_and_exits_0(server):
    conn = server.connect()
    conn.request("POST", "/v1/completions", json.dumps({"prompt": "Once upon a time", "max_tokens": 30,
                                                        "temperature": 0, "stream": True}),
                 {"Authorization": f"Bearer {KEY}"})
    events = events_of(conn.getresponse())
    first = json.loads(next(events))
    server.proc.send_signal(signal.SIGTERM)
    rest = list(events)  # the running request is finished (within --shutdown-timeout 5)
    conn.close()
    assert rest[-1] == "[DONE]" and json.loads(rest[-2])["choices"][0]["finish_reason"] == "length", rest[-3:]
    assert first["id"]
    assert server.proc.wait(60) == 0, server.log()[-2000:]
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=5).close()
