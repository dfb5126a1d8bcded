"""A request's state inside the runtime."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from .detokenizer import IncrementalText
from .prompts import SoftPrompt
from .request import Request, RequestTiming
from .sampling import SamplingParams, TokenLogprob


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """Own tokens (input + generated) live in own blocks; the task prefix is the prompt's shared blocks.

    `num_computed` counts own tokens whose K/V are in the pool. Preemption frees the own blocks and resets it:
    the sequence is recomputed from its tokens (input and those generated so far) when it runs again. With the
    block cache, its leading blocks may be cached ones another request computed (shared, never written).
    """

    request: Request
    prompt: SoftPrompt | None
    input_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    timing: RequestTiming
    arrival_order: int
    generated: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)  # filled as prefill computes them
    blocks: list[int] = field(default_factory=list)
    num_computed: int = 0
    cached_serials: list[int] = field(default_factory=list)  # the block cache entries of its leading full blocks
    num_cached_tokens: int | None = None  # input tokens found in the block cache when first admitted
    status: Status = Status.WAITING
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    text_end: int | None = None
    text: IncrementalText | None = None  # the generated text as far as it was read (with a tokenizer)
    prefix: object | None = None  # the PrefixEntry held while running
    guide: object | None = None  # its GrammarGuide (engine/structured.py), where it asks for a structured output
    gate: object | None = None  # its ThoughtGate (engine/reasoning.py), where its constraint waits for the answer
    # derived from params once (asked of every sequence each step): logit processors apply / the int8 greedy
    # screen may pick its token (greedy, no logprobs, no processors)
    processes_logits: bool = field(init=False, default=False)
    screenable: bool = field(init=False, default=False)

    @classmethod
    def of_tokens(cls, prompt: SoftPrompt | None, tokens: list[int]) -> Sequence:
        """A sequence of `tokens` after `prompt` that runs through the model outside the scheduler (scoring)."""
        return cls(Request(prompt=None if prompt is None else prompt.name, input_ids=tokens), prompt, tokens,
                   SamplingParams(), None, RequestTiming(time.perf_counter()), -1)

    def __post_init__(self) -> None:
        if self.params is None:  # a sequence built for its tokens alone (tests, tools)
            return
        self.processes_logits = self.params.processes_logits
        self.screenable = self.params.screenable

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def tokens(self) -> list[int]:
        return self.input_ids + self.generated

    def token_slice(self, start: int, n: int) -> list[int]:
        """tokens[start:start + n] without building `tokens` (a decode step takes one token of each sequence)."""
        cut = len(self.input_ids)
        if start >= cut:
            return self.generated[start - cut:start - cut + n]
        if start + n <= cut:
            return self.input_ids[start:start + n]
        return self.input_ids[start:] + self.generated[:start + n - cut]

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids) + len(self.generated)

    @property
    def prefix_length(self) -> int:
        return 0 if self.prompt is None else self.prompt.length

    @property
    def remaining_prefill(self) -> int:
        return self.num_tokens - self.num_computed
