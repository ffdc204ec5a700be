"""`tide serve`: the OpenAI-compatible server, on loopback, on the random tiny model.

The server runs in-process (uvicorn in a background thread, port 0) and is reached with the
official `openai` client and raw httpx. Answers are compared with the engine run directly on the
same prompt and options. The engine is wrapped in a gate: a test that needs a decode held (a
full queue, a client leaving mid-decode, a stop) closes it and waits on the scheduler's state,
so no test depends on timing. A random model never emits a stop token: answers are short."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest

import tide_local
from tide_local.converters.convert import convert
from tide_local.converters.testmodel import make_checkpoint
from tide_local.serve import cli as serve_cli
from tide_local.serve.app import create_app
from tide_local.serve.server import serve_in_thread
from tide_local.serve.text import AnswerText

N = 8  # answer tokens: a random model's answers never stop early
KEY = "sk-test-key"
MODEL = "tiny"
ROOT = Path(__file__).resolve().parent.parent
USER = [{"role": "user", "content": "What is 123 + 456?"}]


def until(condition, timeout: float = 30.0) -> None:
    """Wait for `condition` (server state) to hold."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the server")
        time.sleep(0.005)


class GatedBatch:
    """A batch whose every step waits at the gate."""

    def __init__(self, batch, gate: threading.Event):
        self._batch, self._gate = batch, gate

    def __getattr__(self, name):
        return getattr(self._batch, name)

    def step(self):
        self._gate.wait()
        return self._batch.step()


class GatedEngine:
    """The engine, with a gate before each decoding step: open unless a test closes it."""

    def __init__(self, engine):
        self._engine = engine
        self.gate = threading.Event()
        self.gate.set()

    def __getattr__(self, name):
        return getattr(self._engine, name)

    @contextlib.contextmanager
    def batch(self, *args, **kwargs):
        with self._engine.batch(*args, **kwargs) as batch:
            yield GatedBatch(batch, self.gate)


@contextlib.contextmanager
def serving(engine, **options):
    """A server for `engine` on 127.0.0.1, a free port, until the block ends."""
    app = create_app(engine, model_name=MODEL, **options)
    with serve_in_thread(app, start_timeout=30, stop_timeout=30) as running:
        yield SimpleNamespace(url=running.url, port=running.port, server=running.server, thread=running.thread,
                              scheduler=app.state.scheduler, metrics=app.state.metrics)
    assert not running.thread.is_alive()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve-model")
    path = folder / "tiny-q8_0.gguf"
    convert(make_checkpoint(folder / "hf", preset="tiny", seed=2025), path, "q8_0", progress=False)
    return path


@pytest.fixture(scope="module")
def engine(tiny_model):
    eng = tide_local.load(tiny_model, device="cpu", threads=1)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def gated(engine):
    return GatedEngine(engine)


@pytest.fixture(scope="module")
def server(gated):
    with serving(gated, api_key=KEY, max_queue=64, defaults={"max_new_tokens": N}) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        yield c


@pytest.fixture
def gate(gated, server):
    """The gate, closed for the test (and open again after it); the server idle before and after."""
    assert server.scheduler.wait_idle(30)
    gated.gate.clear()
    try:
        yield gated.gate
    finally:
        gated.gate.set()
        assert server.scheduler.wait_idle(30)


def sse(response) -> list[dict | str]:
    """The events of a Server-Sent Events response: JSON objects, and "[DONE]"."""
    out = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def error_of(response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def ask(url: str, max_tokens: int = N) -> httpx.Response:
    """A chat request to a server without a key, answered whole."""
    return httpx.post(f"{url}/v1/chat/completions", json={"messages": USER, "max_tokens": max_tokens}, timeout=60)


@contextlib.contextmanager
def leaving_client(port: int, key: str | None = None):
    """A client that sends a chat request on a raw socket and, at the end of the block, leaves
    without reading the answer."""
    body = json.dumps({"messages": USER, "max_tokens": 200}).encode()
    auth = b"Authorization: Bearer %s\r\n" % key.encode() if key else b""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + auth
                     + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        yield


# -- answers ---------------------------------------------------------------------------------
def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    health = httpx.get(f"{server.url}/health")  # no key needed
    assert health.status_code == 200 and health.json() == {"status": "ok"}


def test_chat_equals_the_engine(client, http, engine):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sort: 5 3 9 1"},
                {"role": "assistant", "content": "1 3 5 9"}, {"role": "user", "content": "Reverse: apple pear fig"}]
    options = {"temperature": 0.7, "top_p": 0.9, "seed": 3}
    extra = {"threshold": 0.9, "steps": 16, "top_k": 20}
    direct = engine.chat(messages, max_new_tokens=40, **options, **extra)
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=40, **options, extra_body=extra)
    assert reply.choices[0].message.content == direct.text and reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason == "length"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == \
        (direct.stats.prompt_tokens, len(direct.tokens), direct.stats.prompt_tokens + len(direct.tokens))
    assert reply.tide["steps_per_block"] == list(direct.stats.steps_per_block)  # tide's statistics ride along

    raw = http.post("/v1/chat/completions", json={"messages": messages, "max_completion_tokens": 40, **options,
                                                  **extra}).json()
    assert set(raw) == {"id", "object", "created", "model", "choices", "usage", "tide"}
    assert raw["object"] == "chat.completion" and raw["model"] == MODEL and raw["id"].startswith("chatcmpl-")
    assert set(raw["choices"][0]) == {"index", "message", "logprobs", "finish_reason"}
    assert raw["choices"][0]["message"] == {"role": "assistant", "content": direct.text}


def test_chat_stream_is_the_whole_answer(client, http):
    whole = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=70)
    chunks = list(client.chat.completions.create(model=MODEL, messages=USER, max_tokens=70, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    parts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(parts) >= 2  # a chunk per finished block (70 tokens: 3 blocks)
    assert "".join(parts) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)

    with http.stream("POST", "/v1/chat/completions", json={"messages": USER, "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse(response)
    assert events[-1] == "[DONE]" and all("usage" not in e for e in events[:-1])  # no usage unless asked


def test_completions_text_ids_and_echo(client, engine):
    direct = engine.generate("The capital of France is", max_new_tokens=N)
    reply = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=N)
    assert reply.choices[0].text == direct.text and reply.object == "text_completion"
    assert reply.usage.completion_tokens == len(direct.tokens) == N

    ids = engine.tokenizer.encode("Reverse: apple pear fig")
    direct = engine.generate(ids, max_new_tokens=40)
    reply = client.completions.create(model=MODEL, prompt=ids, max_tokens=40, echo=True)
    prefix = engine.tokenizer.decode(ids)
    assert reply.choices[0].text == prefix + direct.text
    assert reply.usage.prompt_tokens == len(ids)
    streamed = list(client.completions.create(model=MODEL, prompt=ids, max_tokens=40, echo=True, stream=True))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == reply.choices[0].text
    assert streamed[0].choices[0].text == prefix  # the echo comes first


def test_stop_strings_cut_the_text(client):
    full = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=70).choices[0].message.content
    stop = full[40:43]
    expected = full[:full.find(stop)]
    reply = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=70, stop=[stop, "\x00never"])
    assert reply.choices[0].message.content == expected and reply.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(model=MODEL, messages=USER, max_tokens=70, stop=stop, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


class _Chars:
    """A tokenizer whose ids are characters."""

    @staticmethod
    def decode(ids):
        return "".join(map(chr, ids))


def test_answer_text_holds_back_a_possible_stop_string():
    text = AnswerText(_Chars(), ["STOP", "xy"])
    parts = [text.block([ord(c) for c in s]) for s in ("ab", "cST", "Od", "eSTO", "P!")]
    assert parts == ["ab", "c", "STOd", "e", ""] and text.stopped and text.text == "abcSTOde"
    text = AnswerText(_Chars(), ["STOP"])
    assert text.block([ord(c) for c in "abST"]) == "ab" and text.finish("abST") == "ST" and not text.stopped


# -- errors ----------------------------------------------------------------------------------
@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {}, "messages"),
    ("/v1/chat/completions", {"messages": USER, "temperature": "hot"}, "temperature"),
    ("/v1/chat/completions", {"messages": USER, "temperature": -1}, "temperature"),
    ("/v1/chat/completions", {"messages": USER, "max_tokens": 0}, "max_tokens"),
    ("/v1/chat/completions", {"messages": USER, "max_completion_tokens": 2.5}, "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": USER, "top_p": 0}, "top_p"),
    ("/v1/chat/completions", {"messages": USER, "seed": -1}, "seed"),
    ("/v1/chat/completions", {"messages": USER, "stop": ["a", ""]}, "stop"),
    ("/v1/chat/completions", {"messages": USER, "n": 2}, "n"),
    ("/v1/chat/completions", {"messages": USER, "steps": 0}, "steps"),
    ("/v1/chat/completions", {"messages": USER, "block_length": 16}, "block_length"),
    ("/v1/chat/completions", {"messages": USER, "stream": "yes"}, "stream"),
    ("/v1/chat/completions", {"messages": USER, "stream_options": {"include_usage": 1}},
     "stream_options.include_usage"),
    ("/v1/completions", {"prompt": [1, 10 ** 9]}, "prompt"),
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {"prompt": 5}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "echo": "yes"}, "echo"),
])
def test_a_bad_field_is_a_400_naming_it(http, path, body, param):
    response = http.post(path, json=body)
    assert response.status_code == 400
    error = error_of(response)
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]


def test_unknown_fields_are_ignored_and_bad_json_is_a_400(http):
    response = http.post("/v1/chat/completions", json={"messages": USER, "frequency_penalty": 0, "user": "u"})
    assert response.status_code == 200
    response = http.post("/v1/chat/completions", content=b'{"messages": [',
                         headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and "JSON" in error_of(response)["message"]


def test_context_length_exceeded(client, http):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=USER, max_tokens=10 ** 6)
    assert err.value.code == "context_length_exceeded" and err.value.param == "max_tokens"
    response = http.post("/v1/completions", json={"prompt": "word " * 5000, "max_tokens": 4})
    assert response.status_code == 400
    assert error_of(response)["code"] == "context_length_exceeded" and error_of(response)["param"] == "prompt"


def test_api_key(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}):
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("GET", "/metrics")):
            response = httpx.request(method, server.url + path, headers=headers, json={"messages": USER})
            assert response.status_code == 401 and error_of(response)["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()


def test_unknown_model_and_path_are_404(client, http):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4", messages=USER)
    assert err.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    for path in ("/v1/nothing", "/v2/chat/completions"):
        response = http.get(path)
        assert response.status_code == 404 and error_of(response)["code"] == "not_found"


def test_a_body_over_4_mib_is_a_413(http):
    big = b'{"messages": [], "pad": "' + b"x" * (4 << 20) + b'"}'
    response = http.post("/v1/chat/completions", content=big, headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and error_of(response)["code"] == "request_too_large"
    chunked = http.post("/v1/chat/completions", content=iter([big[:1 << 20]] * 5),  # no Content-Length
                        headers={"Content-Type": "application/json"})
    assert chunked.status_code == 413 and error_of(chunked)["code"] == "request_too_large"


def test_a_full_queue_is_a_429(gated, gate):
    with serving(gated, max_queue=1) as small:  # no key: none asked
        scheduler = small.scheduler
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(ask, small.url)
            until(lambda: scheduler.running)  # decoding, held at the gate
            second = pool.submit(ask, small.url)
            until(lambda: scheduler.waiting == 1)
            refused = ask(small.url)
            assert refused.status_code == 429 and error_of(refused)["code"] == "queue_full"
            assert refused.headers["retry-after"] == "1"
            gate.set()
            assert first.result().status_code == second.result().status_code == 200
        metrics = httpx.get(f"{small.url}/metrics").text
        assert 'tide_requests_total{endpoint="/v1/chat/completions",status="429"} 1' in metrics


def test_a_waiting_client_that_leaves_gives_its_place_up(gated, gate):
    with serving(gated, max_queue=1) as small, ThreadPoolExecutor(2) as pool:
        first = pool.submit(ask, small.url)
        until(lambda: small.scheduler.running)
        with leaving_client(small.port):
            until(lambda: small.scheduler.waiting == 1)
        until(lambda: small.scheduler.waiting == 0)  # its client left
        third = pool.submit(ask, small.url)  # takes the place (max_queue 1) instead of a 429
        until(lambda: small.scheduler.waiting == 1)
        gate.set()
        assert first.result().status_code == third.result().status_code == 200
        assert small.scheduler.wait_idle(30)
        assert small.metrics.generations == {"length": 2}  # the one that left was never decoded
        until(lambda: small.metrics.requests["/v1/chat/completions", 499] == 1)


def test_stopping_cancels_the_running_request_and_refuses_the_waiting(gated, gate):
    with serving(gated, max_queue=4) as srv, ThreadPoolExecutor(2) as pool:
        running = pool.submit(ask, srv.url, 40)
        until(lambda: srv.scheduler.running)
        waiting = pool.submit(ask, srv.url, 40)
        until(lambda: srv.scheduler.waiting == 1)
        srv.server.should_exit = True  # what Ctrl+C and SIGTERM do
        until(lambda: srv.scheduler.closed)
        gate.set()
        for answer in (running.result(), waiting.result()):
            assert answer.status_code == 503 and error_of(answer)["code"] == "server_shutting_down"
        srv.thread.join(30)
        assert srv.metrics.generations["cancelled"] == 1


# -- cancellation ----------------------------------------------------------------------------
def assert_cancelled_by_disconnect(server, job, gate, cancelled_before: int) -> None:
    """`job`'s client left: its decode (held at the gate) ends cancelled and the worker is free."""
    until(lambda: job.cancel_reason == "disconnect")
    gate.set()
    assert server.scheduler.wait_idle(30)
    assert server.metrics.generations["cancelled"] == cancelled_before + 1


def test_a_stream_closed_after_its_first_chunk_cancels_its_decode(gate, server, client):
    before = server.metrics.generations["cancelled"]
    with httpx.Client(timeout=60) as own, \
            own.stream("POST", f"{server.url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                       json={"messages": USER, "max_tokens": 200, "stream": True}) as response:
        lines = response.iter_lines()  # kept: dropping the iterator closes the connection
        assert json.loads(next(lines)[len("data: "):])["choices"][0]["delta"]["role"] == "assistant"
        until(lambda: server.scheduler.running)
        job = server.scheduler.running_jobs()[0]
    # the stream and its own connection are closed, the decode held at the gate
    assert_cancelled_by_disconnect(server, job, gate, before)
    reply = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=N)  # the worker is free
    assert reply.usage.completion_tokens == N


def test_a_client_gone_before_the_answer_cancels_its_decode(gate, server):
    before = server.metrics.generations["cancelled"]
    gone = server.metrics.requests["/v1/chat/completions", 499]
    with leaving_client(server.port, KEY):
        until(lambda: server.scheduler.running)
        job = server.scheduler.running_jobs()[0]
    assert_cancelled_by_disconnect(server, job, gate, before)
    until(lambda: server.metrics.requests["/v1/chat/completions", 499] == gone + 1)  # counted as nginx does


# -- metrics and load ------------------------------------------------------------------------
def test_metrics(client, http, server):
    client.chat.completions.create(model=MODEL, messages=USER, max_tokens=N)
    assert server.scheduler.wait_idle(30)  # the worker ends its decode just after the answer is sent
    response = http.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    for line in ('tide_requests_total{endpoint="/v1/chat/completions",status="200"}', "tide_queue_depth 0",
                 "tide_requests_running 0", 'tide_generations_total{finish_reason="length"}',
                 "tide_prompt_tokens_total", "tide_completion_tokens_total", "tide_steps_total",
                 'tide_decode_seconds_bucket{le="+Inf"}', "tide_decode_seconds_count"):
        assert line in text, line
    assert "tide_offload_hits_total" not in text  # a CPU engine has no offload
    counted = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if not line.startswith("#")}
    assert counted["tide_completion_tokens_total"] >= N


def test_offload_counters_with_a_device(tiny_model):
    with tide_local.load(tiny_model, device="emulated", threads=2) as eng, serving(eng) as srv:
        reply = ask(srv.url).json()
        offload = reply["tide"]["offload"]
        assert offload["hits"] + offload["misses"] > 0 and "per_step" not in offload  # the per-pass log stays out
        assert srv.scheduler.wait_idle(30)
        text = httpx.get(f"{srv.url}/metrics").text
        for name in ("hits", "misses", "uploads"):
            assert f"tide_offload_{name}_total {offload[name]}" in text


def load_40_requests_8_at_a_time(client, engine):
    requests = [{"messages": [{"role": "user", "content": f"request {i}"}], "max_tokens": N + 8 * (i % 3),
                 **({"temperature": 0.8, "seed": i} if i % 2 else {})} for i in range(40)]
    solo = [engine.chat(r["messages"], max_new_tokens=r["max_tokens"], temperature=r.get("temperature"),
                        seed=r.get("seed")).text for r in requests]
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda r: client.chat.completions.create(model=MODEL, **r), requests))
    assert [r.choices[0].message.content for r in replies] == solo  # none lost, failed or mixed
    assert [r.usage.completion_tokens for r in replies] == [r["max_tokens"] for r in requests]


def test_load_40_requests_8_at_a_time(client, engine):
    load_40_requests_8_at_a_time(client, engine)


def test_batched_requests_decode_together_and_answer_as_alone(tiny_model, engine):
    with tide_local.load(tiny_model, device="cpu", threads=1, max_batch=4) as batched, \
            serving(batched, max_queue=64) as srv:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none", max_retries=0, timeout=60)
        load_40_requests_8_at_a_time(client, engine)  # answers equal the unbatched engine's
        assert srv.scheduler.wait_idle(30)
        text = httpx.get(f"{srv.url}/metrics").text
    counted = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if not line.startswith("#")}
    steps = counted["tide_step_seconds_count"]
    assert steps == counted["tide_batch_size_count"] > 0
    assert counted['tide_batch_size_bucket{le="1"}'] < steps  # forwards carried several requests
    assert counted["tide_batch_size_sum"] / steps > 1.5 and counted['tide_batch_size_bucket{le="4"}'] == steps
    assert counted["tide_rows_per_expert_sum"] / steps >= 1 and counted["tide_forwarded_rows_total"] >= 32 * steps


# -- the command and the example -------------------------------------------------------------
def test_the_example_client_runs_against_the_server(server, capsys):
    spec = importlib.util.spec_from_file_location("openai_client", ROOT / "examples" / "openai_client.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    for extra in ([], ["--no-stream"]):
        assert example.main(["Sort: 5 3 9 1", "--base-url", f"{server.url}/v1", "--api-key", KEY,
                             "--max-tokens", str(N), *extra]) == 0
        out, err = capsys.readouterr()
        assert out.strip() and f"[{MODEL}: " in err and f"{N} completion tokens" in err


@pytest.mark.parametrize("argv, message", [
    ([], "no model given"),
    (["-m", "missing.gguf"], "no such file: missing.gguf"),
    (["--demo", "--port", "70000"], "--port must be between 0 and 65535"),
    (["--demo", "--max-queue", "0"], "--max-queue must be between 1"),
    (["--demo", "--max-batch", "0"], "--max-batch must be between 1 and 256"),
    (["--demo", "--api-key", " "], "--api-key is empty"),
    (["--demo", "--temperature", "-1"], "--temperature must be >= 0"),
    (["-m", "missing.gguf", "--threads", "0"], "--threads must be between 1 and"),
    (["-m", "missing.gguf", "--ctx", "1"], "--ctx must be between 32 and"),
])
def test_command_line_mistakes_are_one_line(argv, message, capsys):
    assert serve_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tide serve: error: {message}") and err.count("\n") == 1


def test_an_unusable_address_is_one_line(tiny_model, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert serve_cli.main(["-m", str(tiny_model), "--port", str(taken.getsockname()[1])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tide serve: error: cannot listen on http://127.0.0.1:") and err.count("\n") == 1
    assert serve_cli.main(["-m", str(tiny_model), "--host", "no.such.host.invalid"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tide serve: error: --host no.such.host.invalid: ") and err.count("\n") == 1


def test_tide_serve_starts_serves_and_stops_on_sigterm(tiny_model, tmp_path):
    env = {**os.environ, "TIDE_API_KEY": KEY, "TIDE_CACHE_DIR": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "tide_local", "serve", "-m", str(tiny_model), "--port", "0",
                             "--threads", "1", "-n", str(N)], stderr=subprocess.PIPE, text=True, env=env)
    watchdog = threading.Timer(120, proc.kill)  # a hung start fails the test instead of hanging it
    watchdog.start()
    try:
        line = proc.stderr.readline()
        assert line.startswith("serving tiny-q8_0 at http://127.0.0.1:") and line.rstrip().endswith("/v1"), line
        base = line.split(" at ")[1].strip()
        reply = openai.OpenAI(base_url=base, api_key=KEY, max_retries=0).chat.completions.create(
            model="tiny-q8_0", messages=USER)
        assert reply.usage.completion_tokens == N  # the command line's -n is the default
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert proc.stderr.read() == ""  # a quiet stop
    finally:
        watchdog.cancel()
        proc.kill()
        proc.wait()
