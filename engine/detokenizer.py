"""A request's generated text, decoded a few tokens at a time, and where a stop string ends it.

A request's text is its generated tokens' text as they continue its input, as vLLM and HF's text-generation
pipeline give it: HF's decode of the input's last few tokens followed by the generated ones, less the text of
those input tokens (`ContinuedText`). So a SentencePiece tokenizer's first generated token keeps the space it
begins with (" Paris", not "Paris"), and a prompt plus its completion reads as one text; for a byte-level BPE it is
the decode of the generated tokens alone. A finished request's text is exactly that.

While a request runs, its text grows by each new token's piece, found by decoding a short window of the last tokens
(the tokenizers library's `DecodeStream` where it gives the same text as HF's decode, else the same windowing over
HF's decode, as vLLM's incremental detokenizer does). So a stream's text and a stop-string check cost a few tokens'
decode per step instead of a decode of everything generated so far. A trailing incomplete character (U+FFFD while
the bytes of a multi-byte character are not all there) is held back until it is complete.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

from .tokenizer import Tokenizer

REPLACEMENT = "\ufffd"
CONTEXT_MIN, CONTEXT_MAX = 4, 23  # input tokens the text continues (vLLM's choice)


def input_context(decode: Callable[[list[int]], str], input_ids: Sequence[int]) -> tuple[list[int], str]:
    """The input's last tokens that the generated text continues, and their text: the shortest suffix of 4 to 23
    tokens (the whole input if shorter) whose text has no U+FFFD; none where there is no such suffix."""
    if not input_ids:
        return [], ""
    lengths = [len(input_ids)] if len(input_ids) <= CONTEXT_MIN else range(
        CONTEXT_MIN, min(len(input_ids), CONTEXT_MAX) + 1)
    for n in lengths:
        context = list(input_ids[len(input_ids) - n:])
        text = decode(context)
        if REPLACEMENT not in text:
            return context, text
    return [], ""


class ContinuedText:
    """ids -> their text after the input (see the module's docstring); the input's context is worked out once."""

    def __init__(self, decode: Callable[[list[int]], str], input_ids: Sequence[int]):
        self.decode, self.input_ids = decode, input_ids
        self._context: tuple[list[int], str] | None = None

    @property
    def context(self) -> tuple[list[int], str]:
        if self._context is None:
            self._context = input_context(self.decode, self.input_ids)
        return self._context

    def __call__(self, ids: list[int]) -> str:
        context, before = self.context
        if not context:
            return self.decode(ids)
        whole = self.decode(context + list(ids))
        return whole[len(before):] if whole.startswith(before) else self.decode(ids)


def earliest_stop(text: str, stops: Sequence[str], floor: int = 0) -> tuple[int, str] | None:
    """(start, stop string) of the earliest stop string in `text` that ends after `floor` characters (ties: the
    smaller string), or None."""
    best = None
    for stop in stops:
        start = text.find(stop, max(0, floor - len(stop) + 1))
        if start != -1 and (best is None or (start, stop) < best):
            best = (start, stop)
    return best


def exact_stop(decode: Callable[[list[int]], str], ids: list[int], stops: Sequence[str],
               min_tokens: int) -> tuple[tuple[int, str] | None, str]:
    """The stop-string rule on the whole decoded text: the earliest stop string that ends after the text of the
    first `min_tokens` tokens (vLLM's rule: text generated before min_tokens cannot stop a request).
    Returns (hit or None, the text)."""
    text = decode(ids)
    floor = len(decode(ids[:min_tokens])) if min_tokens else 0
    return earliest_stop(text, stops, floor), text


class FullText:
    """The reference path's text: everything decoded again at each check (simple, and the ground truth)."""

    def __init__(self, decode: Callable[[list[int]], str], ids: list[int]):
        self.decode, self.ids = decode, ids

    def find_stop(self, stops: Sequence[str], min_tokens: int) -> tuple[int, str] | None:
        return exact_stop(self.decode, self.ids, stops, min_tokens)[0]


class IncrementalText:
    """The text of a sequence's generated ids (a list the engine only appends to) after its input, decoded as far
    as it is read. `exact` is the text of any number of them, decoded whole (a finished request's text).

    Thread-safe: the engine thread checks stop strings while a server's event loop reads earlier outputs' text.
    """

    WINDOW_CONTEXT = 4  # tokens of context before the first token decoded after a DecodeStream error

    def __init__(self, tokenizer: Tokenizer, ids: list[int], skip_special_tokens: bool = True,
                 input_ids: Sequence[int] = ()):
        self._tokenizer = tokenizer
        self._decode = tokenizer.decoder(skip_special_tokens)
        self.exact = ContinuedText(self._decode, input_ids)
        self._ids = ids
        self._lock = threading.Lock()
        self._text = ""
        self._ends = [0]  # _ends[n]: how much of _text the first n ids give
        self._checked = 0  # the text's length at the last stop-string check
        self.final: str | None = None  # the exact text, once a stop-string check decoded it whole
        self._skip = skip_special_tokens
        self._context: list[int] | None = None  # the input's context, once decoding starts
        self._stream = None
        self._window = (0, 0)  # without a stream: (context + ids)[start:read] is text that is out already

    def text(self, n: int | None = None) -> str:
        """The text of the first n ids (default: all), less an incomplete trailing character."""
        with self._lock:
            if n is None:
                n = len(self._ids)
            self._advance(n)
            end = self._ends[n]
            return self._text if end == len(self._text) else self._text[:end]

    def find_stop(self, stops: Sequence[str], min_tokens: int) -> tuple[int, str] | None:
        """`exact_stop` for the ids so far, looking only at text added since the last check; a hit found there is
        confirmed (and placed) on the exact text, decoded whole once. (A stop string holding U+FFFD could match an
        incomplete character that is held back: such a request decodes everything at each check.)"""
        n = len(self._ids)
        if not any(REPLACEMENT in stop for stop in stops):  # else it could match a held-back incomplete character
            with self._lock:
                self._advance(n)
                text = self._text  # n is every id there is: the text of them all
                floor = max(self._checked, self._ends[min(min_tokens, n)])
                self._checked = len(text)
            if earliest_stop(text, stops, floor) is None:
                return None
        hit, exact = exact_stop(self.exact, self._ids[:n], stops, min_tokens)
        if hit is not None:
            self.final = exact
        return hit

    def _start(self) -> None:
        """Decoding starts after the input's context: primed into the stream, or the window's first text."""
        self._context = self.exact.context[0]
        self._window = (0, len(self._context))
        self._stream = self._tokenizer.decode_stream(self._skip)
        try:
            for token in self._context:
                self._tokenizer.stream_step(self._stream, token)
        except Exception:  # noqa: BLE001 (see _piece)
            self._stream = None

    def _advance(self, n: int) -> None:
        if self._context is None:
            self._start()
        for i in range(len(self._ends) - 1, n):
            piece = self._piece(i)
            if piece:
                self._text += piece
            self._ends.append(len(self._text))

    def _span(self, start: int, end: int) -> list[int]:
        """(context + ids)[start:end]."""
        cut = len(self._context)
        if start >= cut:
            return self._ids[start - cut:end - cut]
        return self._context[start:end] + self._ids[:max(0, end - cut)]

    def _piece(self, i: int) -> str:
        """The new text once ids[i] is added ("" while it is held back)."""
        if self._stream is not None:
            try:
                return self._tokenizer.stream_step(self._stream, self._ids[i])
            except Exception:  # noqa: BLE001 (tokenizers' "Invalid prefix encountered" and its kin, vllm#17448)
                self._stream = None
                at = len(self._context) + i
                self._window = (max(0, at - self.WINDOW_CONTEXT), at)
        start, read = self._window
        end = len(self._context) + i + 1
        before, after = self._decode(self._span(start, read)), self._decode(self._span(start, end))
        if len(after) <= len(before) or after.endswith(REPLACEMENT):
            return ""
        self._window = (read, end)
        if after.startswith(before):
            return after[len(before):]
        same = 0  # a clean-up across the window's edge changed text already out: keep it, add the rest
        while same < len(before) and before[same] == after[same]:
            same += 1
        return after[same:]
