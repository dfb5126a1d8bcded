"""What users submit (Request) and what they get back (RequestOutput)."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

from .sampling import SamplingParams, TokenLogprob

_ids = itertools.count()


@dataclass
class Request:
    """One generation: a task's prompt name (None: no prompt) and the input as token ids, text, or chat `messages`
    (rendered by the tokenizer's chat template, as vLLM's `LLM.chat`; `chat_template_kwargs`: apply_chat_template's
    options, e.g. `add_generation_prompt` (default True), `continue_final_message`, and the template's variables;
    `tools`: OpenAI-style function definitions for the template to render, as vLLM's `LLM.chat(tools=...)`)."""

    prompt: str | None = None
    input_ids: list[int] | None = None
    text: str | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    request_id: str | None = None
    messages: list[dict] | None = None
    chat_template_kwargs: dict | None = None
    tools: list[dict] | None = None
    priority: int = 0  # with Engine(scheduling_policy="priority"): lower runs first (vLLM's)

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


class _ReadOnce:
    """A dataclass field that may be given a `PendingText`, computed when the field is first read (then kept)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.slot = f"_{name}"

    def __get__(self, obj: object, owner: type | None = None) -> str | None:
        if obj is None:
            return None  # the field's default
        value = obj.__dict__[self.slot]
        if isinstance(value, PendingText):
            value = obj.__dict__[self.slot] = value()
        return value

    def __set__(self, obj: object, value: object) -> None:
        obj.__dict__[self.slot] = value


class PendingText:
    """A text computed when first read, `fn(*args)`: an output's text costs a decode, and most outputs of a step are
    never read for their text (a server's non-streaming requests read only their last one)."""

    __slots__ = ("args", "fn")

    def __init__(self, fn: Callable[..., str], *args: object):
        self.fn, self.args = fn, args

    def __call__(self) -> str:
        return self.fn(*self.args)


@dataclass
class RequestOutput:
    """A request's tokens (and text) so far; `finish_reason` is None while it runs."""

    request_id: str
    prompt: str | None
    prompt_version: str | None
    input_ids: list[int]
    token_ids: list[int]
    text: str | None = _ReadOnce()  # None without a tokenizer; decoded when first read
    finish_reason: str | None = None  # "stop" | "length" | "abort"; None while running
    stop_reason: int | str | None = None
    logprobs: list[TokenLogprob] | None = None
    timing: RequestTiming | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # with SamplingParams.prompt_logprobs; first None
    num_cached_tokens: int = 0  # input tokens whose K/V the request-block cache held (vLLM's num_cached_tokens)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def __getstate__(self) -> dict:  # pickled (e.g. between processes) with its text decoded
        self.text  # noqa: B018
        return self.__dict__
