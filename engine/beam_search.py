"""Beam search as HF transformers' `generate(num_beams=k, do_sample=False)` runs it (so as PEFT's generate runs a
prompt-tuned model), driven over the engine: each step, every live beam of every request is one engine request for
one token with its top log-probabilities, all in one continuous batch; the block cache finds each beam's earlier
blocks, so a step computes about a block per beam (vLLM's `LLM.beam_search` drives its engine the same way).

HF's algorithm, step by step: the live beams' continuations are ranked by their summed log-probabilities (the
model's raw distribution, fp32); of the best `keep` = max(2, 1 + #EOS) * k, those among the first k that end (an
EOS token, or the last allowed token) are finished hypotheses scored sum / generated_length ** length_penalty
(the best k finished are kept), and the best k that do not end live on. A request stops when the best live beam
can no longer beat the worst finished one (`early_stopping=False`, HF's default heuristic), when k hypotheses
are finished (`True`), or only when none can improve (`"never"`); its answers are the finished hypotheses, best
first. Only a beam's top k + #EOS tokens can be among the ranked `keep`, so that many log-probabilities a beam are
asked for (at most the engine's MAX_LOGPROBS).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields

from .errors import SamplingParamsError
from .request import Request, RequestOutput
from .sampling import MAX_LOGPROBS, SamplingParams


@dataclass(frozen=True)
class BeamSearchParams:
    beam_width: int  # HF's num_beams, vLLM's beam_width
    max_new_tokens: int = 16
    length_penalty: float = 1.0  # a finished hypothesis scores sum(logprobs) / length ** length_penalty
    early_stopping: bool | str = False  # HF's: False (its heuristic), True, or "never"
    ignore_eos: bool = False
    skip_special_tokens: bool = True  # for the answers' text

    def __post_init__(self) -> None:
        def bad(msg: str) -> SamplingParamsError:
            return SamplingParamsError(f"invalid beam search params: {msg}")

        for name in ("beam_width", "max_new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise bad(f"{name} must be an integer >= 1, got {value!r}")
        if isinstance(self.length_penalty, bool) or not isinstance(self.length_penalty, (int, float)) or not (
                -1e6 < self.length_penalty < 1e6):
            raise bad(f"length_penalty must be a finite number, got {self.length_penalty!r}")
        if self.early_stopping not in (False, True, "never"):
            raise bad(f"early_stopping must be false, true or 'never', got {self.early_stopping!r}")


@dataclass
class BeamSequence:
    """One answer: its generated tokens (the ending EOS included), their text, log-probabilities and score."""

    token_ids: list[int]
    cumulative_logprob: float
    score: float  # cumulative_logprob / len(token_ids) ** length_penalty, by which the answers are ranked
    finish_reason: str  # "stop" (EOS) or "length"
    text: str | None = None
    logprobs: list[float] = field(default_factory=list)  # each token's, under the model's raw distribution


@dataclass
class BeamSearchOutput:
    request_id: str
    prompt: str | None
    input_ids: list[int]
    sequences: list[BeamSequence] = field(default_factory=list)  # best first, beam_width of them


@dataclass
class _Hypothesis:
    tokens: list[int]
    logprob: float  # summed
    token_logprobs: list[float] = field(default_factory=list)

    def then(self, token: int, logprob: float) -> _Hypothesis:
        """This hypothesis with `token`, the summed log-probability being `logprob`."""
        return _Hypothesis([*self.tokens, token], logprob, [*self.token_logprobs, logprob - self.logprob])


class BeamState:
    """One request's beams (HF's per-batch-item state)."""

    def __init__(self, params: BeamSearchParams, eos: frozenset[int], max_new_tokens: int):
        self.params, self.eos, self.max_new_tokens = params, eos, max_new_tokens
        self.live = [_Hypothesis([], 0.0)]
        self.finished: list[tuple[float, _Hypothesis, str]] = []  # (score, hypothesis, finish reason), best first
        self.improvable = True  # HF's is_early_stop_heuristic_unsatisfied
        self.done = False

    def advance(self, tops: list[dict[int, float]]) -> None:
        """One step: `tops[i]` is live beam i's top next tokens and their log-probabilities."""
        k, p = self.params.beam_width, self.params
        length = len(self.live[0].tokens) + 1  # generated tokens after this step
        candidates = sorted(((beam.logprob + lp, i, rank, token) for i, beam in enumerate(self.live)
                             for rank, (token, lp) in enumerate(tops[i].items())),
                            key=lambda c: (-c[0], c[1], c[2]))
        keep = max(2, 1 + (0 if p.ignore_eos else len(self.eos))) * k
        candidates = candidates[:keep]
        last = length >= self.max_new_tokens

        def ends(token: int) -> bool:
            return last or (not p.ignore_eos and token in self.eos)

        full = len(self.finished) == k
        if self.improvable and not (full and p.early_stopping is True):
            for logprob, i, _, token in candidates[:k]:
                if ends(token):
                    reason = "stop" if not p.ignore_eos and token in self.eos else "length"
                    hyp = self.live[i].then(token, logprob)
                    self.finished.append((logprob / length ** p.length_penalty, hyp, reason))
            self.finished.sort(key=lambda f: -f[0])
            del self.finished[k:]
        self.live = [self.live[i].then(token, logprob) for logprob, i, _, token in candidates if not ends(token)][:k]
        if self.live and len(self.finished) == k:  # HF's early-stop heuristic
            hypothetical = self.max_new_tokens if (p.early_stopping == "never" and p.length_penalty > 0) else length
            self.improvable = self.improvable and (
                self.live[0].logprob / hypothetical ** p.length_penalty > self.finished[-1][0])
        full = len(self.finished) == k
        self.done = not self.live or not self.improvable or (full and p.early_stopping is True)

    def answers(self, decode) -> list[BeamSequence]:
        return [BeamSequence(hyp.tokens, hyp.logprob, score, reason, None if decode is None else decode(hyp.tokens),
                             hyp.token_logprobs) for score, hyp, reason in self.finished]


# the SamplingParams fields a beam search takes (into BeamSearchParams); any other one set would change the search
SEARCH_SAMPLING_FIELDS = ("max_new_tokens", "ignore_eos", "skip_special_tokens")


def conflicting_sampling_field(sampling: SamplingParams, ignored: tuple[str, ...] = ()) -> str | None:
    """The first field of `sampling` set to other than its default that a beam search neither takes
    (SEARCH_SAMPLING_FIELDS) nor is told to ignore, or None (the CLI's and the server's check of a request that
    asks for a search)."""
    default, taken = SamplingParams(), SEARCH_SAMPLING_FIELDS + ignored
    return next((f.name for f in fields(SamplingParams)
                 if f.name not in taken and getattr(sampling, f.name) != getattr(default, f.name)), None)


def tops_wanted(params: BeamSearchParams, num_eos: int) -> int:
    """How many top log-probabilities a beam needs: its best k + #EOS tokens hold all it can put among the ranked."""
    wanted = params.beam_width + (0 if params.ignore_eos else num_eos)
    if wanted > MAX_LOGPROBS:
        raise SamplingParamsError(f"invalid beam search params: beam_width {params.beam_width} + {num_eos} EOS ids "
                                  f"needs {wanted} log-probabilities a step, at most {MAX_LOGPROBS}")
    return wanted


@dataclass(frozen=True)
class SearchedInput:
    """A request to search from, validated: its task prompt's name, input ids, and the room its positions leave."""

    request_id: str
    prompt: str | None
    input_ids: list[int]
    room: int  # new tokens that fit the model's positions
    priority: int = 0


class BeamSearch:
    """The search over several inputs, stepped by its caller: `step_requests()` are this step's one-token engine
    requests (each live beam of each unfinished input), `advance(outputs)` takes their outputs in that order."""

    def __init__(self, inputs: list[SearchedInput], params: BeamSearchParams, eos_token_ids: tuple[int, ...]):
        self.inputs, self.params = inputs, params
        self._step = SamplingParams(max_new_tokens=1, logprobs=tops_wanted(params, len(eos_token_ids)))
        eos = frozenset(eos_token_ids)
        self.states = [BeamState(params, eos, min(params.max_new_tokens, i.room)) for i in inputs]

    @property
    def done(self) -> bool:
        return all(state.done for state in self.states)

    def _live(self) -> list[tuple[SearchedInput, BeamState]]:
        return [(i, state) for i, state in zip(self.inputs, self.states) if not state.done]

    def step_requests(self) -> list[Request]:
        return [Request(prompt=i.prompt, input_ids=i.input_ids + beam.tokens, sampling=self._step,
                        priority=i.priority) for i, state in self._live() for beam in state.live]

    def advance(self, outputs: list[RequestOutput]) -> None:
        it = iter(outputs)
        for _, state in self._live():
            state.advance([next(it).logprobs[0].top for _ in state.live])

    def results(self, decode: Callable[[list[int]], str] | None) -> list[BeamSearchOutput]:
        return [BeamSearchOutput(i.request_id, i.prompt, i.input_ids, state.answers(decode))
                for i, state in zip(self.inputs, self.states)]
