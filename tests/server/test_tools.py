"""OpenAI tool calling on /v1/chat/completions, through the openai client: the tools reach the chat template, a
named or required tool_choice constrains the answer to the tools' schemas, "auto" answers are parsed with the
server's --tool-call-parser, streamed deltas add up to the unstreamed answer, and bad tool requests get 400s."""

from __future__ import annotations

import json

import pytest

from softprompt.engine.server.app import ServerConfig
from softprompt.engine.server.registry import PromptRegistry

from .support import TOOLS_TEMPLATE, UNIT_SCHEMA, RunningServer, make_engine

pytest.importorskip("xgrammar")

UNIT = UNIT_SCHEMA
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "the weather", "parameters": UNIT}},
         {"type": "function", "function": {"name": "get_time"}}]
MESSAGES = [{"role": "user", "content": "weather?"}]
COMPACT = {"structured_outputs": {"disable_any_whitespace": True}}  # a random model: keep its JSON short


@pytest.fixture(scope="module")
def servers(model_dir_for):
    """Servers with the hermes parser, with none, with mistral's, pythonic and qwen3_coder; each engine has the
    tools template."""
    running = []
    for parser in ("hermes", None, "mistral", "pythonic", "qwen3_coder"):
        engine = make_engine(model_dir_for("llama"))
        engine.tokenizer.set_chat_template(TOOLS_TEMPLATE)
        running.append(RunningServer(engine, PromptRegistry(), ServerConfig(tool_call_parser=parser)))
    yield running
    for server in running:
        server.stop()


def rendered(server, messages, tools=None) -> list[int]:
    def render(engine):
        hf = engine.tokenizer.hf
        text = hf.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
        return hf(text, add_special_tokens=False)["input_ids"]
    return server.call(render)


def test_tools_and_earlier_calls_reach_the_template(servers):
    server = servers[0]
    history = [*MESSAGES,
               {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
                   "name": "get_weather", "arguments": '{"unit": "celsius"}'}}]},
               {"role": "tool", "content": "20", "tool_call_id": "c1"}]
    as_template_reads_them = [history[0], {**history[1], "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"unit": "celsius"}}}]},
        history[2]]
    want = rendered(server, as_template_reads_them, TOOLS)
    http = server.client()
    tokenized = http.post("/tokenize", json={"model": "base", "messages": history, "tools": TOOLS}).json()
    assert tokenized["tokens"] == want
    text = server.call(lambda e: e.tokenizer.hf.decode(want))
    assert '"unit": "celsius"' in text and "get_time(" in text and "(for c1)" in text
    got = http.post("/v1/chat/completions", json={"model": "base", "messages": history, "tools": TOOLS,
                                                  "tool_choice": "none", "max_tokens": 2,
                                                  "return_token_ids": True}).json()
    assert "choices" in got, got
    assert got["choices"][0]["prompt_token_ids"] == want
    assert "tool_calls" not in got["choices"][0]["message"]  # "none": plain content


def test_a_named_tool_choice_answers_with_that_call(servers):
    client = servers[1].openai()  # no parser needed
    kw = dict(model="base", messages=MESSAGES, tools=TOOLS, max_tokens=40, temperature=0, extra_body=COMPACT,
              tool_choice={"type": "function", "function": {"name": "get_weather"}})
    whole = client.chat.completions.create(**kw)
    choice = whole.choices[0]
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather" and call.type == "function" and call.id.startswith("chatcmpl-tool-")
    assert json.loads(call.function.arguments)["unit"] in ("celsius", "fahrenheit")
    assert choice.message.content is None and choice.finish_reason == "stop"
    # streamed: one call whose argument deltas add up to the same arguments
    ids, name, arguments, reasons = set(), "", "", []
    for chunk in client.chat.completions.create(**kw, stream=True):
        for c in chunk.choices:
            reasons.append(c.finish_reason)
            for d in c.delta.tool_calls or ():
                assert d.index == 0
                ids.add(d.id) if d.id else None
                name += d.function.name or ""
                arguments += d.function.arguments or ""
    assert len(ids) == 1 and name == "get_weather" and arguments == call.function.arguments
    assert reasons[-1] == "stop"


@pytest.mark.parametrize("parallel", [True, False])
def test_a_required_tool_choice_answers_with_calls_of_the_tools(servers, parallel):
    client = servers[1].openai()
    kw = dict(model="base", messages=MESSAGES, tools=TOOLS, tool_choice="required", max_tokens=120, temperature=0,
              parallel_tool_calls=parallel, extra_body=COMPACT)
    choice = client.chat.completions.create(**kw).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert choice.message.tool_calls and (parallel or len(choice.message.tool_calls) == 1)
    for call in choice.message.tool_calls:
        arguments = json.loads(call.function.arguments)
        assert call.function.name in ("get_weather", "get_time")
        assert call.function.name == "get_time" or arguments["unit"] in ("celsius", "fahrenheit")
    streamed: dict[int, list[str]] = {}
    for chunk in client.chat.completions.create(**kw, stream=True):
        for d in chunk.choices[0].delta.tool_calls or () if chunk.choices else ():
            streamed.setdefault(d.index, ["", ""])
            streamed[d.index][0] += d.function.name or ""
            streamed[d.index][1] += d.function.arguments or ""
    assert [tuple(streamed[i]) for i in sorted(streamed)] == [(c.function.name, c.function.arguments)
                                                              for c in choice.message.tool_calls]


# "auto": the model chooses. A random model never writes a call by itself, so a regex spells one (or plain text)
HERMES_ANSWER = r'Let me check\. <tool_call>\{"name": "get_weather", "arguments": \{"unit": "celsius"\}\}</tool_call>'


@pytest.mark.parametrize("stream", [False, True])
def test_auto_answers_are_parsed_with_the_servers_parser(servers, stream):
    client = servers[0].openai()
    kw = dict(model="base", messages=MESSAGES, tools=TOOLS, max_tokens=150, temperature=0)  # tool_choice: auto
    if not stream:
        choice = client.chat.completions.create(**kw, extra_body={"guided_regex": HERMES_ANSWER}).choices[0]
        content, calls, reason = choice.message.content, choice.message.tool_calls, choice.finish_reason
        assert calls, choice
        calls = [(c.function.name, c.function.arguments) for c in calls]
        plain = client.chat.completions.create(**kw, extra_body={"guided_regex": "It is sunny"}).choices[0]
        assert plain.message.content == "It is sunny" and plain.message.tool_calls is None
        assert plain.finish_reason == "stop"
    else:
        content, built, reason = "", {}, None
        for chunk in client.chat.completions.create(**kw, stream=True, extra_body={"guided_regex": HERMES_ANSWER}):
            for c in chunk.choices:
                content += c.delta.content or ""
                reason = c.finish_reason or reason
                for d in c.delta.tool_calls or ():
                    call = built.setdefault(d.index, ["", ""])
                    call[0] += d.function.name or ""
                    call[1] += d.function.arguments or ""
        calls = [tuple(built[i]) for i in sorted(built)]
    assert content == "Let me check. " and reason == "tool_calls"
    assert [(n, json.loads(a)) for n, a in calls] == [("get_weather", {"unit": "celsius"})]


@pytest.mark.parametrize("server_index, body, param, match", [  # match None: a schema error
    (1, {"tools": TOOLS}, "tool_choice", "needs the server started with --tool-call-parser"),  # auto by default
    (0, {"tool_choice": "required"}, "tool_choice", "tool_choice needs tools"),
    (0, {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
     "'nope', which is not in tools"),
    (0, {"tools": TOOLS, "tool_choice": "required", "guided_regex": "a"}, "tool_choice", "no other structured"),
    (0, {"tools": [TOOLS[0], TOOLS[0]]}, "tools", "distinct function names"),
    (0, {"tools": [{"type": "retrieval"}]}, "tools", None),
    (0, {"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools", None),
    (0, {"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", None),
], ids=["auto-without-parser", "no-tools", "unknown-function", "two-constraints", "duplicate", "not-a-function",
        "bad-name", "bad-choice"])
def test_bad_tool_requests_are_refused_and_the_server_keeps_serving(servers, server_index, body, param, match):
    server = servers[server_index]
    http = server.client()
    r = http.post("/v1/chat/completions", json={"model": "base", "messages": MESSAGES, "max_tokens": 2, **body})
    assert r.status_code == (400 if match else 422), r.text  # 422: the body does not fit the schema
    error = r.json()["error"]
    assert param in (error["param"] or ""), error
    if match:
        assert match in error["message"]
    ok = http.post("/v1/chat/completions", json={"model": "base", "messages": MESSAGES, "max_tokens": 2})
    assert ok.status_code == 200
    server.assert_pool_empty()


def test_mistral_answers_and_their_short_ids(servers):
    client = servers[2].openai()
    answer = r'Sure\.\[TOOL_CALLS\]\[\{"name": "get_time", "arguments": \{\}\}\]'
    choice = client.chat.completions.create(model="base", messages=MESSAGES, tools=TOOLS, max_tokens=80,
                                            temperature=0, extra_body={"guided_regex": answer}).choices[0]
    [call] = choice.message.tool_calls
    assert (choice.message.content, call.function.name, call.function.arguments) == ("Sure.", "get_time", "{}")
    assert choice.finish_reason == "tool_calls" and len(call.id) == 9 and call.id.isalnum()
    named = client.chat.completions.create(model="base", messages=MESSAGES, tools=TOOLS, max_tokens=40,
                                           temperature=0, extra_body=COMPACT,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert len(named.choices[0].message.tool_calls[0].id) == 9  # whatever the tool_choice


def test_pythonic_answers(servers):
    client = servers[3].openai()
    kw = dict(model="base", messages=MESSAGES, tools=TOOLS, max_tokens=40, temperature=0)
    answer = r'\[get_weather\(unit="celsius"\), get_time\(\)\]'
    choice = client.chat.completions.create(**kw, extra_body={"guided_regex": answer}).choices[0]
    got = [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls]
    assert got == [("get_weather", {"unit": "celsius"}), ("get_time", {})] and choice.message.content is None
    assert choice.finish_reason == "tool_calls"
    deltas = {}
    for chunk in client.chat.completions.create(**kw, stream=True, extra_body={"guided_regex": answer}):
        for call in chunk.choices[0].delta.tool_calls or ():
            deltas.setdefault(call.index, [call.function.name, ""])[1] += call.function.arguments or ""
    assert [(name, json.loads(arguments)) for name, arguments in deltas.values()] == got
    plain = client.chat.completions.create(**kw, extra_body={"guided_regex": "Sunny"}).choices[0]
    assert plain.message.content == "Sunny" and not plain.message.tool_calls


def test_qwen3_coder_answers_typed_by_the_tools(servers):
    client = servers[4].openai()
    tools = [{"type": "function", "function": {"name": "forecast", "parameters": {
        "type": "object", "properties": {"days": {"type": "integer"}, "city": {"type": "string"}}}}}]
    answer = (r"Checking\.\n<tool_call>\n<function=forecast>\n<parameter=days>\n3\n</parameter>\n"
              r"<parameter=city>\n12\n</parameter>\n</function>\n</tool_call>")
    kw = dict(model="base", messages=MESSAGES, tools=tools, max_tokens=80, temperature=0)
    choice = client.chat.completions.create(**kw, extra_body={"guided_regex": answer}).choices[0]
    [call] = choice.message.tool_calls
    assert (choice.message.content, call.function.name) == ("Checking.\n", "forecast")
    assert json.loads(call.function.arguments) == {"days": 3, "city": "12"}  # by the schema: a number, a string
    content, arguments = "", ""
    for chunk in client.chat.completions.create(**kw, stream=True, extra_body={"guided_regex": answer}):
        content += chunk.choices[0].delta.content or ""
        arguments += "".join(c.function.arguments or "" for c in chunk.choices[0].delta.tool_calls or ())
    assert (content, arguments) == ("Checking.\n", call.function.arguments)
