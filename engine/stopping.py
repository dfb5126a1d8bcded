"""When a sequence stops: stop token ids, EOS, stop strings, max_new_tokens."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from .guided import choice_complete
from .sampling import SamplingParams

if TYPE_CHECKING:
    from .reasoning import ThoughtGate


@dataclass(frozen=True)
class Finish:
    reason: str  # "stop" | "length"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    text_end: int | None = None  # where to cut the text (before a stop string, or after it if it is included)


def partial_marker_length(text: str, markers: Sequence[str]) -> int:
    """How many trailing characters of `text` could begin one of `markers` (a stream holds them back until it is
    clear whether the marker follows: a stop string, a tool call's or a thought's tag)."""
    held = 0
    for marker in markers:
        for k in range(min(len(marker) - 1, len(text)), held, -1):
            if text.endswith(marker[:k]):
                held = k
                break
    return held


class StopText(Protocol):
    """The generated text, as engine/detokenizer.py keeps it (decoded whole each time, or incrementally)."""

    def find_stop(self, stops: Sequence[str], min_tokens: int) -> tuple[int, str] | None: ...


def check_finish(
    generated: list[int],
    params: SamplingParams,
    eos_token_ids: tuple[int, ...],
    text: StopText | None,
    gate: ThoughtGate | None = None,
) -> Finish | None:
    """Called after each new token; None while the sequence should go on (always, before `min_tokens`).
    A stop string counts where it ends after the text of the first `min_tokens` tokens, as in vLLM. `gate`: where
    a guided_choice holds on a thinking model's answer alone."""
    if len(generated) < params.min_tokens:  # min_tokens <= max_new_tokens
        return None
    last = generated[-1]
    if last in params.stop_token_ids:
        return Finish("stop", last)
    if not params.ignore_eos and last in eos_token_ids:
        return Finish("stop", last)
    answer = generated if gate is None or params.choice_token_ids is None else gate.answer(generated)
    if params.choice_token_ids is not None and answer is not None and choice_complete(params.choice_token_ids,
                                                                                      answer):
        return Finish("stop")
    if params.stop and text is not None:
        hit = text.find_stop(params.stop, params.min_tokens)
        if hit is not None:
            start, stop = hit
            return Finish("stop", stop, start + len(stop) if params.include_stop_str_in_output else start)
    if len(generated) >= params.max_new_tokens:
        return Finish("length")
    return None
