"""Reasoning outputs, as vLLM's `--reasoning-parser` gives them: a thinking model's `<think> ... </think>` part of
the answer goes to the message's `reasoning` (and `reasoning_content`, its older name), the rest to `content`.

- `deepseek_r1` (DeepSeek R1 and its distills, QwQ): the template opens the thought in the prompt, so the answer
  is reasoning up to `</think>` (all of it while there is none), content after.
- `qwen3` (Qwen3 and others whose answer opens its own `<think>`): reasoning where the answer opens `<think>`, or
  where the prompt ends inside an open `<think>` (templates that put it there, as Qwen3's thinking-only models do);
  else the answer is all content (`enable_thinking=False` renders a closed, empty thought).
- `seed_oss` (ByteDance Seed-OSS): deepseek_r1's reading with `<seed:think>` and `</seed:think>`.
- `mistral` (Magistral): qwen3's reading with `[THINK]` and `[/THINK]`, special tokens, so the answer is decoded
  with them (as the mistral tool-call parser's).
- `openai_gptoss` (gpt-oss): its harmony messages (`engine/harmony.py`): the analysis channel is the thought, the
  final channel (and commentary preambles) the answer; tool-call messages stay in the answer for the `openai`
  tool-call parser. Decoded with its special tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from . import harmony
from .stopping import partial_marker_length

START, END = "<think>", "</think>"


def prompt_opens_thought(prompt_text: str, start: str = START, end: str = END) -> bool:
    """Whether a rendered prompt ends inside a thought: its last `start` is not closed."""
    return prompt_text.rfind(start) > prompt_text.rfind(end)


@dataclass(frozen=True)
class ReasoningParser:
    name: str
    thinks_from_the_start: bool  # deepseek_r1: the template opened the thought
    start: str = START
    end: str = END
    keeps_special_tokens: bool = False  # its markers are special tokens: decode answers with them

    def starts_thinking(self, prompt_open: bool) -> bool:
        return self.thinks_from_the_start or prompt_open

    def opens_thought(self, prompt_text: str) -> bool:
        return prompt_opens_thought(prompt_text, self.start, self.end)

    def split(self, text: str, prompt_open: bool = False) -> tuple[str | None, str | None]:
        """(reasoning, content) of a whole answer; None where there is none."""
        body, thinking = text, self.starts_thinking(prompt_open)
        if body.lstrip().startswith(self.start):
            body, thinking = body.lstrip()[len(self.start):], True
        if not thinking:
            return None, text
        reasoning, closed, content = body.partition(self.end)
        return reasoning, (content or None) if closed else None

    def so_far(self, text: str, finished: bool, prompt_open: bool = False) -> tuple[str | None, str]:
        """(the thought so far, or None where there is none; the answer so far) of a growing answer: what a marker
        still arriving may yet change is held back, so each only ever grows."""
        stripped = text.lstrip()
        if not finished and self.start.startswith(stripped) and stripped != self.start:
            return None, ""  # nothing yet, or what may become "<think>"
        reasoning, content = self.split(text, prompt_open)
        if reasoning is None:
            return None, text
        if content is None and not finished and self.end not in text:
            # ("</think>" may come)
            reasoning = reasoning[:len(reasoning) - partial_marker_length(reasoning, (self.end,))]
        return reasoning, content or ""

    def marker_ids(self, tokenizer) -> tuple[int, int] | None:
        """The token ids of its start and end markers where each is one token of the tokenizer (`Tokenizer`), else
        None."""
        ids = [tokenizer.encode(marker, add_special_tokens=False) for marker in (self.start, self.end)]
        if any(len(i) != 1 for i in ids):
            return None
        return ids[0][0], ids[1][0]


@dataclass(frozen=True)
class HarmonyReasoningParser(ReasoningParser):
    """gpt-oss's harmony messages (see `engine/harmony.py`); its thought is not one span between two markers, so
    structured outputs cannot wait for the answer (`marker_ids` is None: they hold from the first token)."""

    def split(self, text: str, prompt_open: bool = False) -> tuple[str | None, str | None]:
        return harmony.split(text)

    def so_far(self, text: str, finished: bool, prompt_open: bool = False) -> tuple[str | None, str]:
        reasoning, content = harmony.split(text, finished)
        return reasoning, content or ""

    def opens_thought(self, prompt_text: str) -> bool:
        return False

    def marker_ids(self, tokenizer) -> tuple[int, int] | None:
        return None


REASONING_PARSERS = {p.name: p for p in (
    ReasoningParser("deepseek_r1", True), ReasoningParser("qwen3", False),
    ReasoningParser("seed_oss", True, "<seed:think>", "</seed:think>"),
    ReasoningParser("mistral", False, "[THINK]", "[/THINK]", keeps_special_tokens=True),
    HarmonyReasoningParser("openai_gptoss", False, harmony.CHANNEL + "analysis" + harmony.MESSAGE, harmony.END,
                           keeps_special_tokens=True))}


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
        reasoning, content = self.parser.so_far(text, finished, self.prompt_open)
        if reasoning is None:
            return "", content
        piece = reasoning[self.reasoning_sent:] if len(reasoning) > self.reasoning_sent else ""
        self.reasoning_sent = max(self.reasoning_sent, len(reasoning))
        return piece, content


class ThoughtGate:
    """Where a thinking model's answer starts among its generated tokens, for the constraints that hold on the
    answer alone (structured outputs and guided_choice with a reasoning parser, as vLLM applies them): none while
    the thought is open, from the token after its end marker (`</think>`) on. `open_at_start`: the thought is open
    before the first token (deepseek_r1, or a prompt that ends inside one); else the first token may open one
    (`<think>`), and any other first token starts the answer, as `ReasoningParser.split` reads it."""

    def __init__(self, start_id: int, end_id: int, open_at_start: bool):
        self.start_id, self.end_id = start_id, end_id
        self._state = "thinking" if open_at_start else "undecided"
        self._seen = 0  # generated tokens read so far
        self._answer_from = 0  # the answer's first generated index, once in "answer"

    def answer(self, generated: Sequence[int]) -> Sequence[int] | None:
        """The answer's tokens among `generated` so far ([] before its first), or None while in the thought."""
        while self._seen < len(generated) and self._state != "answer":
            token = generated[self._seen]
            self._seen += 1
            if self._state == "undecided":
                self._state = "thinking" if token == self.start_id else "answer"
                self._answer_from = 0
            elif token == self.end_id:
                self._state, self._answer_from = "answer", self._seen
        if self._state == "thinking":
            return None
        return generated[self._answer_from:] if self._state == "answer" else generated[:0]

    def may_open(self, generated: Sequence[int]) -> bool:
        """Whether the next token may open a thought (besides what the answer's constraint allows)."""
        self.answer(generated)
        return self._state == "undecided"
