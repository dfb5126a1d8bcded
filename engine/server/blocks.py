"""A streamed chat answer as a sequence of blocks (a thought, text, tool calls), for the APIs whose streams are
told that way (OpenAI's Responses API, Anthropic's Messages API): the chat format's deltas open, fill and close
blocks in order; a subclass says what events each of those makes."""

from __future__ import annotations

from dataclasses import dataclass

from ..request import RequestOutput
from .formatting import ChatFormat

THOUGHT, TEXT, CALL = "reasoning", "text", "call"


@dataclass
class Block:
    kind: str  # THOUGHT | TEXT | CALL
    index: int  # its place in the answer
    text: str = ""  # a thought's or text's characters, a call's arguments (JSON text)
    call_id: str | None = None
    name: str | None = None  # a call's function


class BlockStream:
    """Subclasses make the events: `on_start`, `on_open`, `on_delta`, `on_close`, `on_finish`."""

    def __init__(self, chat: ChatFormat):
        self.chat = chat
        self.blocks: list[Block] = []  # closed, in order
        self.open: Block | None = None
        self.started = False

    def chunks(self, index: int, out: RequestOutput) -> list[dict]:
        events = []
        if not self.started:
            self.started = True
            events += self.on_start(out)
        for chunk in self.chat.chunks(index, out):
            delta = chunk["choices"][0]["delta"]
            if delta.get("reasoning_content"):
                events += self._text(THOUGHT, delta["reasoning_content"])
            if delta.get("content"):
                events += self._text(TEXT, delta["content"])
            for call in delta.get("tool_calls") or ():
                events += self._call(call)
        if out.finished:
            events += self._close() + self.on_finish(out)
        return events

    def stream_chunks(self, index: int, out: RequestOutput) -> list[dict]:
        return self.chunks(index, out)

    def final_chunks(self) -> list[dict]:
        return []

    def error_event(self, status: int, message: str, type_: str, code: str | None) -> str:
        """The event that ends a stream the engine failed in; subclasses give their API's."""
        raise NotImplementedError

    def _switch(self, kind: str, call_id: str | None = None, name: str | None = None) -> list[dict]:
        events = self._close()
        self.open = Block(kind, len(self.blocks), call_id=call_id, name=name)
        return events + self.on_open(self.open)

    def _close(self) -> list[dict]:
        block, self.open = self.open, None
        if block is None:
            return []
        self.blocks.append(block)
        return self.on_close(block)

    def _text(self, kind: str, piece: str) -> list[dict]:
        events = [] if self.open is not None and self.open.kind == kind else self._switch(kind)
        self.open.text += piece
        return events + self.on_delta(self.open, piece)

    def _call(self, delta: dict) -> list[dict]:
        function = delta.get("function", {})
        events = self._switch(CALL, delta["id"], function.get("name", "")) if delta.get("id") is not None else []
        piece = function.get("arguments", "")
        if piece and self.open is not None and self.open.kind == CALL:
            self.open.text += piece
            events += self.on_delta(self.open, piece)
        return events

    # ---- what a subclass says ----------------------------------------------------------------------------
    def on_start(self, out: RequestOutput) -> list[dict]:
        return []

    def on_open(self, block: Block) -> list[dict]:
        return []

    def on_delta(self, block: Block, piece: str) -> list[dict]:
        return []

    def on_close(self, block: Block) -> list[dict]:
        return []

    def on_finish(self, out: RequestOutput) -> list[dict]:
        return []
