"""Sampling parameters and the per-request sampler shared by every path (reference and batched)."""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .errors import SamplingParamsError
from .guided import MAX_GUIDED_CHOICES, allowed_next
from .structured import GrammarGuide, apply_guides, canonical_json_schema

if TYPE_CHECKING:
    from .reasoning import ThoughtGate

MAX_LOGPROBS = 20
MAX_BAD_WORDS = 128
MAX_LOGIT_BIAS = 100.0  # OpenAI's range: -100 (ban) to 100 (force)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. `temperature=0` is greedy (the default).

    The logit processors run in vLLM's order, before greedy or sampled picking: `allowed_token_ids` or
    `guided_choice` (every other token masked out), `logit_bias`, `bad_words`, the `min_tokens`
    mask (EOS and `stop_token_ids` banned until that many tokens exist; stop strings are not checked before
    either), `repetition_penalty` (HF/vLLM: over the request's input ids and generated tokens, a positive logit
    is divided by it, a negative one multiplied), then `frequency_penalty` x count and `presence_penalty` (OpenAI:
    over generated tokens). Sampling then scales by `temperature` and applies `min_p`, `top_k`, `top_p`. Logprobs
    stay those of the raw model distribution.
    """

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0  # 0 or -1: no top-k cut
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: no logprobs; N: the sampled token's and the top-N
    presence_penalty: float = 0.0  # in [-2, 2]
    frequency_penalty: float = 0.0  # in [-2, 2]
    repetition_penalty: float = 1.0  # > 0; 1 is none
    min_p: float = 0.0  # in [0, 1]: drop tokens less likely than min_p x the most likely one
    min_tokens: int = 0  # <= max_new_tokens
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias in [-100, 100]); a dict is accepted
    prompt_logprobs: int | None = None  # N: each input token's logprob and the top-N there (the first: None)
    # the text (vLLM's options): a stop string, or the text of a stop token id / EOS that ended the request, is left
    # out unless include_stop_str_in_output; special tokens' text is left out unless skip_special_tokens=False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    allowed_token_ids: tuple[int, ...] | None = None  # vLLM's: only these may be picked (None: any)
    # vLLM's guided_choice: the output is one of these texts, each as the tokenizer encodes it alone (the engine
    # fills choice_token_ids from them; give choice_token_ids yourself to work on token ids)
    guided_choice: tuple[str, ...] | None = None
    choice_token_ids: tuple[tuple[int, ...], ...] | None = None
    # vLLM's bad_words: never generated (each word as encoded alone and, where that is another token, after a
    # space); a word's last token is banned where the tokens before it were just generated. The engine adds their
    # ids to bad_words_token_ids (give ids there yourself to work without a tokenizer)
    bad_words: tuple[str, ...] = ()
    bad_words_token_ids: tuple[tuple[int, ...], ...] = ()
    # structured outputs (vLLM's, through xgrammar: engine/structured.py): the output follows a JSON schema (a dict
    # or its JSON text), any JSON value (guided_json_object, OpenAI's JSON mode), a regular expression or an EBNF
    # grammar (GBNF), however the tokens spell it; at most one of these and guided_choice
    guided_json: str | None = None
    guided_regex: str | None = None
    guided_grammar: str | None = None
    guided_json_object: bool = False
    disable_any_whitespace: bool = False  # JSON kinds: a space only after "," and ":" (vLLM's option)
    # vLLM's: keep only the input's last k tokens (-1: as many as fit the model's positions after the task's
    # prompt with one new token)
    truncate_prompt_tokens: int | None = None

    def __post_init__(self) -> None:
        # normalise lists given by users into tuples (the dataclass is frozen)
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if isinstance(self.bad_words, str):
            object.__setattr__(self, "bad_words", (self.bad_words,))
        for name in ("allowed_token_ids", "guided_choice", "choice_token_ids", "bad_words", "bad_words_token_ids"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, bytes)):
                try:
                    value = tuple(value)
                    if name in ("choice_token_ids", "bad_words_token_ids"):
                        value = tuple(tuple(ids) if isinstance(ids, (list, tuple)) else ids for ids in value)
                    object.__setattr__(self, name, value)
                except TypeError:
                    pass  # validate() names it
        if self.guided_json is not None:
            try:
                object.__setattr__(self, "guided_json", canonical_json_schema(self.guided_json))
            except ValueError as exc:
                raise SamplingParamsError(f"invalid sampling params: {exc}") from None
        bias = self.logit_bias.items() if isinstance(self.logit_bias, dict) else self.logit_bias
        try:
            bias = tuple((k, v) for k, v in bias)
        except (TypeError, ValueError):
            raise SamplingParamsError(
                f"invalid sampling params: logit_bias must map token ids to biases, got {self.logit_bias!r}"
            ) from None
        object.__setattr__(self, "logit_bias", bias)
        self.validate()
        object.__setattr__(self, "logit_bias", tuple(sorted(bias)))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def structured(self) -> tuple[str, str] | None:
        """(kind, spec) of the structured output asked for (engine/structured.py), or None."""
        if self.guided_json is not None:
            return "json", self.guided_json
        if self.guided_regex is not None:
            return "regex", self.guided_regex
        if self.guided_grammar is not None:
            return "grammar", self.guided_grammar
        return ("json_object", "") if self.guided_json_object else None

    @property
    def processes_logits(self) -> bool:
        """Whether any logit processor applies (then the row needs its token history and full logits)."""
        return bool(self.logit_bias or self.min_tokens or self.repetition_penalty != 1.0
                    or self.frequency_penalty or self.presence_penalty or self.allowed_token_ids is not None
                    or self.choice_token_ids is not None or bool(self.bad_words_token_ids)
                    or self.structured is not None)

    @property
    def screenable(self) -> bool:
        """Whether the exact int8 greedy screen may pick the token: greedy, no logprobs, no logit processor."""
        return self.greedy and self.logprobs is None and not self.processes_logits

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

        if self.prompt_logprobs is not None and (
            isinstance(self.prompt_logprobs, bool) or not isinstance(self.prompt_logprobs, int)
            or not 0 <= self.prompt_logprobs <= MAX_LOGPROBS
        ):
            raise bad(f"prompt_logprobs must be None or an integer in [0, {MAX_LOGPROBS}], "
                      f"got {self.prompt_logprobs!r}")

        def number(name: str, low: float, high: float) -> None:
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                    or not low <= value <= high):
                raise bad(f"{name} must be a number in [{low:g}, {high:g}], got {value!r}")

        number("presence_penalty", -2.0, 2.0)
        number("frequency_penalty", -2.0, 2.0)
        number("min_p", 0.0, 1.0)
        rp = self.repetition_penalty
        if isinstance(rp, bool) or not isinstance(rp, (int, float)) or not math.isfinite(rp) or rp <= 0:
            raise bad(f"repetition_penalty must be a finite number > 0 (1: none), got {rp!r}")
        if isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise bad(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if self.min_tokens > self.max_new_tokens:
            raise bad(f"min_tokens ({self.min_tokens}) must not exceed max_new_tokens ({self.max_new_tokens})")
        for token, value in self.logit_bias:
            if isinstance(token, bool) or not isinstance(token, int) or token < 0:
                raise bad(f"logit_bias keys must be non-negative token ids, got {token!r}")
            if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                    or abs(value) > MAX_LOGIT_BIAS):
                raise bad(f"logit_bias values must be numbers in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], "
                          f"got {value!r} for token {token}")
        if len({token for token, _ in self.logit_bias}) != len(self.logit_bias):
            raise bad("logit_bias gives a token id twice")
        allowed = self.allowed_token_ids
        if allowed is not None and (not isinstance(allowed, tuple) or not allowed or any(
                isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in allowed)):
            raise bad(f"allowed_token_ids must be a non-empty list of non-negative token ids, got {allowed!r}")
        k = self.truncate_prompt_tokens
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not (k == -1 or k >= 1)):
            raise bad(f"truncate_prompt_tokens must be -1 or an integer >= 1, got {k!r}")
        self._validate_token_lists(bad)
        for name in ("include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise bad(f"{name} must be true or false, got {getattr(self, name)!r}")

    def _validate_token_lists(self, bad: Callable[[str], SamplingParamsError]) -> None:
        """guided_choice / choice_token_ids and bad_words / bad_words_token_ids."""
        choices, ids = self.guided_choice, self.choice_token_ids
        if choices is not None and (not isinstance(choices, tuple) or not 0 < len(choices) <= MAX_GUIDED_CHOICES
                                    or any(not isinstance(c, str) or not c for c in choices)):
            raise bad(f"guided_choice must be a list of 1 to {MAX_GUIDED_CHOICES} non-empty strings, got {choices!r}")
        if ids is not None and (not isinstance(ids, tuple) or not 0 < len(ids) <= MAX_GUIDED_CHOICES or any(
                not isinstance(c, tuple) or not c or any(isinstance(t, bool) or not isinstance(t, int) or t < 0
                                                         for t in c) for c in ids)):
            raise bad(f"choice_token_ids must be a list of 1 to {MAX_GUIDED_CHOICES} non-empty lists of token ids, "
                      f"got {ids!r}")
        if (choices is not None or ids is not None) and (self.allowed_token_ids is not None or self.min_tokens):
            raise bad("guided_choice cannot be combined with allowed_token_ids or min_tokens")
        for name in ("guided_regex", "guided_grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise bad(f"{name} must be a non-empty string, got {value!r}")
        for name in ("guided_json_object", "disable_any_whitespace"):
            if not isinstance(getattr(self, name), bool):
                raise bad(f"{name} must be true or false, got {getattr(self, name)!r}")
        asked = [name for name in ("guided_choice", "guided_json", "guided_regex", "guided_grammar")
                 if getattr(self, name) is not None] + ["guided_json_object"] * self.guided_json_object
        if ids is not None and choices is None:
            asked.append("choice_token_ids")
        if len(asked) > 1:
            raise bad(f"give at most one of {', '.join(asked)}")
        if self.structured is not None:
            for name in ("allowed_token_ids", "min_tokens", "ignore_eos"):
                if getattr(self, name) not in (None, 0, False):
                    raise bad(f"{asked[0]} cannot be combined with {name} (the grammar ends the output with EOS)")
        words, word_ids = self.bad_words, self.bad_words_token_ids
        if not isinstance(words, tuple) or len(words) > MAX_BAD_WORDS or any(
                not isinstance(w, str) or not w.strip() for w in words):
            raise bad(f"bad_words must be a list of at most {MAX_BAD_WORDS} strings with text, got {words!r}")
        if not isinstance(word_ids, tuple) or len(word_ids) > 2 * MAX_BAD_WORDS or any(
                not isinstance(w, tuple) or not w or any(isinstance(t, bool) or not isinstance(t, int) or t < 0
                                                         for t in w) for w in word_ids):
            raise bad(f"bad_words_token_ids must be a list of at most {2 * MAX_BAD_WORDS} non-empty lists of token "
                      f"ids, got {word_ids!r}")


@dataclass(frozen=True)
class TokenLogprob:
    """Log-probability (under the model's raw distribution) of the chosen token, and the top-N alternatives."""

    token_id: int
    logprob: float
    top: dict[int, float] = field(default_factory=dict)
    rank: int | None = None  # 1 + how many tokens were likelier (prompt logprobs, as vLLM reports them)


def token_logprobs(logits: torch.Tensor, targets: Sequence[int], top_n: int, rank: bool = True) -> list[TokenLogprob]:
    """Row i of fp32 logits [T, V] scored at targets[i]: its log-prob, its rank (unless rank=False: one pass over
    the rows less) and the top_n there (raw distribution)."""
    out = []
    chunk = 256  # rows of log-softmax at a time: long inputs times a large vocabulary add up
    for start in range(0, len(targets), chunk):
        lp = torch.log_softmax(logits[start:start + chunk].float(), dim=-1)
        part = list(targets[start:start + lp.shape[0]])
        picked = lp.gather(1, torch.tensor(part, device=lp.device)[:, None])
        ranks = ((lp > picked).sum(dim=-1) + 1).tolist() if rank else [None] * len(part)
        values = picked[:, 0].tolist()
        tops = torch.topk(lp, top_n) if top_n else None
        for j, (token, value) in enumerate(zip(part, values)):
            top = dict(zip(tops.indices[j].tolist(), tops.values[j].tolist())) if tops is not None else {}
            out.append(TokenLogprob(token, value, top, ranks[j]))
    return out


def make_generator(params: SamplingParams) -> torch.Generator | None:
    """One generator per request: from the same logits, a seeded request samples the same tokens whatever batch it
    is in. It lives on the CPU whatever the device (it draws one uniform a token: see draw_rows), so a seed samples
    alike on any."""
    if params.greedy:
        return None
    gen = torch.Generator()
    gen.manual_seed(params.seed if params.seed is not None else random.getrandbits(63))
    return gen


def process_logits(logits: torch.Tensor, params_list: list[SamplingParams],
                   histories: list[tuple[Sequence[int], Sequence[int]]], eos_token_ids: Sequence[int],
                   guides: Sequence[GrammarGuide | None] | None = None,
                   gates: Sequence[ThoughtGate | None] | None = None) -> torch.Tensor:
    """Rows of fp32 logits [B, V] after each row's logit processors (see SamplingParams), as a new tensor.

    `histories[i]`: row i's (input ids, generated tokens); `guides[i]`: its structured-output state, where its
    params ask for one; `gates[i]`: where its guided_choice holds on a thinking model's answer alone (its
    GrammarGuide holds its own gate). One scatter per processor for the whole batch, from (row, token) pairs: no
    dense [B, V] count matrix (a 128k vocabulary at 256 rows would be 128 MB)."""
    out = logits.clone()
    guided = [(row, guide) for row, guide in enumerate(guides or ()) if guide is not None]
    if guided:
        apply_guides(out, guided, histories)
    vocab = out.shape[1]
    device = out.device
    bias_rows, bias_ids, biases = [], [], []
    ban_rows, ban_ids = [], []
    rep_rows, rep_ids, rep_values = [], [], []
    pen_rows, pen_ids, pen_counts, pen_freq, pen_pres = [], [], [], [], []
    allow_rows, allow_ids = [], []
    eos = frozenset(eos_token_ids)
    for row, (params, (input_ids, generated)) in enumerate(zip(params_list, histories)):
        allowed = params.allowed_token_ids
        if params.choice_token_ids is not None:
            gate = None if gates is None else gates[row]
            answer = generated if gate is None else gate.answer(generated)
            if answer is not None:  # (None: in the thought, where the choice does not hold yet)
                allowed = allowed_next(params.choice_token_ids, answer, () if params.ignore_eos else eos_token_ids)
                if gate is not None and gate.may_open(generated):
                    allowed = [*allowed, gate.start_id]
        if allowed is not None:
            allowed = sorted({t for t in allowed if t < vocab})
            allow_rows += [row] * len(allowed)
            allow_ids += allowed
        for token, bias in params.logit_bias:
            if token < vocab:
                bias_rows.append(row), bias_ids.append(token), biases.append(bias)
        for word in params.bad_words_token_ids:  # vLLM's rule: the word's other tokens were the last generated
            before = len(word) - 1
            if before <= len(generated) and word[-1] < vocab and (
                    not before or tuple(generated[len(generated) - before:]) == word[:-1]):
                ban_rows.append(row), ban_ids.append(word[-1])
        if len(generated) < params.min_tokens:
            banned = set(params.stop_token_ids) | (set() if params.ignore_eos else eos)
            for token in sorted(t for t in banned if t < vocab):
                ban_rows.append(row), ban_ids.append(token)
        if params.repetition_penalty != 1.0:
            seen = sorted(set(input_ids).union(generated))
            rep_rows += [row] * len(seen)
            rep_ids += seen
            rep_values += [params.repetition_penalty] * len(seen)
        if (params.frequency_penalty or params.presence_penalty) and generated:
            counts = Counter(generated)
            pen_rows += [row] * len(counts)
            pen_ids += list(counts)
            pen_counts += list(counts.values())
            pen_freq += [params.frequency_penalty] * len(counts)
            pen_pres += [params.presence_penalty] * len(counts)

    def index(rows: list[int], ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.tensor(rows, dtype=torch.long, device=device), torch.tensor(ids, dtype=torch.long, device=device))

    def values(xs: list[float]) -> torch.Tensor:
        return torch.tensor(xs, dtype=out.dtype, device=device)

    if allow_rows:
        at = index(allow_rows, allow_ids)
        kept = out[at]
        out[sorted(set(allow_rows))] = float("-inf")
        out.index_put_(at, kept)
    if bias_rows:
        out.index_put_(index(bias_rows, bias_ids), values(biases), accumulate=True)
    if ban_rows:
        out.index_put_(index(ban_rows, ban_ids), values([float("-inf")]))
    if rep_rows:
        at = index(rep_rows, rep_ids)
        logit, penalty = out[at], values(rep_values)
        out.index_put_(at, torch.where(logit > 0, logit / penalty, logit * penalty))
    if pen_rows:
        at = index(pen_rows, pen_ids)
        out.index_put_(at, out[at] - (values(pen_freq) * values(pen_counts) + values(pen_pres)))
    masked = sorted(set(allow_rows) | set(ban_rows) | {row for row, _ in guided})
    if masked:
        _unblock_rows_left_empty(out, logits, masked, params_list, histories, eos_token_ids)
    return out


def _unblock_rows_left_empty(out: torch.Tensor, logits: torch.Tensor, masked: list[int],
                             params_list: list[SamplingParams], histories: list[tuple[Sequence[int], Sequence[int]]],
                             eos_token_ids: Sequence[int]) -> None:
    """Constraints that leave a row no token at all (bad_words banning every token a grammar or choice allows,
    min_tokens banning the only allowed EOS) would make the pick meaningless and sampling fail. Such a row gets
    EOS, which ends the request, where EOS may end it now; else its unprocessed logits. `masked`: the rows where
    some processor masked tokens out."""
    empty = torch.isneginf(out[masked]).all(dim=1).tolist()
    for row in (r for r, is_empty in zip(masked, empty) if is_empty):
        params, eos = params_list[row], [t for t in eos_token_ids if t < out.shape[1]]
        if eos and not params.ignore_eos and len(histories[row][1]) >= params.min_tokens:
            out[row, eos] = 0.0
        else:
            out[row] = logits[row]


def filtered_probs(logits: torch.Tensor, params_list: list[SamplingParams]) -> torch.Tensor:
    """Sampling probabilities [R, V] of sampled rows' fp32 logits [R, V]: each row scaled by its temperature, then
    its min_p, top_k and top_p cuts. One batched op per filter, and each row's values are what it would get alone
    (the ops are row-wise; a filter only touches the rows that use it)."""
    dtype, device, vocab = logits.dtype, logits.device, logits.shape[-1]

    def column(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=device)[:, None]

    scaled = logits / column([p.temperature for p in params_list])
    min_p = [p.min_p for p in params_list]
    if any(min_p):  # a row with min_p 0 keeps everything (no probability is below 0)
        probs = torch.softmax(scaled, dim=-1)
        scaled = scaled.masked_fill(probs < column(min_p) * probs.max(dim=-1, keepdim=True).values, float("-inf"))
    ks = [p.top_k if 0 < p.top_k < vocab else 0 for p in params_list]
    if any(ks):  # the k-th largest of each row with a top_k; -inf (nothing cut) for the others
        top = torch.topk(scaled, max(ks), dim=-1).values
        kth = top.gather(1, torch.tensor([max(k, 1) - 1 for k in ks], device=device)[:, None])
        kth = kth.masked_fill(column([float(k == 0) for k in ks]).bool(), float("-inf"))
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    cut = [i for i, p in enumerate(params_list) if p.top_p < 1.0]
    if cut:
        rows = torch.tensor(cut, device=device)
        probs = probs.index_copy(0, rows, _top_p(probs.index_select(0, rows), column([params_list[i].top_p
                                                                                          for i in cut])))
    return probs


_TOP_P_CANDIDATES = 256


def _top_p(probs: torch.Tensor, top_p: torch.Tensor, candidates: int = _TOP_P_CANDIDATES) -> torch.Tensor:
    """Rows of probabilities [R, V] cut to their top_p nucleus [R, 1] (best first, the tokens before which less
    than top_p of the mass lies) and renormalised. The nucleus is looked for among each row's `candidates`
    likeliest tokens (a top-k, far cheaper than sorting the vocabulary); a row whose candidates hold less than
    top_p of its mass, so that a token past them may belong, is sorted whole."""
    vocab = probs.shape[-1]
    whole = candidates >= vocab
    best, order = torch.sort(probs, dim=-1, descending=True) if whole else torch.topk(probs, candidates, dim=-1)
    upto = torch.cumsum(best, dim=-1)
    kept = best.masked_fill(upto - best >= top_p, 0.0)  # cut where the better tokens hold top_p already
    out = torch.zeros_like(probs).scatter_(1, order, kept)
    out = out / out.sum(dim=-1, keepdim=True)
    if not whole:
        short = torch.nonzero(upto[:, -1] < top_p[:, 0])[:, 0]
        if short.numel():
            out = out.index_copy(0, short, _top_p(probs.index_select(0, short), top_p.index_select(0, short), vocab))
    return out


def _filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """filtered_probs of one row [V]."""
    return filtered_probs(logits[None], [params])[0]


def draw_rows(probs: torch.Tensor, generators: list[torch.Generator | None]) -> list[int]:
    """One token from each row of probabilities [R, V] (any non-negative weights), by inverting the row's CDF at
    one uniform draw of its generator: exact, and over a large vocabulary far cheaper than torch.multinomial,
    which draws per-element randomness (`python -m benchmarks.sampling`). The uniforms come from the requests' CPU
    generators, so a seed gives the same draws on any device; the rest is one batched cumsum and search."""
    cdf = torch.cumsum(probs, dim=-1, dtype=torch.float64)
    u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64, device=None if g is None else g.device).cpu()
                   for g in generators]).to(probs.device)
    # the first token whose CDF passes u: never a 0-weight one
    tokens = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0].tolist()
    vocab = probs.shape[-1]
    for i, token in enumerate(tokens):
        if token >= vocab:  # u within rounding of the total: the row's last token with weight
            tokens[i] = int(torch.nonzero(probs[i]).max())
    return tokens


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """draw_rows of one row [V]."""
    return draw_rows(probs[None], [generator])[0]


def sample_next(
    logits: torch.Tensor,
    params_list: list[SamplingParams],
    generators: list[torch.Generator | None],
    histories: list[tuple[Sequence[int], Sequence[int]]] | None = None,
    eos_token_ids: Sequence[int] = (),
    processes: list[bool] | None = None,
    guides: Sequence[GrammarGuide | None] | None = None,
    gates: Sequence[ThoughtGate | None] | None = None,
) -> tuple[list[int], list[TokenLogprob | None]]:
    """Pick one token per row of fp32 logits [B, V]; each row uses only its own params and generator.

    `histories[i]`: row i's (input ids, generated tokens), needed where its params process logits.
    `processes[i]`: row i's `params.processes_logits`, if the caller has it already (the engine, every step).
    `guides[i]`: row i's GrammarGuide, needed where its params ask for a structured output; `gates[i]`: see
    process_logits."""
    tokens = torch.argmax(logits, dim=-1).tolist()
    if processes is None:
        processes = [params.processes_logits for params in params_list]
    processed = [i for i, p in enumerate(processes) if p]
    where = {}  # row -> its row in `sub`, the processed logits
    if processed:
        if histories is None:
            raise ValueError("sample_next needs the token histories of rows whose params process logits")
        if any(params_list[i].structured is not None and (guides is None or guides[i] is None) for i in processed):
            raise ValueError("sample_next needs a GrammarGuide for each row that asks for a structured output")
        rows = torch.tensor(processed, dtype=torch.long, device=logits.device)
        sub = process_logits(logits[rows], [params_list[i] for i in processed], [histories[i] for i in processed],
                             eos_token_ids, None if guides is None else [guides[i] for i in processed],
                             None if gates is None else [gates[i] for i in processed])
        where = {row: j for j, row in enumerate(processed)}
        for row, token in zip(processed, torch.argmax(sub, dim=-1).tolist()):
            tokens[row] = token
    sampled = [row for row, params in enumerate(params_list) if not params.greedy]
    if sampled:
        rows = torch.stack([sub[where[row]] if row in where else logits[row] for row in sampled])
        probs = filtered_probs(rows, [params_list[row] for row in sampled])
        for row, token in zip(sampled, draw_rows(probs, [generators[row] for row in sampled])):
            tokens[row] = token
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
