"""OpenAI's Responses API (`POST /v1/responses`) through the openai client: the answer equals the chat request it
stands for, whole or streamed (the events add up to the final response); instructions, multi-turn input with
function calls and their outputs, function tools, text formats, reasoning items; what is not supported is refused
by name."""

from __future__ import annotations

import json

import openai
import pytest

from softprompt import Request, SamplingParams
from softprompt.engine.server.app import ServerConfig
from softprompt.engine.server.registry import PromptRegistry
from softprompt.engine.server.responses import ResponseStore

from .support import TOOLS_TEMPLATE, UNIT_SCHEMA, RunningServer, make_engine

UNIT = UNIT_SCHEMA
TOOLS = [{"type": "function", "name": "get_weather", "description": "the weather", "parameters": UNIT},
         {"type": "function", "name": "get_time"}]


@pytest.fixture(scope="module")
def server(model_dir_for, adapter_for):
    engine = make_engine(model_dir_for("llama"))
    engine.tokenizer.set_chat_template(TOOLS_TEMPLATE)
    registry = PromptRegistry()
    registry.register(engine, "a", adapter_for("llama", seed=0, num_virtual_tokens=8))
    running = RunningServer(engine, registry, ServerConfig(tool_call_parser="hermes", reasoning_parser="deepseek_r1"))
    yield running
    running.stop()


def generated(server, messages, max_new_tokens, prompt=None, tools=None) -> str:
    def run(engine):
        [out] = engine.generate([Request(prompt=prompt, messages=messages, tools=tools,
                                         sampling=SamplingParams(max_new_tokens=max_new_tokens))])
        return out.text
    return server.call(run)


def test_a_text_answer_whole_and_streamed(server):
    client = server.openai()
    kw = dict(model="a", input="what is 2 + 2?", instructions="be brief", max_output_tokens=6, temperature=0,
              extra_body={"include_reasoning": True})
    whole = client.responses.create(**kw)
    text = generated(server, [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is 2 + 2?"}],
                     6, prompt="a.v1")  # (the registry names its engine prompt by version)
    # deepseek_r1: a random model never closes its thought, so the whole answer is reasoning
    [item] = whole.output
    assert item.type == "reasoning" and item.content[0].text == text and whole.output_text == ""
    assert whole.status == "incomplete" and whole.incomplete_details.reason == "max_output_tokens"
    assert whole.usage.output_tokens == 6 and whole.usage.input_tokens > 0
    assert whole.id.startswith("resp") and whole.instructions == "be brief" and whole.model == "a"
    events = list(client.responses.create(**kw, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert kinds[-1] == "response.incomplete" and [e.sequence_number for e in events] == list(range(len(events)))
    thought = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    final = events[-1].response
    assert thought == text and final.output[0].content[0].text == text and final.usage.output_tokens == 6


def test_a_message_answer_and_a_json_format(server):
    client = server.openai()
    kw = dict(model="base", input=[{"role": "user", "content": [{"type": "input_text", "text": "hi"}]}],
              max_output_tokens=30, temperature=0,
              text={"format": {"type": "json_schema", "name": "u", "schema": UNIT}},
              extra_body={"structured_outputs": {"disable_any_whitespace": True}})
    whole = client.responses.create(**kw)  # constrained: all answer, no thought
    [item] = whole.output
    assert item.type == "message" and item.role == "assistant" and whole.status == "completed"
    assert json.loads(whole.output_text)["unit"] in ("celsius", "fahrenheit")
    events = list(client.responses.create(**kw, stream=True))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == whole.output_text
    done = [e for e in events if e.type == "response.output_item.done"]
    assert len(done) == 1 and done[0].item.content[0].text == whole.output_text
    assert events[-1].type == "response.completed" and events[-1].response.output_text == whole.output_text


def test_function_tools_and_a_conversation_with_calls(server):
    client = server.openai()
    history = [{"role": "user", "content": "weather?"},
               {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"unit": "celsius"}'},
               {"type": "function_call_output", "call_id": "c1", "output": "20"},
               {"role": "user", "content": "and the time?"}]
    kw = dict(model="base", input=history, tools=TOOLS, max_output_tokens=40, temperature=0,
              tool_choice={"type": "function", "name": "get_weather"},
              extra_body={"structured_outputs": {"disable_any_whitespace": True}, "return_token_ids": True})
    whole = client.responses.create(**kw)
    [call] = whole.output
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id.startswith("chatcmpl-tool-")
    assert json.loads(call.arguments)["unit"] in ("celsius", "fahrenheit")
    # the conversation rendered as the chat request it stands for
    tokenized = server.client().post("/tokenize", json={"model": "base", "tools": [
        {"type": "function", "function": {k: v for k, v in t.items() if k != "type"}} for t in TOOLS], "messages": [
        history[0], {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "20"}, history[3]]}).json()["tokens"]
    text = server.call(lambda e: e.tokenizer.decode(tokenized))
    assert '<tool_call>{"name": "get_weather", "arguments": {"unit": "celsius"}}</tool_call>' in text
    assert "tool: 20 (for c1)" in text and text.startswith("tools: get_weather(function) get_time(function)")
    events = list(client.responses.create(**kw, stream=True))
    added = [e for e in events if e.type == "response.output_item.added"]
    assert len(added) == 1 and added[0].item.type == "function_call" and added[0].item.name == "get_weather"
    arguments = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert arguments == call.arguments
    assert events[-1].type == "response.completed" and events[-1].response.output[0].arguments == call.arguments


def test_auto_tool_calls_come_as_function_call_items(server):
    client = server.openai()
    answer = r'</think>Checking\. <tool_call>\{"name": "get_time", "arguments": \{\}\}</tool_call>'
    kw = dict(model="base", input="time?", tools=TOOLS, max_output_tokens=80, temperature=0,
              extra_body={"guided_regex": answer})
    whole = client.responses.create(**kw)  # (a regex constrains it: all answer, the "</think>" kept as text)
    message, call = whole.output
    assert message.type == "message" and message.content[0].text == "</think>Checking. "
    assert call.type == "function_call" and (call.name, call.arguments) == ("get_time", "{}")
    events = list(client.responses.create(**kw, stream=True))
    assert [e.item.type for e in events if e.type == "response.output_item.done"] == ["message", "function_call"]
    assert [o.type for o in events[-1].response.output] == ["message", "function_call"]


@pytest.mark.parametrize("body, param", [
    ({"background": True}, "background"),
    ({"tools": [{"type": "web_search"}]}, "tools"),
    ({"text": {"format": {"type": "xml"}}}, "text"),
    ({"input": [{"type": "input_image", "image_url": "x"}]}, "input"),
    ({"input": [{"role": "user", "content": [{"type": "input_image"}]}]}, "input"),
    ({"input": [{"role": "robot", "content": "x"}]}, "input"),
    ({"tool_choice": {"type": "mcp"}, "tools": TOOLS}, "tool_choice"),
], ids=["background", "web-search", "xml", "image-item", "image-part", "role", "tool-choice"])
def test_what_is_not_supported_is_refused_by_name(server, body, param):
    r = server.client().post("/v1/responses", json={"model": "base", "input": "x", "max_output_tokens": 2, **body})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert server.client().post("/v1/responses", json={"model": "base", "input": "x",
                                                       "max_output_tokens": 2}).status_code == 200
    server.assert_pool_empty()


def test_an_invalid_tool_is_a_schema_error(server):
    r = server.client().post("/v1/responses", json={"model": "base", "input": "x", "tools": [
        {"type": "function", "name": "has space"}]})
    assert r.status_code == 422 and r.json()["error"]["param"].startswith("tools"), r.text


def test_instructions_and_system_messages_make_one_first_system_turn(server):
    body = {"model": "base", "instructions": "be brief", "max_output_tokens": 3, "temperature": 0,
            "return_token_ids": True,
            "input": [{"role": "user", "content": "hi"}, {"role": "developer", "content": "use French"}]}
    got = server.client().post("/v1/responses", json=body).json()
    assert got["object"] == "response"
    want = server.client().post("/tokenize", json={"model": "base", "messages": [
        {"role": "system", "content": "be brief\n\nuse French"}, {"role": "user", "content": "hi"}]}).json()["tokens"]
    chat = server.client().post("/v1/chat/completions", json={
        "model": "base", "max_tokens": 3, "temperature": 0, "return_token_ids": True,
        "messages": [{"role": "system", "content": "be brief\n\nuse French"}, {"role": "user", "content": "hi"}]})
    assert chat.json()["choices"][0]["prompt_token_ids"] == want
    assert got["output"][0]["content"][0]["text"] == chat.json()["choices"][0]["message"]["reasoning"]


def test_previous_response_id_continues_a_stored_conversation(server):
    client = server.openai()
    first = client.responses.create(model="base", input="hi", instructions="be brief", max_output_tokens=20,
                                    extra_body={"guided_regex": "a reply"})  # (constrained: all answer)
    assert first.output_text == "a reply" and first.store is True
    kw = dict(model="base", max_output_tokens=5, temperature=0)
    follow = client.responses.create(**kw, previous_response_id=first.id, input="and then?")
    whole = client.responses.create(**kw, input=[{"role": "user", "content": "hi"},
                                                 {"role": "assistant", "content": "a reply"},
                                                 {"role": "user", "content": "and then?"}])
    # the same conversation (the first response's instructions are not carried over, as in OpenAI's API)
    assert follow.output[0].content[0].text == whole.output[0].content[0].text
    assert follow.previous_response_id == first.id and follow.usage.input_tokens == whole.usage.input_tokens
    third = client.responses.create(**kw, previous_response_id=follow.id, input="more")  # a chain
    assert third.usage.input_tokens > follow.usage.input_tokens
    # streamed ones are stored too; retrieve and delete find them
    streamed = list(client.responses.create(model="base", input="x", max_output_tokens=2, stream=True))[-1].response
    assert client.responses.retrieve(streamed.id).output[0].content[0].text == streamed.output[0].content[0].text
    assert client.responses.retrieve(first.id).output_text == "a reply"
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(**kw, previous_response_id=first.id, input="x")
    unstored = client.responses.create(**kw, input="x", store=False)
    assert unstored.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


def test_the_store_keeps_the_last_responses():
    store = ResponseStore(2)
    for name in ("a", "b"):
        store.put({"id": name}, [])
    store.get("a")  # used: b is now the oldest
    store.put({"id": "c"}, [])
    assert [k for k in ("a", "b", "c") if store.get(k)] == ["a", "c"]
    assert store.delete("a") and not store.delete("a")
    ResponseStore(0).put({"id": "x"}, [])  # 0: nothing kept
