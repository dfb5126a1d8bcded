"""Anthropic's Messages API (`POST /v1/messages`, `/v1/messages/count_tokens`) through the anthropic client: the
answer equals the chat request it stands for, whole or streamed (the events add up to the message); system
prompts, tool_use / tool_result turns, tools and tool_choice, stop sequences and Anthropic's stop reasons; the
client's x-api-key passes the API key check; what is not supported is refused by name."""

from __future__ import annotations

import json

import httpx
import pytest

from softprompt.engine.server.app import ServerConfig
from softprompt.engine.server.registry import PromptRegistry

from .support import TOOLS_TEMPLATE, UNIT_SCHEMA, RunningServer, make_engine

anthropic = pytest.importorskip("anthropic")

UNIT = UNIT_SCHEMA
TOOLS = [{"name": "get_weather", "description": "the weather", "input_schema": UNIT},
         {"name": "get_time", "input_schema": {"type": "object", "properties": {}}}]
KEY = "sk-test"
GREEDY = {"temperature": 0}  # (newer anthropic clients have no temperature argument: it goes in the body)


@pytest.fixture(scope="module")
def server(model_dir_for):
    engine = make_engine(model_dir_for("llama"))
    engine.tokenizer.set_chat_template(TOOLS_TEMPLATE)
    running = RunningServer(engine, PromptRegistry(), ServerConfig(tool_call_parser="hermes", api_key=KEY))
    yield running
    running.stop()


def client(server):
    try:  # the SDK's own HTTP package (httpx2 for anthropic >= 2.x), told to ignore proxy settings
        import httpx2 as http
    except ImportError:
        http = httpx
    return anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0, timeout=60,
                               http_client=http.Client(trust_env=False))


def chat(server, **body) -> dict:
    r = server.client(headers={"Authorization": f"Bearer {KEY}"}).post("/v1/chat/completions",
                                                                      json={"model": "base", **body})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def test_a_text_answer_whole_and_streamed(server):
    c = client(server)
    kw = dict(model="base", system="be brief", max_tokens=6, extra_body=GREEDY,
              messages=[{"role": "user", "content": [{"type": "text", "text": "what is 2 + 2?"}]}])
    whole = c.messages.create(**kw)
    want = chat(server, messages=[{"role": "system", "content": "be brief"},
                                  {"role": "user", "content": "what is 2 + 2?"}], max_tokens=6, temperature=0)
    assert [b.type for b in whole.content] == ["text"] and whole.content[0].text == want["message"]["content"]
    assert whole.stop_reason == "max_tokens" and whole.usage.output_tokens == 6 and whole.usage.input_tokens > 0
    assert whole.id.startswith("msg_") and whole.role == "assistant" and whole.model == "base"
    with c.messages.stream(**kw) as stream:
        events = list(stream)
        final = stream.get_final_message()
    kinds = [e.type for e in events]
    assert kinds[0] == "message_start" and "content_block_start" in kinds and "message_stop" in kinds
    assert final.content[0].text == whole.content[0].text and final.stop_reason == "max_tokens"
    assert c.messages.count_tokens(model="base", system="be brief", messages=kw["messages"]).input_tokens == \
        whole.usage.input_tokens


def test_stop_sequences_end_with_their_reason(server):
    c = client(server)
    text = chat(server, messages=[{"role": "user", "content": "hi"}], max_tokens=8, temperature=0)["message"]["content"]
    stop = text[3:5]  # two characters the greedy answer writes
    got = c.messages.create(model="base", max_tokens=8, extra_body=GREEDY, stop_sequences=[stop],
                            messages=[{"role": "user", "content": "hi"}])
    assert got.stop_reason == "stop_sequence" and got.stop_sequence == stop
    assert got.content[0].text == text[:text.index(stop)]


def test_tool_use_and_tool_results(server):
    c = client(server)
    history = [{"role": "user", "content": "weather?"},
               {"role": "assistant", "content": [{"type": "text", "text": "Let me look."},
                                                 {"type": "tool_use", "id": "t1", "name": "get_weather",
                                                  "input": {"unit": "celsius"}}]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "20"},
                                            {"type": "text", "text": "and the time?"}]}]
    kw = dict(model="base", max_tokens=40, tools=TOOLS, messages=history,
              tool_choice={"type": "tool", "name": "get_weather"},
              extra_body={**GREEDY, "structured_outputs": {"disable_any_whitespace": True}})
    whole = c.messages.create(**kw)
    [use] = whole.content
    assert use.type == "tool_use" and use.name == "get_weather" and use.input["unit"] in ("celsius", "fahrenheit")
    assert whole.stop_reason == "tool_use"
    # the conversation as the chat request it stands for
    tokens = server.client().post("/tokenize", json={"model": "base", "tools": [
        {"type": "function", "function": {"name": t["name"], "parameters": t["input_schema"]}} for t in TOOLS],
        "messages": [history[0], {"role": "assistant", "content": "Let me look.", "tool_calls": [
            {"id": "t1", "type": "function", "function": {"name": "get_weather", "arguments": '{"unit": "celsius"}'}}]},
            {"role": "tool", "tool_call_id": "t1", "content": "20"},
            {"role": "user", "content": "and the time?"}]}).json()["tokens"]
    assert c.messages.count_tokens(model="base", tools=TOOLS, messages=history).input_tokens == len(tokens)
    with c.messages.stream(**kw) as stream:
        events = list(stream)
        final = stream.get_final_message()
    partial = "".join(e.delta.partial_json for e in events if e.type == "content_block_delta"
                      and e.delta.type == "input_json_delta")
    assert json.loads(partial) == use.input and final.content[0].input == use.input
    assert final.stop_reason == "tool_use"


def test_auto_tool_use_after_text(server):
    c = client(server)
    answer = r'Checking\. <tool_call>\{"name": "get_time", "arguments": \{\}\}</tool_call>'
    got = c.messages.create(model="base", max_tokens=80, tools=TOOLS, messages=[{"role": "user", "content": "time?"}],
                            extra_body={**GREEDY, "guided_regex": answer})
    assert [b.type for b in got.content] == ["text", "tool_use"] and got.content[0].text == "Checking. "
    assert (got.content[1].name, got.content[1].input, got.stop_reason) == ("get_time", {}, "tool_use")


@pytest.mark.parametrize("body, param", [
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, "messages"),
    ({"messages": [{"role": "system", "content": "x"}]}, "messages"),
    ({"tools": [{"type": "web_search_20250305", "name": "w"}]}, "tools"),
    ({"tool_choice": {"type": "sometimes"}}, "tool_choice"),
], ids=["image", "role", "server-tool", "tool-choice"])
def test_what_is_not_supported_is_refused_by_name(server, body, param):
    http = server.client(headers={"x-api-key": KEY})
    r = http.post("/v1/messages", json={"model": "base", "max_tokens": 2,
                                        "messages": [{"role": "user", "content": "x"}], **body})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert r.json()["type"] == "error" and r.json()["error"]["type"] == "invalid_request_error"  # Anthropic's shape
    r = server.client().post("/v1/messages", json={"model": "base", "max_tokens": 2, "messages": [
        {"role": "user", "content": "x"}]})  # no key
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error" and r.json()["type"] == "error"
    with pytest.raises(anthropic.BadRequestError) as caught:  # the SDK reads it as Anthropic's
        client(server).messages.create(**{"model": "base", "max_tokens": 2,
                                          "messages": [{"role": "user", "content": "x"}], **body})
    assert caught.value.body["error"]["type"] == "invalid_request_error" and caught.value.body["type"] == "error"
    server.assert_pool_empty()
