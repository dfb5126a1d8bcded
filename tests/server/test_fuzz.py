"""Fuzzed request bodies: every one gets an answer below 500 (bad ones a 4xx with an OpenAI error body), the
server stays up, and good requests running beside the fuzzing are unaffected."""

from __future__ import annotations

import base64
import json
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from softprompt import Request, SamplingParams



SCALARS = (st.none() | st.booleans() | st.integers(-(2**65), 2**65) | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=12))
JSON = st.recursive(SCALARS, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
                    max_leaves=8)
MODELS = st.sampled_from(["a", "b", "base", "polite", "missing", "a@1", "a@7", "a@", "@", "", "../a", "a/b"])
# well-typed values (these reach the engine's own validation); bodies() mixes in junk of any JSON type
SAMPLING = {
    "model": MODELS,
    "max_tokens": st.integers(-3, 6) | st.integers(2**62, 2**66),
    "temperature": st.floats(-1, 3) | st.sampled_from([0, 1, float("nan"), float("inf")]),
    "top_p": st.floats(-0.5, 1.5) | st.sampled_from([0, 1, float("nan")]),
    "top_k": st.integers(-3, 600),
    "n": st.integers(-1, 3) | st.integers(129, 10**6),
    "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=20),
    "seed": st.integers(-(2**64), 2**64),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "ignore_eos": st.booleans(),
    "stop_token_ids": st.lists(st.integers(-2, 2**64), max_size=3),
    "presence_penalty": st.sampled_from([0, 0.0, 1, -2.5, float("nan")]) | st.floats(-3, 3),
    "frequency_penalty": st.floats(-3, 3) | st.sampled_from([float("inf")]),
    "repetition_penalty": st.floats(-1, 3) | st.sampled_from([0, float("nan")]),
    "min_p": st.floats(-0.5, 1.5),
    "min_tokens": st.integers(-2, 8),
    "logit_bias": st.dictionaries(st.text(max_size=3) | st.integers(-2, 700).map(str),
                                  st.integers(-150, 150) | st.floats(allow_nan=True), max_size=3),
    "return_token_ids": st.booleans(),
}
COMPLETION = {
    **SAMPLING,
    "prompt": (st.text(max_size=30) | st.lists(st.integers(-5, 600), max_size=12)
               | st.lists(st.lists(st.integers(0, 511), max_size=4), max_size=3)
               | st.lists(st.text(max_size=8), max_size=3)),
    "logprobs": st.integers(-2, 25),
    "echo": st.booleans(),
    "best_of": st.integers(-1, 3),
    "suffix": st.text(max_size=3),
}
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]),
                                 "content": st.text(max_size=20) | st.lists(st.fixed_dictionaries(
                                     {"type": st.sampled_from(["text", "image"]), "text": st.text(max_size=5)}),
                                     max_size=2)})
TOOL = st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
    {"name": st.sampled_from(["f", "g", "not a name"])},
    optional={"parameters": st.just({"type": "object", "properties": {"x": {"enum": [1, 2]}}}) | JSON})})
CHAT = {**SAMPLING, "messages": st.lists(MESSAGE | JSON, max_size=3), "logprobs": st.booleans(),
        "top_logprobs": st.integers(-2, 25), "max_completion_tokens": st.integers(-2, 6),
        "tools": st.lists(TOOL | JSON, max_size=2), "parallel_tool_calls": st.booleans(),
        "include_reasoning": st.booleans(),
        "tool_choice": st.sampled_from(["none", "auto", "required"]) | JSON | st.fixed_dictionaries(
            {"type": st.just("function"), "function": st.fixed_dictionaries({"name": st.sampled_from(["f", "g"])})})}
ITEM = (MESSAGE | st.fixed_dictionaries({"type": st.just("function_call"), "call_id": st.text(max_size=4),
                                         "name": st.sampled_from(["f", "g"]), "arguments": st.text(max_size=8)})
        | st.fixed_dictionaries({"type": st.just("function_call_output"), "call_id": st.text(max_size=4),
                                 "output": st.text(max_size=8) | JSON}))
RESPONSES = {**{k: v for k, v in SAMPLING.items() if k != "max_tokens"},
             "input": st.text(max_size=20) | st.lists(ITEM | JSON, max_size=3),
             "instructions": st.text(max_size=10), "max_output_tokens": st.integers(-2, 6),
             "tools": st.lists(st.fixed_dictionaries({"type": st.sampled_from(["function", "web_search"]),
                                                      "name": st.sampled_from(["f", "g", "not a name"])}) | JSON,
                               max_size=2),
             "tool_choice": st.sampled_from(["none", "auto", "required"]) | JSON,
             "text": st.fixed_dictionaries({"format": st.fixed_dictionaries(
                 {"type": st.sampled_from(["text", "json_object", "json_schema", "xml"])})}) | JSON,
             "previous_response_id": st.text(max_size=4), "background": st.booleans(),
             "top_logprobs": st.integers(-1, 3)}
BLOCK = (st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=8)})
         | st.fixed_dictionaries({"type": st.just("tool_use"), "id": st.text(max_size=4), "name": st.just("f"),
                                  "input": JSON})
         | st.fixed_dictionaries({"type": st.just("tool_result"), "tool_use_id": st.text(max_size=4),
                                  "content": st.text(max_size=8) | JSON}) | JSON)
ANTHROPIC = {"model": MODELS, "max_tokens": st.integers(-2, 6),
             "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system"]),
                                                         "content": st.text(max_size=12) | st.lists(BLOCK, max_size=3)})
                                  | JSON, max_size=3),
             "system": st.text(max_size=8) | st.lists(BLOCK, max_size=2), "stop_sequences": st.lists(
                 st.text(max_size=3), max_size=3), "temperature": st.floats(-1, 2), "top_k": st.integers(-2, 50),
             "stream": st.booleans(), "tools": st.lists(st.fixed_dictionaries(
                 {"name": st.sampled_from(["f", "bad name"]), "input_schema": st.just({"type": "object"}) | JSON})
                 | JSON, max_size=2),
             "tool_choice": st.fixed_dictionaries({"type": st.sampled_from(["auto", "any", "tool", "none", "x"])},
                                                  optional={"name": st.sampled_from(["f", "g"])}) | JSON}
REQUIRED = {"model", "prompt", "messages", "input"}


def bodies(fields: dict) -> st.SearchStrategy:
    """Well-typed bodies (required fields present, any subset of the others), the same with junk values of
    any JSON type and stray keys, and bodies that are not objects at all."""
    required = {k: v for k, v in fields.items() if k in REQUIRED}
    optional = {k: v for k, v in fields.items() if k not in REQUIRED}
    typed = st.fixed_dictionaries(required, optional=optional)
    junk = st.fixed_dictionaries({}, optional={k: v | JSON for k, v in fields.items()})
    stray = st.dictionaries(st.text(max_size=6), JSON, max_size=2)
    return st.one_of(typed, typed, st.builds(lambda a, b: {**b, **a}, junk, stray), JSON)


def bounded(body):
    """Keep generation short: the fuzzer finds bad bodies, not long ones."""
    if isinstance(body, dict):
        for key in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
            if isinstance(body.get(key), int) and not isinstance(body[key], bool) and 6 < body[key] < 2**63:
                body[key] = 6
        if not {"max_tokens", "max_completion_tokens", "max_output_tokens"} & set(body):
            body["max_output_tokens" if "input" in body else "max_tokens"] = 4
    return body


def post(http, path: str, body):
    """JSON as Python writes it (NaN and Infinity included: the server's JSON parser accepts them)."""
    return http.post(path, content=json.dumps(body).encode(), headers={"content-type": "application/json"})


def check_response(r) -> None:
    assert r.status_code < 500, (r.status_code, r.text[:500])
    if r.status_code >= 400:
        err = r.json()["error"]
        assert isinstance(err["message"], str) and err["message"] and err["type"]
    elif r.headers["content-type"].startswith("text/event-stream"):
        events = [line for line in r.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]", r.text[-300:]
        assert all("error" not in json.loads(e[6:]) for e in events[:-1])
    else:
        assert r.json()["choices"]


@pytest.fixture(scope="module")
def good_traffic(served):
    """Greedy requests sent in a loop beside the fuzzing (bounded); each must equal Engine.generate."""
    specs = [("a", [5, 6, 7]), ("b", [9, 10]), ("base", [11]), ("polite", [12, 13, 14])]
    want = [o.token_ids for o in served.expected([
        Request(prompt=None if m == "base" else m, input_ids=ids, sampling=SamplingParams(max_new_tokens=5,
                                                                                          ignore_eos=True))
        for m, ids in specs])]
    stop, results = threading.Event(), {"ok": 0, "bad": []}

    def loop():
        with served.server.client() as http:
            for i in range(2000):
                if stop.is_set():
                    break
                model, ids = specs[i % len(specs)]
                r = http.post("/v1/completions", json={"model": model, "prompt": ids, "max_tokens": 5,
                                                       "temperature": 0, "ignore_eos": True,
                                                       "return_token_ids": True})
                got = r.json()["choices"][0]["token_ids"] if r.status_code == 200 else r.text
                if got == want[i % len(specs)]:
                    results["ok"] += 1
                else:
                    results["bad"].append((model, got))

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    yield results
    stop.set()
    thread.join(60)
    assert not thread.is_alive()


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@FUZZ
@given(body=bodies(COMPLETION))
def test_fuzz_completions(served, good_traffic, body):
    with served.server.client() as http:
        check_response(post(http, "/v1/completions", bounded(body)))


@FUZZ
@given(body=bodies(CHAT))
def test_fuzz_chat(served, good_traffic, body):
    with served.server.client() as http:
        check_response(post(http, "/v1/chat/completions", bounded(body)))


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(body=bodies(RESPONSES))
def test_fuzz_responses(served, good_traffic, body):
    with served.server.client() as http:
        r = post(http, "/v1/responses", bounded(body))
        assert r.status_code < 500, (r.status_code, r.text[:500])
        if r.status_code >= 400:
            assert r.json()["error"]["message"]
        elif r.headers["content-type"].startswith("text/event-stream"):
            events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
            assert events[-1]["type"] in ("response.completed", "response.incomplete"), r.text[-300:]
        else:
            assert r.json()["object"] == "response"


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(body=bodies(ANTHROPIC))
def test_fuzz_anthropic_messages(served, good_traffic, body):
    with served.server.client() as http:
        r = post(http, "/v1/messages", body)
        assert r.status_code < 500, (r.status_code, r.text[:500])
        if r.status_code >= 400:
            assert r.json()["error"]["message"]
        elif r.headers["content-type"].startswith("text/event-stream"):
            events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
            assert events[-1]["type"] == "message_stop", r.text[-300:]
        else:
            assert r.json()["type"] == "message"


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(raw=st.binary(max_size=64) | st.text(max_size=40).map(str.encode),
       ctype=st.sampled_from(["application/json", "text/plain", "multipart/form-data; boundary=x", ""]))
def test_fuzz_raw_bytes(served, good_traffic, raw, ctype):
    with served.server.client() as http:
        for path in ("/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/messages", "/v1/prompts"):
            r = http.post(path, content=raw, headers={"content-type": ctype} if ctype else {})
            assert 400 <= r.status_code < 500 and r.json()["error"]["message"], (path, r.status_code, r.text)


VALID_COMPLETION = st.fixed_dictionaries(
    {"model": st.sampled_from(["a", "b", "base", "polite", "a@1"]),
     "prompt": st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=20)
     | st.lists(st.integers(0, 511), min_size=1, max_size=12),
     "temperature": st.just(0)},
    optional={"max_tokens": st.integers(1, 6), "n": st.integers(1, 3), "logprobs": st.integers(0, 5),
              "stop": st.text(min_size=1, max_size=2) | st.lists(st.text(min_size=1, max_size=2), max_size=3),
              "stop_token_ids": st.lists(st.integers(0, 511), max_size=3), "ignore_eos": st.booleans(),
              "top_k": st.integers(0, 50)})


def read_stream(r) -> dict[int, str]:
    texts: dict[int, str] = {}
    for line in r.text.splitlines():
        if line.startswith("data: {"):
            for choice in json.loads(line[6:])["choices"]:
                texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    return texts


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(body=VALID_COMPLETION)
def test_fuzz_valid_bodies_succeed_and_stream_equals_whole(served, good_traffic, body):
    """Valid bodies always succeed, and (greedy) the streamed text equals the whole response's, stop strings
    and partial characters included."""
    body.setdefault("max_tokens", 4)
    with served.server.client() as http:
        whole = post(http, "/v1/completions", body)
        assert whole.status_code == 200, whole.text
        streamed = post(http, "/v1/completions", {**body, "stream": True})
        assert streamed.status_code == 200 and streamed.text.endswith("data: [DONE]\n\n")
    choices = whole.json()["choices"]
    assert len(choices) == body.get("n", 1)
    assert read_stream(streamed) == {c["index"]: c["text"] for c in choices}


NAMES = st.sampled_from(["fz", "fz-1", "fz.v2", "../fz", "fz/x", ".fz", "base", "", "fz@1", "a" * 120]) | JSON
FILES = st.dictionaries(st.sampled_from(["adapter_config.json", "adapter_model.safetensors", "p.safetensors",
                                         "adapter_model.bin", "../../x.safetensors", "README.md"]),
                        st.binary(max_size=40).map(lambda b: base64.b64encode(b).decode()) | JSON, max_size=3)
PROMPT_UPLOAD = {"name": NAMES, "text": st.text(max_size=10), "token_ids": st.lists(st.integers(-3, 600), max_size=4),
                 "files": FILES}


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(body=bodies(PROMPT_UPLOAD))
def test_fuzz_prompt_uploads(served, good_traffic, body):
    root = served.server.registry.prompt_dir
    outside = sorted(p.name for p in root.parent.iterdir())
    with served.server.client() as http:
        r = post(http, "/v1/prompts", body)
        assert r.status_code < 500, r.text
        if r.status_code == 201:
            assert r.json()["name"].startswith("fz") and http.delete(f"/v1/prompts/{r.json()['name']}").is_success
        else:
            assert r.json()["error"]["message"]
    assert sorted(p.name for p in root.parent.iterdir()) == outside
    assert not any((root / ".staging").iterdir()) if (root / ".staging").exists() else True


def test_server_up_and_good_traffic_unaffected(served, good_traffic):
    """Runs after the fuzzers in this module (same module fixture): the side traffic was all correct."""
    assert served.server.client().get("/health").json()["status"] == "ok"
    assert not good_traffic["bad"], good_traffic["bad"][:3]
    assert good_traffic["ok"] > 20
    served.server.assert_pool_empty()
    assert {m["id"] for m in served.server.client().get("/v1/models").json()["data"]} == {"base", "a", "b", "polite"}
    metrics = served.server.client().get("/metrics").text
    errors = [line for line in metrics.splitlines() if line.startswith("softprompt_http_requests_total{code=\"5")]
    assert not errors, errors  # not even one handled by the last-resort handler
