"""Reasoning outputs on /v1/chat/completions with --reasoning-parser: the thought comes as the message's
`reasoning` (and `reasoning_content`), streamed or not, left out with include_reasoning=false; a template that opens
the thought in the prompt is seen; a constraint holds on the answer after the thought where `<think>` and `</think>`
are tokens, else a constrained answer is all answer."""

from __future__ import annotations

import json

import pytest

from softprompt import Request, SamplingParams
from softprompt.engine.server.app import ServerConfig
from softprompt.engine.server.registry import PromptRegistry

from .support import RunningServer, make_engine

PLAIN = ("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
         "{% if add_generation_prompt %}assistant:{% endif %}")
OPENS = PLAIN.replace("assistant:{% endif %}", "assistant: <think>{% endif %}")  # a thinking-only template
MESSAGES = [{"role": "user", "content": "2 + 2?"}]


@pytest.fixture(scope="module")
def servers(model_dir_for, thinking_model_dir):
    running = {}
    engine = make_engine(thinking_model_dir)  # <think> and </think> are tokens: constraints wait for the answer
    engine.tokenizer.set_chat_template(PLAIN)
    running["r1-tokens"] = RunningServer(engine, PromptRegistry(), ServerConfig(reasoning_parser="deepseek_r1"))
    for name, parser, template in (("r1", "deepseek_r1", PLAIN), ("qwen3", "qwen3", PLAIN),
                                   ("qwen3-open", "qwen3", OPENS)):
        engine = make_engine(model_dir_for("llama"))
        engine.tokenizer.set_chat_template(template)
        running[name] = RunningServer(engine, PromptRegistry(), ServerConfig(reasoning_parser=parser))
    yield running
    for server in running.values():
        server.stop()


def answer_text(server, max_tokens: int) -> str:
    """The raw answer Engine.generate gives for MESSAGES (greedy)."""
    def run(engine):
        [out] = engine.generate([Request(messages=MESSAGES, sampling=SamplingParams(max_new_tokens=max_tokens))])
        return out.text
    return server.call(run)


def streamed(client, **kw) -> tuple[str, str, str]:
    thought, thought_old, content = "", "", ""
    for chunk in client.chat.completions.create(**kw, stream=True):
        for c in chunk.choices:
            extra = c.delta.model_extra or {}
            thought += extra.get("reasoning") or ""
            thought_old += extra.get("reasoning_content") or ""
            content += c.delta.content or ""
    return thought, thought_old, content


@pytest.mark.parametrize("name, thinking", [("r1", True), ("qwen3", False), ("qwen3-open", True)])
def test_the_thought_comes_apart_from_the_answer(servers, name, thinking):
    server = servers[name]
    client = server.openai()
    kw = dict(model="base", messages=MESSAGES, max_tokens=12, temperature=0)
    text = answer_text(server, 12)  # a random model: no "</think>", so a thinking answer is all thought
    assert "</think>" not in text
    message = client.chat.completions.create(**kw).choices[0].message
    extra = message.model_extra
    if thinking:
        assert extra["reasoning"] == extra["reasoning_content"] == text  # (a random model opens no <think>)
        assert message.content is None
    else:
        assert extra["reasoning"] is None and message.content == text
    want = (extra["reasoning"] or "", extra["reasoning"] or "", message.content or "")
    assert streamed(client, **kw) == want
    hidden = client.chat.completions.create(**kw, extra_body={"include_reasoning": False}).choices[0].message
    assert hidden.model_extra["reasoning"] is None and hidden.content == message.content
    assert streamed(client, **kw, extra_body={"include_reasoning": False}) == ("", "", message.content or "")


def test_a_constrained_answer_is_all_answer_where_the_markers_are_not_tokens(servers):
    client = servers["r1"].openai()
    pytest.importorskip("xgrammar")
    message = client.chat.completions.create(model="base", messages=MESSAGES, max_tokens=30, temperature=0,
                                             extra_body={"guided_regex": "thought</think>answer"}).choices[0].message
    assert message.content == "thought</think>answer" and message.model_extra.get("reasoning") is None


@pytest.mark.parametrize("name", ["reasoning_content", "thinking"])  # Qwen3's templates read one, gpt-oss's the other
def test_earlier_thoughts_reach_the_template(servers, name):
    server = servers["r1"]
    server.call(lambda e: e.tokenizer.set_chat_template(
        "{% for m in messages %}{{ m.role }}: {% if m.NAME %}({{ m.NAME }}) {% endif %}"
        "{{ m.content }}\n{% endfor %}".replace("NAME", name)))
    try:
        history = [*MESSAGES, {"role": "assistant", "content": "4", "reasoning": "two and two"}]
        got = server.client().post("/tokenize", json={"model": "base", "messages": history,
                                                      "add_generation_prompt": False}).json()["tokens"]
        assert server.call(lambda e: e.tokenizer.decode(got)).endswith("assistant: (two and two) 4\n")
    finally:
        server.call(lambda e: e.tokenizer.set_chat_template(PLAIN))


END_ID = "511"  # thinking_model_dir's </think>
TOOL = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"], "additionalProperties": False}}}


def test_a_constraint_holds_on_the_answer_after_the_thought(servers):
    pytest.importorskip("xgrammar")
    client = servers["r1-tokens"].openai()
    kw = dict(model="base", messages=MESSAGES, max_tokens=12, temperature=0)
    message = client.chat.completions.create(**kw, logit_bias={END_ID: 50}, extra_body={
        "guided_regex": "yes|no"}).choices[0].message
    assert message.model_extra["reasoning"] == "" and message.content in ("yes", "no")
    assert streamed(client, **kw, logit_bias={END_ID: 50}, extra_body={"guided_regex": "yes|no"}) == (
        "", "", message.content)
    # the thought never ends: all of it is thought, none constrained
    free = client.chat.completions.create(**kw).choices[0].message
    held = client.chat.completions.create(**kw, extra_body={"guided_choice": ["yes", "no"]}).choices[0].message
    assert held.model_extra["reasoning"] == free.model_extra["reasoning"] and held.content is None
    # a named tool choice: its arguments are the answer after the thought
    compact = {"structured_outputs": {"disable_any_whitespace": True}}
    choice = client.chat.completions.create(**kw, max_completion_tokens=40, logit_bias={END_ID: 50}, tools=[TOOL],
                                            tool_choice={"type": "function", "function": {"name": "add"}},
                                            extra_body=compact).choices[0]
    [call] = choice.message.tool_calls
    assert choice.message.model_extra["reasoning"] == "" and call.function.name == "add"
    assert list(json.loads(call.function.arguments)) == ["a"]


def test_a_harmony_server_starts_and_answers(model_dir_for):
    """--reasoning-parser openai_gptoss with --tool-call-parser openai (gpt-oss): structured outputs cannot wait for
    a harmony thought, so they hold from the first token (logged), and an answer without harmony messages (a random
    model writes none) is all content, with tools offered. The parsing itself: tests/test_reasoning.py."""
    engine = make_engine(model_dir_for("llama"))
    engine.tokenizer.set_chat_template(PLAIN)
    server = RunningServer(engine, PromptRegistry(),
                           ServerConfig(reasoning_parser="openai_gptoss", tool_call_parser="openai"))
    try:
        client = server.openai()
        text = answer_text(server, 8)
        message = client.chat.completions.create(model="base", messages=MESSAGES, max_tokens=8, temperature=0,
                                                 tools=[TOOL]).choices[0].message
        assert message.content == text and message.model_extra["reasoning"] is None and not message.tool_calls
        assert server.call(lambda e: e.reasoning) is None  # (no thought gate)
    finally:
        server.stop()
