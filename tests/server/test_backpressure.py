"""Backpressure (429 with Retry-After beyond the bounded queue) and client disconnects aborting their requests."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from softprompt.engine.server.app import ServerConfig
from softprompt.engine.server.registry import PromptRegistry

from .support import RunningServer, make_engine
from .test_openai_api import _samples

LONG = {"model": "base", "prompt": [5, 6], "max_tokens": 240, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def slow(model_dir_for):
    """Two running sequences and one waiting at most; each engine step takes >= 10 ms (a slower model)."""
    engine = make_engine(model_dir_for("llama"), max_num_seqs=2)
    step = engine.step

    def slow_step():
        time.sleep(0.01)
        if server.fail_steps:
            raise RuntimeError("device lost")
        return step()

    engine.step = slow_step
    server = RunningServer(engine, PromptRegistry(), ServerConfig(max_queue=1, disconnect_poll_s=0.05))
    server.fail_steps = False
    yield server
    server.stop()


def aborted(server) -> float:
    return _samples(server.client().get("/metrics").text).get(
        'softprompt_requests_total{finish_reason="abort",task="base"}', 0.0)


def test_beyond_the_queue_429_with_retry_after(slow):
    http = slow.client()
    with http.stream("POST", "/v1/completions", json={**LONG, "n": 3, "stream": True}) as s:
        assert s.status_code == 200
        lines = s.iter_lines()  # kept: dropping the iterator would close the connection
        next(lines)  # the three are in (two running, one waiting)
        r = http.post("/v1/completions", json={**LONG, "max_tokens": 2})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_error" and "capacity" in r.json()["error"]["message"]
        r = http.post("/v1/messages", json={"model": "base", "max_tokens": 2,
                                            "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 429 and r.json()["type"] == "error"
        assert r.json()["error"]["type"] == "rate_limit_error"
        assert http.get("/health").json()["in_flight"] == 3
    slow.assert_pool_empty()  # leaving the stream aborted all three
    assert http.post("/v1/completions", json={**LONG, "max_tokens": 2}).status_code == 200
    r = http.post("/v1/completions", json={**LONG, "max_tokens": 2, "n": 4})  # could never fit
    assert r.status_code == 400 and "at most 3 at once" in r.json()["error"]["message"]
    metrics = _samples(http.get("/metrics").text)
    assert metrics['softprompt_rejected_requests_total{reason="queue_full"}'] == 2


def test_stream_disconnect_aborts_and_frees_kv(slow):
    before = aborted(slow)
    with slow.client() as http:
        with http.stream("POST", "/v1/completions", json={**LONG, "n": 2, "stream": True}) as s:
            lines = s.iter_lines()
            for _ in range(3):
                next(lines)
            assert slow.call(lambda e: len(e.scheduler.running)) == 2
    started = time.monotonic()
    slow.assert_pool_empty()
    assert time.monotonic() - started < 1.5  # far sooner than 240 tokens at >= 10 ms a step
    assert aborted(slow) == before + 2


def test_non_streaming_disconnect_aborts_too(slow):
    before = aborted(slow)
    with slow.client() as http:
        with pytest.raises(httpx.ReadTimeout):
            http.post("/v1/completions", json=LONG, timeout=0.4)
    slow.assert_pool_empty()
    assert aborted(slow) == before + 1


def test_an_engine_failure_fails_its_requests_not_the_server(slow):
    http = slow.client()
    slow.fail_steps = True
    try:
        r = http.post("/v1/completions", json={**LONG, "max_tokens": 3})
        assert r.status_code == 500 and "device lost" in r.json()["error"]["message"]
        with http.stream("POST", "/v1/completions", json={**LONG, "max_tokens": 3, "stream": True}) as s:
            events = [line for line in s.iter_lines() if line.startswith("data: ")]
        assert s.status_code == 200 and "device lost" in events[-1] and '"error"' in events[-1]
        # Anthropic's Messages API: its error shape, whole and as the stream's `error` event
        message = {"model": "base", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}
        r = http.post("/v1/messages", json=message)
        assert r.status_code == 500 and r.json()["type"] == "error", r.text
        assert r.json()["error"]["type"] == "api_error" and "device lost" in r.json()["error"]["message"]
        with http.stream("POST", "/v1/messages", json={**message, "stream": True}) as s:
            lines = list(s.iter_lines())
        assert lines[-3:-1] == ["event: error", lines[-2]] and json.loads(lines[-2][6:])["type"] == "error"
        assert json.loads(lines[-2][6:])["error"]["type"] == "api_error"
        # the Responses API's `error` event
        with http.stream("POST", "/v1/responses", json={"model": "base", "input": "hi", "max_output_tokens": 3,
                                                          "stream": True}) as s:
            events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: ")]
        assert events[-1]["type"] == "error" and "device lost" in events[-1]["message"]
        assert events[-1]["sequence_number"] == len(events) - 1
    finally:
        slow.fail_steps = False
    slow.assert_pool_empty()
    assert http.post("/v1/completions", json={**LONG, "max_tokens": 3}).status_code == 200
