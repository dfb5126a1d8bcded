"""gpt-oss's harmony format, read from an answer decoded with its special tokens.

A chat prompt ends with `<|start|>assistant`; the answer is then messages, each a header up to `<|message|>` (the
channel, `<|channel|>analysis` / `commentary` / `final`, and for a tool call its recipient, `to=functions.NAME`,
maybe `<|constrain|>json`) and a body up to `<|end|>`, `<|return|>` or `<|call|>`; later messages open with
`<|start|>assistant`. The analysis channel is the thought; final (and commentary addressed to no one, a preamble)
the answer; a message to `functions.NAME` a tool call whose body is its arguments.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .stopping import partial_marker_length

START, END, MESSAGE, CHANNEL = "<|start|>", "<|end|>", "<|message|>", "<|channel|>"
RETURN, CALL = "<|return|>", "<|call|>"
TAGS = (START, END, MESSAGE, CHANNEL, "<|constrain|>", RETURN, CALL)
_TERMINATOR = re.compile("|".join(re.escape(t) for t in (END, RETURN, CALL)))
_CHANNEL = re.compile(re.escape(CHANNEL) + r"\s*([A-Za-z_]+)")
_RECIPIENT = re.compile(r"\bto=([^\s<]+)")


@dataclass(frozen=True)
class Message:
    channel: str  # "analysis", "commentary", "final", or "" (no header)
    recipient: str | None  # a tool call's, e.g. "functions.get_weather"
    header: str  # as written, up to <|message|>
    body: str  # up to its terminator (or the end of the text so far)


def read_messages(text: str, finished: bool = True) -> list[Message]:
    """The messages of an answer. While it is still growing (`finished` False), a tag that may be arriving at the
    end is held back, and a message whose header is not complete yet (no `<|message|>`) is left out, so what is
    read only ever grows. Text outside any message (no header at all, or after a terminator) reads as a headerless
    message: content."""
    if not finished:
        text = text[:len(text) - partial_marker_length(text, TAGS)]
    messages = []
    for i, segment in enumerate(text.split(START)):
        if MESSAGE in segment:
            header, body = segment.split(MESSAGE, 1)
        elif i == 0 and CHANNEL not in segment:  # the answer opened with no header: plain text
            if not finished and not segment.strip():
                continue  # (whitespace: a header may follow)
            header, body = "", segment
        else:
            continue  # a header still arriving (or one that never got its message)
        found = _TERMINATOR.search(body)
        stray = ""
        if found:
            body, stray = body[:found.start()], body[found.end():]
        channel = _CHANNEL.search(header)
        recipient = _RECIPIENT.search(header)
        messages.append(Message(channel[1] if channel else "", recipient[1] if recipient else None, header, body))
        if stray:
            messages.append(Message("", None, "", stray))
    return messages


def raw_call(message: Message) -> str:
    """A tool-call message as it was written (without its terminator), for the tool-call parser to read back."""
    return f"{START}{message.header}{MESSAGE}{message.body}"


def split(text: str, finished: bool = True) -> tuple[str | None, str | None]:
    """(thought, answer) of an answer: the analysis bodies, and the other bodies with tool-call messages kept
    whole (`raw_call`); None where there is none."""
    thought, answer = [], []
    for m in read_messages(text, finished):
        if m.recipient is not None:
            answer.append(raw_call(m))
        elif m.channel == "analysis":
            thought.append(m.body)
        else:
            answer.append(m.body)
    return ("".join(thought) if thought else None), ("".join(answer) if answer else None)
