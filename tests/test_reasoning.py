"""Reasoning outputs' pure parts: the thought told from the answer by each parser, whole and streamed (streamed
pieces add up to the whole split however the text arrives), and with tool calls read from the answer part."""

from __future__ import annotations

import json
import random

import pytest

from softprompt.engine.reasoning import REASONING_PARSERS, ReasoningStream, prompt_opens_thought, reasoning_parser
from softprompt.engine.request import RequestOutput
from softprompt.engine.server.formatting import ChatFormat, TokenStrings
from softprompt.engine.tool_calls import TOOL_CALL_PARSERS, ToolChoice

R1, QWEN3 = REASONING_PARSERS["deepseek_r1"], REASONING_PARSERS["qwen3"]
TEXTS = ["<think>abc</think>\n\nThe answer.", "abc</think>The answer.", "let me think", "<think>cut off mid-th",
         "  <think>\nx < y</think>", "The answer <b>is</b> 4.", "", "<", "<thin", "<think>a</thi", "a</think>"]


@pytest.mark.parametrize("parser, prompt_open, text, want", [
    (R1, False, "<think>abc</think>\n\nHi", ("abc", "\n\nHi")),
    (R1, False, "abc</think>Hi", ("abc", "Hi")),  # the template opened the thought
    (R1, False, "abc", ("abc", None)),  # still thinking (cut off)
    (R1, False, "abc</think>", ("abc", None)),
    (QWEN3, False, "<think>abc</think>\n\nHi", ("abc", "\n\nHi")),
    (QWEN3, False, "abc</think>Hi", (None, "abc</think>Hi")),  # no thought opened: all content
    (QWEN3, True, "abc</think>Hi", ("abc", "Hi")),  # the prompt opened it
    (QWEN3, False, "Hi", (None, "Hi")),
    (QWEN3, False, "<think>abc", ("abc", None)),
])
def test_whole_answers(parser, prompt_open, text, want):
    assert parser.split(text, prompt_open) == want


def test_prompt_opens_thought_and_unknown_parsers():
    assert prompt_opens_thought("<|im_start|>assistant\n<think>\n")
    assert not prompt_opens_thought("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # enable_thinking=False
    assert not prompt_opens_thought("<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="unknown reasoning parser 'granite'.*r1, mistral, openai_gptoss, qwen3, seed"):
        reasoning_parser("granite")
    seed, magistral = REASONING_PARSERS["seed_oss"], REASONING_PARSERS["mistral"]
    assert seed.opens_thought("<seed:think>") and not seed.opens_thought("<think>")
    assert magistral.opens_thought("[INST]x[/INST][THINK]") and not magistral.opens_thought("[THINK]a[/THINK]")


@pytest.mark.parametrize("name, prompt_open, text, want", [
    ("seed_oss", False, "<seed:think>abc</seed:think>Hi", ("abc", "Hi")),
    ("seed_oss", False, "abc</seed:think>Hi", ("abc", "Hi")),  # thinks from the start, as deepseek_r1
    ("seed_oss", False, "abc", ("abc", None)),
    ("mistral", False, "[THINK]abc[/THINK]Hi", ("abc", "Hi")),
    ("mistral", False, "abc[/THINK]Hi", (None, "abc[/THINK]Hi")),  # opens its own thought, as qwen3
    ("mistral", True, "abc[/THINK]Hi", ("abc", "Hi")),
])
def test_other_families_markers(name, prompt_open, text, want):
    parser = REASONING_PARSERS[name]
    assert parser.split(text, prompt_open) == want
    assert parser.keeps_special_tokens == (name == "mistral")  # Magistral's markers are special tokens


def stream(parser, prompt_open: bool, pieces: list[str]) -> tuple[str, str]:
    s, text, thought, content = ReasoningStream(parser, prompt_open), "", "", ""
    for i, piece in enumerate(pieces):
        text += piece
        sent, so_far = s.feed(text, i == len(pieces) - 1)
        assert so_far.startswith(content)  # content only ever grows
        thought, content = thought + sent, so_far
    return thought, content


@pytest.mark.parametrize("parser", list(REASONING_PARSERS.values()), ids=list(REASONING_PARSERS))
@pytest.mark.parametrize("prompt_open", [False, True])
def test_streamed_pieces_add_up_to_the_whole_split(parser, prompt_open):
    rng = random.Random(0)
    for text in TEXTS:
        text = text.replace("</think>", parser.end).replace("<think>", parser.start)
        reasoning, content = parser.split(text, prompt_open)
        cuts = [list(text) or [""]]  # a character at a time, and in a few random pieces
        for _ in range(5 if len(text) > 1 else 0):
            c = sorted(rng.sample(range(1, len(text)), min(3, len(text) - 1)))
            cuts.append([text[i:j] for i, j in zip([0, *c], [*c, len(text)])])
        for pieces in cuts:
            assert stream(parser, prompt_open, pieces) == (reasoning or "", content or ""), (text, pieces)


def test_a_closing_tag_in_pieces_is_not_sent_as_thought():
    s = ReasoningStream(R1)
    assert s.feed("abc</th", False) == ("abc", "")
    assert s.feed("abc</think>D", False) == ("", "D")


def output(text: str, finish_reason: str | None) -> RequestOutput:
    return RequestOutput("r", None, None, [1], [2] * len(text), text=text, finish_reason=finish_reason)


def test_tool_calls_are_read_from_the_answer_after_the_thought():
    text = ('<think>I need the weather.</think>\n'
            '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>')
    fmt = ChatFormat("id", 0, "base", TokenStrings(None), tools=ToolChoice("auto", parser=TOOL_CALL_PARSERS["hermes"]),
                     reasoning=QWEN3)
    [choice] = fmt.response([output(text, "stop")])["choices"]
    message = choice["message"]
    assert message["reasoning"] == message["reasoning_content"] == "I need the weather."
    assert message["content"] == "\n" and choice["finish_reason"] == "tool_calls"
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"]] == [
        ("get_weather", {"city": "Oslo"})]
    # streamed, a piece at a time: the same thought, content and call
    fmt.progress.clear()
    thought, content, arguments, reasons = "", "", "", []
    for i in range(1, len(text) + 1):
        for chunk in fmt.chunks(0, output(text[:i], "stop" if i == len(text) else None)):
            delta = chunk["choices"][0]["delta"]
            reasons.append(chunk["choices"][0]["finish_reason"])
            thought += delta.get("reasoning", "")
            assert delta.get("reasoning") == delta.get("reasoning_content")
            content += delta.get("content", "")
            arguments += "".join(c["function"]["arguments"] for c in delta.get("tool_calls", ()))
    assert (thought, content, json.loads(arguments)) == ("I need the weather.", "\n", {"city": "Oslo"})
    assert reasons[-1] == "tool_calls" and set(reasons[:-1]) == {None}


def test_include_reasoning_false_leaves_the_thought_out():
    fmt = ChatFormat("id", 0, "base", TokenStrings(None), reasoning=R1, include_reasoning=False)
    message = fmt.response([output("abc</think>Hi", "stop")])["choices"][0]["message"]
    assert message["content"] == "Hi" and message["reasoning"] is None and message["reasoning_content"] is None
    deltas = [c["choices"][0]["delta"] for c in fmt.chunks(0, output("abc</think>Hi", "stop"))]
    assert all("reasoning" not in d for d in deltas) and "".join(d.get("content", "") for d in deltas) == "Hi"
    plain = ChatFormat("id", 0, "base", TokenStrings(None)).response([output("abc</think>Hi", "stop")])
    assert plain["choices"][0]["message"] == {"role": "assistant", "content": "abc</think>Hi"}  # no parser


HARMONY = REASONING_PARSERS["openai_gptoss"]
ANALYSIS = "<|channel|>analysis<|message|>"
NEXT = "<|start|>assistant"  # (gpt-oss's prompt ends with the first one)
WEATHER_CALL = '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Oslo"}'


@pytest.mark.parametrize("text, want", [
    (f"{ANALYSIS}2 + 2 is 4.<|end|>{NEXT}<|channel|>final<|message|>It is 4.", ("2 + 2 is 4.", "It is 4.")),
    (f"{ANALYSIS}a<|end|>{NEXT}{ANALYSIS}b<|end|>{NEXT}<|channel|>final<|message|>C<|return|>", ("ab", "C")),
    ("<|channel|>final<|message|>Hi", (None, "Hi")),
    (f"{ANALYSIS}cut off mid-thou", ("cut off mid-thou", None)),
    (f"{ANALYSIS}a<|end|>{NEXT}<|channel|>commentary<|message|>Let me look.<|end|>{NEXT}<|channel|>final<|message|>"
     "Done.", ("a", "Let me look.Done.")),  # a preamble (commentary to no one) is answer
    ("Plain text, no harmony.", (None, "Plain text, no harmony.")),
    (f"{ANALYSIS}a<|end|>{NEXT}{WEATHER_CALL}", ("a", f"{NEXT}{WEATHER_CALL}")),  # (the call kept whole)
])
def test_harmony_messages(text, want):
    """gpt-oss's analysis channel is the thought, final (and commentary preambles) the answer; a tool-call message
    stays whole in the answer for the `openai` tool-call parser."""
    assert HARMONY.split(text) == want
    assert HARMONY.keeps_special_tokens and HARMONY.marker_ids(None) is None and not HARMONY.opens_thought(text)


@pytest.mark.parametrize("stream_it", [False, True])
def test_harmony_tool_calls_are_read_from_the_answer(stream_it):
    """With `--reasoning-parser openai_gptoss --tool-call-parser openai`: the thought, a preamble as content, and the
    call to functions.get_weather (gpt-oss stops at <|call|>, one of its EOS tokens), whole or a character at a time,
    no tag ever sent."""
    text = (f"{ANALYSIS}Need the weather.<|end|>{NEXT}<|channel|>commentary<|message|>Checking.<|end|>{NEXT}"
            f"{WEATHER_CALL}")
    tools = ToolChoice("auto", parser=TOOL_CALL_PARSERS["openai"])
    fmt = ChatFormat("id", 0, "base", TokenStrings(None), tools=tools, reasoning=HARMONY)
    if not stream_it:
        [choice] = fmt.response([output(text, "stop")])["choices"]
        message, reason = choice["message"], choice["finish_reason"]
        thought, content, calls = message["reasoning"], message["content"], message["tool_calls"]
        calls = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]
    else:
        thought, content, built, reasons = "", "", {}, []
        for i in range(1, len(text) + 1):
            for chunk in fmt.chunks(0, output(text[:i], "stop" if i == len(text) else None)):
                delta = chunk["choices"][0]["delta"]
                reasons.append(chunk["choices"][0]["finish_reason"])
                thought += delta.get("reasoning", "")
                content += delta.get("content", "")
                for c in delta.get("tool_calls", ()):
                    built.setdefault(c["index"], ["", ""])
                    built[c["index"]][0] += c["function"].get("name") or ""
                    built[c["index"]][1] += c["function"]["arguments"]
                assert "<|" not in delta.get("content", "") + delta.get("reasoning", "")
        calls = [(name, json.loads(arguments)) for name, arguments in built.values()]
        reason = reasons[-1]
    assert (thought, content, reason) == ("Need the weather.", "Checking.", "tool_calls")
    assert calls == [("get_weather", {"city": "Oslo"})]
    plain = ChatFormat("id", 0, "base", TokenStrings(None), tools=tools, reasoning=HARMONY).response(
        [output(f"{ANALYSIS}x<|end|>{NEXT}<|channel|>final<|message|>Hi", "stop")])
    assert plain["choices"][0]["message"]["content"] == "Hi" and plain["choices"][0]["finish_reason"] == "stop"


def test_harmony_tool_parser_needs_the_harmony_reasoning_parser():
    from softprompt.engine.server.app import ServerConfig, create_app

    with pytest.raises(ValueError, match="'openai'.*needs reasoning_parser 'openai_gptoss'"):
        create_app(None, config=ServerConfig(tool_call_parser="openai"))


def test_harmony_streamed_pieces_add_up_to_the_whole_split():
    rng = random.Random(1)
    texts = [f"{ANALYSIS}2 + 2 is 4.<|end|>{NEXT}<|channel|>final<|message|>It is 4.<|return|>",
             f"{ANALYSIS}a<|end|>{NEXT}<|channel|>commentary<|message|>pre<|end|>{NEXT}{WEATHER_CALL}",
             f"  {ANALYSIS}x < y <|end|>\n{NEXT}<|channel|>final<|message|>a <| b", "<|chan", "<|channel|>final"]
    for text in texts:
        reasoning, content = HARMONY.split(text)
        cuts = [list(text)] + [[text[i:j] for i, j in zip([0, *c], [*c, len(text)])]
                               for c in (sorted(rng.sample(range(1, len(text)), 3)) for _ in range(5))]
        for pieces in cuts:
            assert stream(HARMONY, False, pieces) == (reasoning or "", content or ""), (text, pieces)
