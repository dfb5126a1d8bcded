"""When a sequence stops: stop token ids, EOS, stop strings, max_new_tokens."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .sampling import SamplingParams


@dataclass(frozen=True)
class Finish:
    reason: str  # "stop" | "length"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    text_end: int | None = None  # where to cut the text (before a stop string)


def check_finish(
    generated: list[int],
    params: SamplingParams,
    eos_token_ids: tuple[int, ...],
    decode: Callable[[list[int]], str] | None,
) -> Finish | None:
    """Called after each new token; None while the sequence should go on (always, before `min_tokens`)."""
    if len(generated) < params.min_tokens:  # min_tokens <= max_new_tokens
        return None
    last = generated[-1]
    if last in params.stop_token_ids:
        return Finish("stop", last)
    if not params.ignore_eos and last in eos_token_ids:
        return Finish("stop", last)
    if params.stop and decode is not None:
        text = decode(generated)
        hits = [(text.find(s), s) for s in params.stop if s in text]
        if hits:
            pos, s = min(hits)
            return Finish("stop", s, pos)
    if len(generated) >= params.max_new_tokens:
        return Finish("length")
    return None
