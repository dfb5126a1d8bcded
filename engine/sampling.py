"""Sampling parameters and the per-request sampler shared by every path (reference and batched)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import torch

from .errors import SamplingParamsError

MAX_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. `temperature=0` is greedy (the default)."""

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0  # 0 or -1: no top-k cut
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: no logprobs; N: the sampled token's and the top-N

    def __post_init__(self) -> None:
        # normalise lists given by users into tuples (the dataclass is frozen)
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> None:
        def bad(msg: str) -> SamplingParamsError:
            return SamplingParamsError(f"invalid sampling params: {msg}")

        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise bad(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise bad(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < -1:
            raise bad(f"top_k must be an integer >= 1, or 0/-1 to disable, got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or not (0.0 < self.top_p <= 1.0):
            raise bad(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise bad(f"seed must be an integer or None, got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad(f"stop strings must be non-empty strings, got {self.stop!r}")
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise bad(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
        if self.logprobs is not None and (
            isinstance(self.logprobs, bool) or not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= MAX_LOGPROBS
        ):
            raise bad(f"logprobs must be None or an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")


@dataclass(frozen=True)
class TokenLogprob:
    """Log-probability (under the model's raw distribution) of the chosen token, and the top-N alternatives."""

    token_id: int
    logprob: float
    top: dict[int, float] = field(default_factory=dict)


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """One generator per request: a seeded request samples the same tokens whatever batch it is in."""
    if params.greedy:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(params.seed if params.seed is not None else random.getrandbits(63))
    return gen


def _filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    scaled = logits / params.temperature
    if params.top_k > 0 and params.top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, params.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass of strictly better tokens
        sorted_probs = sorted_probs.masked_fill(before >= params.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        probs = probs / probs.sum()
    return probs


def sample_next(
    logits: torch.Tensor, params_list: list[SamplingParams], generators: list[torch.Generator | None]
) -> tuple[list[int], list[TokenLogprob | None]]:
    """Pick one token per row of fp32 logits [B, V]; each row uses only its own params and generator."""
    tokens = torch.argmax(logits, dim=-1).tolist()
    for row, (params, gen) in enumerate(zip(params_list, generators)):
        if not params.greedy:
            probs = _filtered_probs(logits[row], params)
            tokens[row] = int(torch.multinomial(probs, 1, generator=gen).item())
    need_logprobs = [p.logprobs is not None for p in params_list]
    logprobs: list[TokenLogprob | None] = [None] * len(params_list)
    if any(need_logprobs):
        rows = [i for i, need in enumerate(need_logprobs) if need]
        lp = torch.log_softmax(logits[rows], dim=-1)
        for j, row in enumerate(rows):
            n = params_list[row].logprobs
            top = {}
            if n:
                values, ids = torch.topk(lp[j], n)
                top = dict(zip(ids.tolist(), values.tolist()))
            logprobs[row] = TokenLogprob(tokens[row], float(lp[j, tokens[row]]), top)
    return tokens, logprobs
