"""Reasoning outputs, as vLLM's `--reasoning-parser` gives them: a thinking model's `<think> ... </think>` part of
the answer goes to the message's `reasoning` (and `reasoning_content`, its older name), the rest to `content`.

- `deepseek_r1` (DeepSeek R1 and its distills, QwQ): the template opens the thought in the prompt, so the answer
  is reasoning up to `</think>` (all of it while there is none), content after.
- `qwen3` (Qwen3 and others whose answer opens its own `<think>`): reasoning where the answer opens `<think>`, or
  where the prompt ends inside an open `<think>` (templates that put it there, as Qwen3's thinking-only models do);
  else the answer is all content (`enable_thinking=False` renders a closed, empty thought).
"""

from __future__ import annotations

from dataclasses import dataclass

from .stopping import partial_marker_length

START, END = "<think>", "</think>"


def prompt_opens_thought(prompt_text: str) -> bool:
    """Whether a rendered prompt ends inside a thought: its last `<think>` is not closed."""
    return prompt_text.rfind(START) > prompt_text.rfind(END)


@dataclass(frozen=True)
class ReasoningParser:
    name: str
    thinks_from_the_start: bool  # deepseek_r1: the template opened the thought

    def starts_thinking(self, prompt_open: bool) -> bool:
        return self.thinks_from_the_start or prompt_open

    def split(self, text: str, prompt_open: bool = False) -> tuple[str | None, str | None]:
        """(reasoning, content) of a whole answer; None where there is none."""
        body, thinking = text, self.starts_thinking(prompt_open)
        if body.lstrip().startswith(START):
            body, thinking = body.lstrip()[len(START):], True
        if not thinking:
            return None, text
        reasoning, closed, content = body.partition(END)
        return reasoning, (content or None) if closed else None


REASONING_PARSERS = {p.name: p for p in (ReasoningParser("deepseek_r1", True), ReasoningParser("qwen3", False))}


def reasoning_parser(name: str) -> ReasoningParser:
    try:
        return REASONING_PARSERS[name]
    except KeyError:
        raise ValueError(f"unknown reasoning parser {name!r} (known: {', '.join(sorted(REASONING_PARSERS))})") from None


@dataclass
class ReasoningStream:
    """One streamed answer: feed it the answer so far; it says which reasoning to send now and how much of the
    answer is surely content (the content so far, whole, for the caller to send the rest of)."""

    parser: ReasoningParser
    prompt_open: bool = False
    reasoning_sent: int = 0

    def feed(self, text: str, finished: bool) -> tuple[str, str]:
        """(reasoning to send now, the content so far)."""
        stripped = text.lstrip()
        if not finished and START.startswith(stripped) and stripped != START:
            return "", ""  # nothing yet, or what may become "<think>"
        reasoning, content = self.parser.split(text, self.prompt_open)
        if reasoning is None:
            return "", text
        if content is None and not finished and END not in text:
            reasoning = reasoning[:len(reasoning) - partial_marker_length(reasoning, (END,))]  # "</think>" may come
        piece = reasoning[self.reasoning_sent:] if len(reasoning) > self.reasoning_sent else ""
        self.reasoning_sent = max(self.reasoning_sent, len(reasoning))
        return piece, content or ""
