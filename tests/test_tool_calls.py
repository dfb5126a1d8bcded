"""Tool calling's pure parts: the tool-call parsers, the schemas a named / required tool_choice constrains the
output to, the answer read back (whole and streamed), and tools in Python chat requests."""

from __future__ import annotations

import json

import pytest

from softprompt import Engine, Request
from softprompt.engine.errors import RequestError
from softprompt.engine.reasoning import REASONING_PARSERS
from softprompt.engine.tool_calls import (
    TOOL_CALL_PARSERS,
    ToolChoice,
    calls_from_required,
    required_schema,
    template_messages,
    tool_call_parser,
)

HERMES, LLAMA3 = TOOL_CALL_PARSERS["hermes"], TOOL_CALL_PARSERS["llama3_json"]
WEATHER = {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}


def calls(parsed) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in parsed.calls]


@pytest.mark.parametrize("text, content, want", [
    ('<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>', None, [("f", {"a": 1})]),
    ('Let me look. <tool_call>{"name": "f", "arguments": {"a": "x"}}</tool_call>\n<tool_call>{"name": "g", '
     '"arguments": {}}</tool_call>', "Let me look. ", [("f", {"a": "x"}), ("g", {})]),
    ('<tool_call>{"name": "f", "arguments": "{\\"a\\": 2}"}</tool_call>', None, [("f", {"a": 2})]),  # as JSON text
    ('<tool_call>{"name": "f", "arguments": {"a": 1}}', None, [("f", {"a": 1})]),  # cut off after a whole call
    ('<tool_call>{"name": "f", "argu', '<tool_call>{"name": "f", "argu', []),  # cut off inside it: content
    ('<tool_call>["f"]</tool_call>', '<tool_call>["f"]</tool_call>', []),  # not a call
    ("no calls here", "no calls here", []),
], ids=["one", "content-then-two", "string-arguments", "unclosed", "cut-off", "not-a-call", "plain"])
def test_hermes(text, content, want):
    parsed = HERMES.parse(text)
    assert parsed.content == content and calls(parsed) == want


@pytest.mark.parametrize("text, content, want", [
    ('{"name": "f", "parameters": {"a": 1}}', None, [("f", {"a": 1})]),
    ('<|python_tag|>{"name": "f", "arguments": {"a": 1}}; {"name": "g", "parameters": {}}', None,
     [("f", {"a": 1}), ("g", {})]),
    (' {"name": "f"}', None, [("f", {})]),
    ('{"name": "f", "parameters": {}} and then some words', '{"name": "f", "parameters": {}} and then some words', []),
    ('{"temperature": 20}', '{"temperature": 20}', []),
    ("It is sunny.", "It is sunny.", []),
], ids=["one", "tag-and-two", "no-arguments", "trailing-text", "not-a-call", "plain"])
def test_llama3_json(text, content, want):
    parsed = LLAMA3.parse(text)
    assert parsed.content == content and calls(parsed) == want


@pytest.mark.parametrize("text, content, want", [
    ('[get_weather(city="Oslo", days=2), now()]', None, [("get_weather", {"city": "Oslo", "days": 2}), ("now", {})]),
    ('<|python_start|>[f(a=[1, {"x": None}], b=True)]<|python_end|>', None, [("f", {"a": [1, {"x": None}],
                                                                                  "b": True})]),
    (' [f(a=-1.5, b="line\\n")] ', None, [("f", {"a": -1.5, "b": "line\n"})]),
    ("[f(1)]", "[f(1)]", []),  # positional: not a call this format makes
    ('[__import__("os").system("ls")]', '[__import__("os").system("ls")]', []),  # never run, not a call
    ("[f(a=g())]", "[f(a=g())]", []), ("[f(**x)]", "[f(**x)]", []), ("[f(a=1e999)]", "[f(a=1e999)]", []),
    ("[f(a={1, 2})]", "[f(a={1, 2})]", []), ("[]", "[]", []), ("[f(a=1)", "[f(a=1)", []),
    ("The answer is [1, 2].", "The answer is [1, 2].", []),
], ids=["two", "llama4-tags", "literals", "positional", "no-code-runs", "nested-call", "double-star", "inf", "set",
        "empty", "cut-off", "plain"])
def test_pythonic(text, content, want):
    parsed = TOOL_CALL_PARSERS["pythonic"].parse(text)
    assert parsed.content == content and calls(parsed) == want


TYPED = {"name": "get_weather", "parameters": {"type": "object", "properties": {
    "city": {"type": "string"}, "days": {"type": "integer"}, "hot": {"type": "boolean"}, "tags": {"type": "array"},
    "t": {"type": "number"}, "n": {"type": ["integer", "null"]}}}}


@pytest.mark.parametrize("text, content, want", [
    ("Let me check.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nNew York\n</parameter>\n"
     "<parameter=days>\n3\n</parameter>\n<parameter=hot>\nTrue\n</parameter>\n<parameter=tags>\n[\"a\", 1]\n"
     "</parameter>\n<parameter=t>\n2.5\n</parameter>\n<parameter=n>\n7\n</parameter>\n<parameter=other>\n12\n"
     "</parameter>\n</function>\n</tool_call>", "Let me check.\n",
     [("get_weather", {"city": "New York", "days": 3, "hot": True, "tags": ["a", 1], "t": 2.5, "n": 7,
                       "other": "12"})]),  # typed by the schema; a key it does not name stays text
    ("<tool_call>\n<function=get_weather>\n<parameter=days>\nthree\n</parameter>\n<parameter=n>\nnull\n"
     "</parameter>\n</function>\n</tool_call>", None, [("get_weather", {"days": "three", "n": None})]),
    ("<function=now>\n</function>", None, [("now", {})]),  # without the wrapper
    ("<tool_call>\n<function=a>\n<parameter=x>\n1\n</parameter>\n</function>\n</tool_call>\n<tool_call>\n"
     "<function=b>\n<parameter=y>\nline one\nline two", None, [("a", {"x": "1"}), ("b", {"y": "line one\nline two"})]),
    ("<tool_call>\nnot a function\n</tool_call>", "<tool_call>\nnot a function\n</tool_call>", []),
    ("It is sunny.", "It is sunny.", []),
], ids=["typed", "untyped-values-and-null", "no-wrapper", "cut-off-second", "not-a-function", "plain"])
def test_qwen3_coder(text, content, want):
    parsed = TOOL_CALL_PARSERS["qwen3_coder"].parse(text, [TYPED])
    assert parsed.content == content and calls(parsed) == want


def test_seed_oss():
    seed = TOOL_CALL_PARSERS["seed_oss"]
    text = ("Sure.<seed:tool_call>\n<function=get_weather>\n<parameter=days>\n2\n</parameter>\n</function>\n"
            "</seed:tool_call>")
    parsed = seed.parse(text, [TYPED])
    assert parsed.content == "Sure." and calls(parsed) == [("get_weather", {"days": 2})]
    assert seed.content_end("Sure.<seed:tool") == len("Sure.") and seed.parse("plain").content == "plain"


def test_streamed_content_stops_before_what_may_be_a_call():
    assert HERMES.content_end("Sure, <tool") == len("Sure, ")  # a possible start is held back
    assert HERMES.content_end("Sure, <b>") == len("Sure, <b>")
    assert HERMES.content_end("Sure <tool_call>{") == len("Sure ")
    assert LLAMA3.content_end("  ") == 0 and LLAMA3.content_end("<|pyth") == 0 and LLAMA3.content_end('{"na') == 0
    assert LLAMA3.content_end("Hi there") == len("Hi there")
    pythonic = TOOL_CALL_PARSERS["pythonic"]
    assert pythonic.content_end(" [get_") == 0 and pythonic.content_end("<|python_") == 0
    assert pythonic.content_end("It is") == len("It is")
    coder = TOOL_CALL_PARSERS["qwen3_coder"]
    assert coder.content_end("Sure <tool") == 5 and coder.content_end("Sure <func") == 5
    assert coder.content_end("Sure <function=f>") == 5 and coder.content_end("x < y") == 5
    with pytest.raises(ValueError, match="unknown tool-call parser 'nope'.*mistral, openai, pythonic, qwen3_coder"):
        tool_call_parser("nope")


def test_required_schema_and_its_answers():
    schema = required_schema([WEATHER, {"name": "now"}])
    assert schema["type"] == "array" and schema["minItems"] == 1 and "maxItems" not in schema
    names = [o["properties"]["name"]["enum"] for o in schema["items"]["anyOf"]]
    assert names == [["get_weather"], ["now"]]
    assert schema["items"]["anyOf"][1]["properties"]["parameters"] == {"type": "object", "properties": {}}
    assert required_schema([WEATHER], parallel=False)["maxItems"] == 1
    with_defs = {"name": "f", "parameters": {"type": "object", "$defs": {"u": {"enum": ["c", "f"]}},
                                             "properties": {"unit": {"$ref": "#/$defs/u"}}}}
    merged = required_schema([with_defs])
    assert merged["$defs"] == {"u": {"enum": ["c", "f"]}} and "$defs" not in merged["items"]["anyOf"][0]
    got = calls_from_required('[{"name": "get_weather", "parameters": {"city": "Oslo"}}, {"name": "now", '
                              '"parameters": {}}]')
    assert [(c.name, json.loads(c.arguments)) for c in got] == [("get_weather", {"city": "Oslo"}), ("now", {})]
    assert calls_from_required('[{"name": "get_weather", "parameters": {"ci') is None  # cut off
    assert calls_from_required("[]") is None and calls_from_required('{"name": "x"}') is None


def test_whole_answers_and_their_finish_reasons():
    named = ToolChoice("named", name="get_weather", parallel=False)
    content, got, reason = named.answer('{"city": "Oslo"}', "stop")
    assert content is None and [(c.name, c.arguments) for c in got] == [("get_weather", '{"city": "Oslo"}')]
    assert reason == "stop"  # OpenAI's: a forced call ends with "stop"
    required = ToolChoice("required")
    assert required.answer('[{"name": "now", "parameters": {}}]', "stop")[2] == "tool_calls"
    assert required.answer('[{"name": "now", "para', "length") == ('[{"name": "now", "para', [], "length")
    auto = ToolChoice("auto", parser=HERMES, parallel=False)
    text = ('a <tool_call>{"name": "f", "arguments": {}}</tool_call>'
            '<tool_call>{"name": "g", "arguments": {}}</tool_call>')
    content, got, reason = auto.answer(text, "stop")
    assert content == "a " and [c.name for c in got] == ["f"] and reason == "tool_calls"  # not parallel: one
    assert auto.answer("just words", "length") == ("just words", [], "length")
    first = named.answer("{}", "stop")[1][0]
    assert first.id.startswith("chatcmpl-tool-") and first.id != named.answer("{}", "stop")[1][0].id


def replay(choice: ToolChoice, pieces: list[str], finish_reason: str = "stop"):
    """Feed a stream its answer piece by piece; returns (content sent, calls rebuilt from the deltas as a client
    accumulates them, the last finish_reason)."""
    stream, text, content, built, reason = choice.stream(), "", "", {}, None
    for i, piece in enumerate(pieces):
        text += piece
        last = i == len(pieces) - 1
        sent, deltas, reason = stream.feed(text, last, finish_reason if last else None)
        assert reason is None or last
        content += sent
        for d in deltas:
            call = built.setdefault(d["index"], {"id": None, "name": "", "arguments": ""})
            call["id"] = d.get("id", call["id"])
            call["name"] += d.get("function", {}).get("name", "")
            call["arguments"] += d.get("function", {}).get("arguments", "")
    return content, [built[i] for i in sorted(built)], reason


def test_streamed_answers_add_up_to_the_whole_ones():
    text = 'Checking <tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>'
    pieces = ["Check", "ing <", "tool_", "call>{\"name\": \"f\", ", '"arguments": {"a": 1}}', "</tool_call>"]
    assert "".join(pieces) == text
    content, got, reason = replay(ToolChoice("auto", parser=HERMES), pieces)
    assert content == "Checking " and [(c["name"], json.loads(c["arguments"])) for c in got] == [("f", {"a": 1})]
    assert reason == "tool_calls" and got[0]["id"].startswith("chatcmpl-tool-")
    # content streams as it comes (all but a possible marker start)
    stream = ToolChoice("auto", parser=HERMES).stream()
    assert stream.feed("Hello <to", False, None)[0] == "Hello "
    assert stream.feed("Hello <tolerable", False, None)[0] == "<tolerable"
    # a named call's arguments stream piece by piece under one id
    content, got, reason = replay(ToolChoice("named", name="g", parallel=False), ['{"ci', 'ty": ', '"Oslo"}'])
    assert content == "" and got == [{"id": got[0]["id"], "name": "g", "arguments": '{"city": "Oslo"}'}]
    assert reason == "stop"
    # required: the calls come whole at the end; an answer cut off is sent as content
    content, got, reason = replay(ToolChoice("required"), ['[{"name": "now", ', '"parameters": {}}]'])
    assert content == "" and [(c["name"], c["arguments"]) for c in got] == [("now", "{}")] and reason == "tool_calls"
    assert replay(ToolChoice("required"), ['[{"name"', ': "n'], "length") == ('[{"name": "n', [], "length")
    assert replay(ToolChoice("auto", parser=LLAMA3), ["It", " rains."]) == ("It rains.", [], "stop")
    pythonic = ToolChoice("auto", parser=TOOL_CALL_PARSERS["pythonic"])
    content, got, reason = replay(pythonic, ["[get_wea", 'ther(city="Os', 'lo"), now()]'])
    assert content == "" and reason == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in got] == [("get_weather", {"city": "Oslo"}), ("now", {})]
    assert replay(pythonic, ["It", " rains."]) == ("It rains.", [], "stop")
    coder = ToolChoice("auto", parser=TOOL_CALL_PARSERS["qwen3_coder"], functions=(TYPED,))
    content, got, reason = replay(coder, ["Ok. <tool", "_call>\n<function=get_weather>\n<parameter=days>\n", "4\n",
                                          "</parameter>\n</function>\n</tool_call>"])
    assert content == "Ok. " and reason == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in got] == [("get_weather", {"days": 4})]


def test_template_messages_decode_tool_call_arguments():
    messages = [{"role": "assistant", "content": "", "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}},
        {"id": "2", "type": "function", "function": {"name": "g", "arguments": "not json"}}]},
        {"role": "tool", "content": "20C", "tool_call_id": "1"}]
    out = template_messages(messages)
    assert out[0]["tool_calls"][0]["function"]["arguments"] == {"a": 1}
    assert out[0]["tool_calls"][1]["function"]["arguments"] == "not json"  # left as given
    assert out[1] == messages[1] and messages[0]["tool_calls"][0]["function"]["arguments"] == '{"a": 1}'  # a copy


TOOLS_TEMPLATE = (
    "{% if tools %}tools: {% for t in tools %}{{ t.function.name }}({{ t.function.parameters | tojson }}) "
    "{% endfor %}\n{% endif %}"
    "{% for m in messages %}{{ m.role }}: {{ m.content }}"
    "{% for c in m.tool_calls or [] %}[{{ c.function.name }} {{ c.function.arguments.city }}]{% endfor %}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")


def test_python_chat_requests_render_tools_and_earlier_calls(model_dir_for):
    engine = Engine(model_dir_for("llama"), device="cpu")
    engine.tokenizer.hf.chat_template = TOOLS_TEMPLATE
    tools = [{"type": "function", "function": WEATHER}]
    messages = [{"role": "user", "content": "weather in Oslo?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "c1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
                {"role": "tool", "content": "20C", "tool_call_id": "c1"}]
    ids = engine.prepare(Request(messages=messages, tools=tools)).input_ids
    text = engine.tokenizer.hf.decode(ids)
    assert text.startswith("tools: get_weather({") and "[get_weather Oslo]" in text  # the arguments as an object
    assert ids == engine.prepare(Request(messages=messages, chat_template_kwargs={"tools": tools})).input_ids
    assert ids != engine.prepare(Request(messages=messages)).input_ids
    with pytest.raises(RequestError, match="give tools or chat_template_kwargs"):
        engine.prepare(Request(messages=messages, tools=tools, chat_template_kwargs={"tools": tools}))
    with pytest.raises(RequestError, match="chat_template_kwargs and tools apply to chat messages"):
        engine.prepare(Request(text="x", tools=tools))


MISTRAL = TOOL_CALL_PARSERS["mistral"]


@pytest.mark.parametrize("text, content, want", [
    ('[TOOL_CALLS] [{"name": "f", "arguments": {"a": 1}}, {"name": "g", "arguments": {}}]', None,
     [("f", {"a": 1}), ("g", {})]),
    ('Sure.[TOOL_CALLS][{"name": "f", "arguments": {"a": 1}}]', "Sure.", [("f", {"a": 1})]),
    ('[TOOL_CALLS]f[ARGS]{"a": 1}[TOOL_CALLS]g[ARGS]{}', None, [("f", {"a": 1}), ("g", {})]),  # v11+
    ('[{"name": "f", "arguments": {"a": 1}}]', None, [("f", {"a": 1})]),  # the marker skipped as a special token
    ('[TOOL_CALLS][{"name": "f", "argu', '[TOOL_CALLS][{"name": "f", "argu', []),
    ("[1, 2] is a list", "[1, 2] is a list", []),
    ("Plain words.", "Plain words.", []),
], ids=["array", "content-first", "v11", "no-marker", "cut-off", "not-calls", "plain"])
def test_mistral(text, content, want):
    parsed = MISTRAL.parse(text)
    assert parsed.content == content and calls(parsed) == want


def test_mistral_ids_and_special_tokens():
    from softprompt.engine.server.schemas import ChatCompletionRequest

    assert MISTRAL.content_end("Sure [TOOL_C") == len("Sure ") and MISTRAL.content_end("[{") == 0
    for kind in ("named", "required", "auto"):
        choice = ToolChoice(kind, name="f", parser=MISTRAL, short_ids=True)
        text = {"named": "{}", "required": '[{"name": "f", "parameters": {}}]',
                "auto": '[TOOL_CALLS][{"name": "f", "arguments": {}}]'}[kind]
        [call] = choice.answer(text, "stop")[1]
        assert len(call.id) == 9 and call.id.isalnum(), call.id
        content, deltas, _ = choice.stream().feed(text, True, "stop")
        assert len(deltas[0]["id"]) == 9
    body = {"model": "base", "messages": [{"role": "user", "content": "hi"}],
            "tools": [{"type": "function", "function": {"name": "f"}}]}
    auto = ChatCompletionRequest(**body)
    assert auto.tool_mode("mistral").short_ids and not auto.tool_mode("hermes").short_ids
    assert auto.decoded_for(auto.tool_mode("mistral")).skip_special_tokens is False  # to see [TOOL_CALLS]
    assert auto.decoded_for(auto.tool_mode("hermes")).skip_special_tokens is True
    told = ChatCompletionRequest(**body, skip_special_tokens=True)
    assert told.decoded_for(told.tool_mode("mistral")).skip_special_tokens is True  # as the request says
    magistral = REASONING_PARSERS["mistral"]  # its [THINK] markers are special tokens too
    assert auto.decoded_for(None, magistral).skip_special_tokens is False
    assert auto.decoded_for(None, REASONING_PARSERS["qwen3"]).skip_special_tokens is True
    assert told.decoded_for(None, magistral).skip_special_tokens is True
