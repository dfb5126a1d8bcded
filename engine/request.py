"""What users submit (Request) and what they get back (RequestOutput)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from .sampling import SamplingParams, TokenLogprob

_ids = itertools.count()


@dataclass
class Request:
    """One generation: a task's prompt name (None: no prompt) and the input as token ids or text."""

    prompt: str | None = None
    input_ids: list[int] | None = None
    text: str | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    request_id: str | None = None

    def __post_init__(self) -> None:
        if self.request_id is None:
            self.request_id = f"req-{next(_ids)}"


@dataclass
class RequestTiming:
    arrival: float
    first_token: float | None = None
    finished: float | None = None

    @property
    def ttft(self) -> float | None:
        """Time to first token, seconds."""
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def latency(self) -> float | None:
        return None if self.finished is None else self.finished - self.arrival


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_version: str | None
    input_ids: list[int]
    token_ids: list[int]
    text: str | None
    finish_reason: str | None  # "stop" | "length" | "abort"; None while running
    stop_reason: int | str | None = None
    logprobs: list[TokenLogprob] | None = None
    timing: RequestTiming | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
