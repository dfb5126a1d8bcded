"""`softprompt verify`: prove that a serving backend gives the answers of the model you validated.

The oracle is HF transformers + PEFT (`AutoModelForCausalLM`, or `AutoModelForImageTextToText` for a multimodal
checkpoint transformers does not register as a causal LM, + `PeftModel`, one adapter per task) on your
checkpoint and adapters, in the same dtype and on the same device; without peft installed it is the engine's
own pure-PyTorch reference path (said so in the report). Each backend (and the reference path, when HF is the
oracle) runs the same requests, alone and as one mixed batch of all tasks, and is compared with the oracle:

- logits: every input position plus the oracle's greedy continuation, teacher-forced (each backend scores the
  oracle's tokens), max and mean |difference|;
- greedy tokens: the first divergence and both candidates' logit margins there, so a near-tie (oracle margin
  within `Tolerance.near_tie`) is told apart from a bug;
- prefix cache: the same request on a cache miss and then on a hit must agree.

Memory: one model is held at a time (the HF oracle is freed before the first engine is built).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import random
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor

from .datasets import jsonl_objects
from .errors import SoftPromptError
from .hub import resolve_model, resolve_prompt_source
from .prompts import MULTITASK_PEFT_TYPE, check_prompt_name, read_peft_adapter, read_peft_config, split_task_suffix

BASE_TASK = "base"  # how requests without a prompt are labelled in reports


class VerifyError(SoftPromptError):
    """Bad verify input: an unreadable inputs file, an unknown prompt name, a request that does not fit."""


# ---- tolerances ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tolerance:
    """What a backend may differ from the oracle by, in logits (natural-log units before softmax)."""

    max_abs: float  # largest |logit difference| at any position and vocabulary entry
    mean_abs: float  # mean |logit difference| over all positions and entries of a task
    near_tie: float  # a greedy divergence where the oracle's top-2 margin is <= this is a near-tie, not a failure


# How the defaults were chosen (tests/test_verify.py::test_default_tolerances_follow_the_documented_method
# re-measures): on the tiny random checkpoints of every supported architecture (logits up to ~15 in magnitude,
# 4 requests per task of up to 48 tokens + 16 greedy ones), the largest |HF half - HF fp32| logit difference
# was 0.113 in bfloat16 (mean 0.014) and 0.014 in float16 (mean 0.0018); the engine's half-precision logits were
# within 1.05x that distance of HF's half-precision ones. The defaults are 4x those differences, rounded up.
# In float32 only summation order differs (observed <= 5e-6): 1e-3 leaves room for other BLAS/GPU kernels while
# any real bug (a shifted prompt, a wrong position or slope) moves logits by O(1).
# `near_tie` is 2 x max_abs: two logits each off by max_abs can swap a margin that small.
# Real models have larger logits and more layers: calibrate on yours with `--calibrate` (4x HF's own
# half-vs-fp32 difference on your checkpoint and requests) or pass --max-abs/--mean-abs/--near-tie.
DEFAULT_TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float32: Tolerance(max_abs=1e-3, mean_abs=1e-4, near_tie=2e-3),
    torch.bfloat16: Tolerance(max_abs=0.5, mean_abs=0.06, near_tie=1.0),
    torch.float16: Tolerance(max_abs=0.06, mean_abs=0.008, near_tie=0.12),
}
CALIBRATION_FACTOR = 4.0


def default_tolerance(dtype: torch.dtype, **overrides: float | None) -> Tolerance:
    """The dtype's default tolerance with any non-None override; near_tie follows max_abs unless given."""
    tol = DEFAULT_TOLERANCES[dtype]
    given = {k: v for k, v in overrides.items() if v is not None}
    if "max_abs" in given and "near_tie" not in given:
        given["near_tie"] = 2 * given["max_abs"]
    return replace(tol, **given)


# ---- requests --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VerifyRequest:
    prompt: str | None  # a task name, or None for the bare model
    input_ids: list[int]
    max_new_tokens: int = 16

    @property
    def task(self) -> str:
        return BASE_TASK if self.prompt is None else self.prompt


def random_requests(prompts: dict[str, int], n: int, vocab_size: int, max_positions: int, max_new_tokens: int = 16,
                    seed: int = 0, include_base: bool = True, max_len: int = 24) -> list[VerifyRequest]:
    """`n` requests of random token ids (random lengths 1..max_len) per task; `prompts` maps name -> length."""
    rng = random.Random(seed)
    tasks: list[tuple[str | None, int]] = list(prompts.items()) + ([(None, 0)] if include_base else [])
    out = []
    for _ in range(n):
        for name, p in tasks:
            room = max_positions - p - max_new_tokens
            if room < 1:
                raise VerifyError(f"prompt {name!r} ({p} tokens) + {max_new_tokens} new tokens leave no room in the "
                                  f"model's {max_positions} positions: lower --max-new-tokens")
            length = rng.randint(1, min(max_len, room))
            out.append(VerifyRequest(name, [rng.randrange(vocab_size) for _ in range(length)], max_new_tokens))
    return out


def load_requests_jsonl(path: str | Path, encode: Callable[[str], list[int]] | None,
                        max_new_tokens: int = 16) -> list[VerifyRequest]:
    """Lines `{"prompt": name|null, "text": ...}` or `{"prompt": ..., "input_ids": [...]}` (optional
    "max_new_tokens"). Text is tokenized as `tokenizer(text)` (with BOS), what a PEFT user feeds."""
    out = []
    for where, item in jsonl_objects(Path(path), VerifyError):
        if ("text" in item) == ("input_ids" in item):
            raise VerifyError(f'{where}: expected an object with "prompt" and exactly one of "text", "input_ids"')
        prompt = item.get("prompt")
        if prompt is not None and not isinstance(prompt, str):
            raise VerifyError(f'{where}: "prompt" must be a prompt name or null')
        if "text" in item:
            if encode is None:
                raise VerifyError(f"{where}: a text input needs the checkpoint's tokenizer, which it does not have")
            if not isinstance(item["text"], str) or not item["text"]:
                raise VerifyError(f'{where}: "text" must be a non-empty string')
            ids = encode(item["text"])
        else:
            ids = item["input_ids"]
            if not isinstance(ids, list) or not ids or any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
                raise VerifyError(f'{where}: "input_ids" must be a non-empty list of integers')
        n = item.get("max_new_tokens", max_new_tokens)
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise VerifyError(f'{where}: "max_new_tokens" must be a positive integer')
        out.append(VerifyRequest(prompt, list(ids), n))
    if not out:
        raise VerifyError(f"{path} holds no requests")
    return out


def check_requests(requests: Sequence[VerifyRequest], prompts: dict[str, int], vocab_size: int,
                   max_positions: int) -> None:
    for i, r in enumerate(requests):
        if r.prompt is not None and r.prompt not in prompts:
            raise VerifyError(f"request {i} names prompt {r.prompt!r}; known: {', '.join(prompts) or 'none'}")
        bad = [t for t in r.input_ids if not 0 <= t < vocab_size]
        if bad:
            raise VerifyError(f"request {i}: token id {bad[0]} is outside the vocabulary ({vocab_size})")
        p = 0 if r.prompt is None else prompts[r.prompt]
        if p + len(r.input_ids) + r.max_new_tokens > max_positions:
            raise VerifyError(f"request {i}: {p} prompt + {len(r.input_ids)} input + {r.max_new_tokens} new tokens "
                              f"exceed the model's {max_positions} positions")


# ---- what a path computes: greedy tokens and teacher-forced logits ---------------------------------------
@dataclass
class PathOutput:
    """One request on one path: its greedy tokens, and fp32 CPU logits [len(input) + N, vocab] over the input
    followed by the oracle's greedy tokens (teacher-forced, so every path is scored on the same sequence)."""

    tokens: list[int]
    logits: Tensor


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class HFPeftOracle:
    """HF transformers + PEFT: one PEFT prompt-learning adapter per task (switched per request). PEFT holds
    adapters of one type per model, so each type (prompt tuning, P-tuning, prefix tuning) gets its own copy of
    the base model."""

    name = "hf+peft"

    def __init__(self, model_dir: str | Path, adapters: dict[str, Path], dtype: torch.dtype, device: torch.device):
        from peft import PeftModel
        from transformers import GenerationConfig

        from .hf_auto import load_hf_causal_lm
        from .testing import _quiet

        def base_model():
            model = load_hf_causal_lm(model_dir, dtype=dtype).to(device).eval()
            # plain greedy decoding: a checkpoint's generation_config.json may add sampling, penalties...
            model.generation_config = GenerationConfig()
            return model

        by_type: dict[str, dict[str, Path]] = {}
        self._task_ids: dict[str, int] = {}  # task name -> its task id in a multitask prompt-tuning adapter
        for name, spec in adapters.items():
            adapter_dir, task_id = split_task_suffix(spec)
            peft_type = read_peft_config(adapter_dir).get("peft_type")
            if peft_type == MULTITASK_PEFT_TYPE:
                self._task_ids[name] = task_id or 0
            by_type.setdefault(peft_type, {})[name] = adapter_dir
        self.peft_models: dict[str, object] = {}  # one per type
        self._model_of: dict[str, object] = {}  # task name -> its type's PEFT model
        self._peft_names: dict[str, str] = {}  # task name -> adapter name in that model
        with _quiet():
            self.base = base_model()
            for i, (peft_type, group) in enumerate(by_type.items()):
                model = None
                for name, adapter_dir in group.items():
                    # PEFT's own adapter names: a task name such as "prefix" would clash with its tuner prefixes
                    peft_name = self._peft_names[name] = f"task{len(self._peft_names)}"
                    if model is None:
                        base = self.base if i == 0 else base_model()
                        model = PeftModel.from_pretrained(base, str(adapter_dir), adapter_name=peft_name).eval()
                        model.generation_config = base.generation_config
                    else:
                        model.load_adapter(str(adapter_dir), adapter_name=peft_name)
                    self._model_of[name] = model
                self.peft_models[peft_type] = model
        self.device = device

    def _model(self, prompt: str | None):
        if prompt is None:
            return self.base
        model = self._model_of[prompt]
        model.set_adapter(self._peft_names[prompt])
        return model

    @torch.no_grad()
    def greedy(self, prompt: str | None, ids: list[int], n: int) -> list[int]:
        """Greedy tokens from full forward passes (no KV cache), one per new token: exactly what the PEFT model
        computes, whatever the generate/cache glue of the installed peft and transformers versions does (peft
        0.21.2's prompt-tuning generate re-feeds the whole input at every decode step under transformers 5.24)."""
        tokens = list(ids)
        for _ in range(n):
            tokens.append(int(self.logits(prompt, tokens)[-1].argmax()))
        return tokens[len(ids):]

    @torch.no_grad()
    def logits(self, prompt: str | None, ids: list[int]) -> Tensor:
        x = torch.tensor([ids], device=self.device)
        extra = {}
        if prompt in self._task_ids:  # PEFT's multitask prompt tuning takes the task per batch row
            extra["task_ids"] = torch.tensor([self._task_ids[prompt]], device=self.device)
        out = self._model(prompt)(input_ids=x, attention_mask=torch.ones_like(x), **extra).logits
        return out[0, -len(ids):].float().cpu()  # PEFT prepends the virtual tokens' rows: drop them

    def close(self) -> None:
        self.base = None
        self.peft_models, self._model_of = {}, {}
        _free_memory()


def drop_prefixes(engine, names: Sequence[str] | None = None) -> None:
    """Forget cached prefix K/V (of `names`, default all) so the next use is a cache miss."""
    for name in set(names) if names is not None else {e.prompt.name for e in engine.prefix_cache.entries}:
        engine.prefix_cache.invalidate(name)


@torch.no_grad()
def engine_logits(engine, items: Sequence[tuple[str | None, list[int]]], batch: bool = False) -> list[Tensor]:
    """fp32 CPU logits [len(ids), vocab] of every token of each (prompt, ids), like `Engine.score` computes them:
    alone (one runner pass per item), or all in one packed pass with the missing prefixes computed together
    (as the scheduler admits a batch)."""
    if not batch:
        return [engine.sequence_logits([item])[0].float().cpu() for item in items]
    return [x.float().cpu() for x in engine.sequence_logits(list(items))]


def engine_greedy(engine, requests: Sequence[VerifyRequest], batch: bool = False) -> list[list[int]]:
    """Greedy tokens (EOS ignored: exactly max_new_tokens each) from Engine.generate, alone or in one batch."""
    from .request import Request
    from .sampling import SamplingParams

    reqs = [Request(prompt=r.prompt, input_ids=list(r.input_ids),
                    sampling=SamplingParams(max_new_tokens=r.max_new_tokens, ignore_eos=True)) for r in requests]
    if batch:
        return [o.token_ids for o in engine.generate(reqs)]
    return [engine.generate([r])[0].token_ids for r in reqs]


# ---- comparison ------------------------------------------------------------------------------------------
@dataclass
class Divergence:
    request: int  # index in the request list
    position: int  # index of the first differing generated token
    expected: int  # the oracle's token
    got: int  # the backend's token
    oracle_margin: float  # oracle logit(expected) - logit(got) there
    backend_margin: float | None  # backend logit(got) - logit(expected) there (teacher-forced), None if unknown
    near_tie: bool


@dataclass
class ModeResult:
    """One backend, one task, one mode ("single": each request alone, "batch": all tasks in one batch)."""

    num_requests: int = 0
    max_abs: float = 0.0
    mean_abs: float = 0.0
    worst_request: int | None = None
    worst_position: int | None = None  # index into input + greedy tokens
    max_abs_vs_reference: float | None = None  # information: the same against the engine's reference path
    greedy_agree: int = 0
    divergences: list[Divergence] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


@dataclass
class PrefixCacheResult:
    """The first request of a task on a cache miss, then again on a hit."""

    request: int
    miss_observed: bool
    hit_observed: bool
    miss_vs_hit_max_abs: float
    tokens_equal: bool
    failures: list[str] = field(default_factory=list)


@dataclass
class TaskResult:
    modes: dict[str, ModeResult] = field(default_factory=dict)
    prefix_cache: PrefixCacheResult | None = None

    @property
    def failures(self) -> list[str]:
        out = [f for m in self.modes.values() for f in m.failures]
        return out + (self.prefix_cache.failures if self.prefix_cache else [])


@dataclass
class BackendResult:
    status: str  # "pass" | "fail" | "unavailable"
    note: str | None = None
    tasks: dict[str, TaskResult] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)  # all of this backend's, prefixed "backend/task [mode]"


def _diff_stats(got: Tensor, want: Tensor) -> tuple[float, float, int, float]:
    """(max |diff|, sum |diff|, argmax row, number of elements); non-finite values count as infinite."""
    if got.shape != want.shape:
        raise VerifyError(f"logits of shape {tuple(got.shape)} cannot be compared with {tuple(want.shape)}")
    diff = (got - want).abs()
    diff = torch.where(torch.isfinite(got) & torch.isfinite(want), diff, torch.full_like(diff, math.inf))
    row_max = diff.max(dim=-1).values
    return float(row_max.max()), float(diff.sum()), int(row_max.argmax()), diff.numel()


def first_divergence(index: int, request: VerifyRequest, want: PathOutput, got_tokens: list[int],
                     got_logits: Tensor | None, tol: Tolerance) -> Divergence | None:
    """Where the backend's greedy tokens first differ from the oracle's, with both candidates' margins."""
    if got_tokens == want.tokens:
        return None
    pos = next((i for i, (a, b) in enumerate(zip(want.tokens, got_tokens)) if a != b), None)
    if pos is None:  # one is a prefix of the other: a length difference is always a bug
        pos = min(len(want.tokens), len(got_tokens))
        return Divergence(index, pos, -1 if pos >= len(want.tokens) else want.tokens[pos],
                          -1 if pos >= len(got_tokens) else got_tokens[pos], math.inf, None, False)
    row = len(request.input_ids) - 1 + pos  # the logits that chose token `pos`
    a, b = want.tokens[pos], got_tokens[pos]
    oracle_margin = float(want.logits[row, a] - want.logits[row, b])
    backend_margin = None if got_logits is None else float(got_logits[row, b] - got_logits[row, a])
    return Divergence(index, pos, a, b, oracle_margin, backend_margin, oracle_margin <= tol.near_tie)


def compare_mode(label: str, indices: list[int], requests: Sequence[VerifyRequest], expected: Sequence[PathOutput],
                 got_tokens: Sequence[list[int]], got_logits: Sequence[Tensor], tol: Tolerance,
                 reference_logits: Sequence[Tensor] | None = None) -> ModeResult:
    """Compare one backend's outputs for the requests `indices` (one task) with the oracle's."""
    res = ModeResult(num_requests=len(indices))
    total, count = 0.0, 0
    for i in indices:
        mx, sm, row, n = _diff_stats(got_logits[i], expected[i].logits)
        total, count = total + sm, count + n
        if mx > res.max_abs or res.worst_request is None:
            res.max_abs, res.worst_request, res.worst_position = mx, i, row
        if reference_logits is not None:
            ref = _diff_stats(got_logits[i], reference_logits[i])[0]
            res.max_abs_vs_reference = max(res.max_abs_vs_reference or 0.0, ref)
        div = first_divergence(i, requests[i], expected[i], got_tokens[i], got_logits[i], tol)
        if div is None:
            res.greedy_agree += 1
            continue
        res.divergences.append(div)
        if not div.near_tie:
            res.failures.append(
                f"{label}: greedy tokens diverge at request {i} token {div.position}: expected {div.expected}, got "
                f"{div.got}; the oracle prefers {div.expected} by {div.oracle_margin:.3g} > near-tie margin "
                f"{tol.near_tie:g} (a bug, not rounding)")
    res.mean_abs = total / count if count else 0.0
    if not res.max_abs <= tol.max_abs:
        res.failures.insert(0, f"{label}: max |logit diff| {res.max_abs:.3g} > {tol.max_abs:g} at request "
                               f"{res.worst_request} position {res.worst_position}")
    if not res.mean_abs <= tol.mean_abs:
        res.failures.insert(0, f"{label}: mean |logit diff| {res.mean_abs:.3g} > {tol.mean_abs:g}")
    return res


def check_prefix_cache(engine, label: str, index: int, request: VerifyRequest, forced_ids: list[int],
                       tol: Tolerance) -> PrefixCacheResult:
    """The request scored twice, a prefix-cache miss (its first use on a fresh engine, else after dropping the
    prefix) then a hit, and generated twice likewise: both must agree."""
    stats = engine.prefix_cache.stats
    item = [(request.prompt, forced_ids)]
    if any(e.prompt.name == request.prompt for e in engine.prefix_cache.entries):
        drop_prefixes(engine, [request.prompt])
    misses, hits = stats.misses, stats.hits
    miss_logits = engine_logits(engine, item)[0]
    miss_observed = stats.misses > misses
    hits = stats.hits
    hit_logits = engine_logits(engine, item)[0]
    hit_observed = stats.hits > hits and stats.misses == misses + 1
    drop_prefixes(engine, [request.prompt])
    miss_tokens = engine_greedy(engine, [request])[0]
    hit_tokens = engine_greedy(engine, [request])[0]
    mx = _diff_stats(hit_logits, miss_logits)[0]
    res = PrefixCacheResult(index, miss_observed, hit_observed, mx, miss_tokens == hit_tokens)
    if not (miss_observed and hit_observed):
        res.failures.append(f"{label}: could not observe a prefix-cache miss then hit (misses/hits counters did "
                            "not move as expected)")
    if not mx <= tol.max_abs:
        res.failures.append(f"{label}: prefix-cache hit differs from miss: max |logit diff| {mx:.3g} > "
                            f"{tol.max_abs:g} (request {index})")
    if miss_tokens != hit_tokens:
        res.failures.append(f"{label}: prefix-cache hit generates {hit_tokens[:8]}... but the miss generated "
                            f"{miss_tokens[:8]}... (request {index})")
    return res


def pool_leaks(engine) -> str | None:
    """A message if the engine's KV pool is not back to idle (blocks held or refcounts left after the run)."""
    if engine.backend == "reference":
        return None
    if engine.has_unfinished_requests() or not engine.kv_is_idle():
        return "KV pool not idle after the run: blocks leaked or prefix references left"
    return None


def run_backend(engine, backend: str, requests: Sequence[VerifyRequest], expected: Sequence[PathOutput],
                tol: Tolerance, reference_logits: Sequence[Tensor] | None = None,
                modes: Sequence[str] = ("single", "batch"), prefix_cache: bool = True,
                logits_out: list[Tensor] | None = None) -> BackendResult:
    """Run every request through `engine` in each mode and compare with the oracle's outputs (the first mode's
    teacher-forced logits are appended to `logits_out` if given)."""
    forced = [r.input_ids + e.tokens for r, e in zip(requests, expected)]
    items = [(r.prompt, ids) for r, ids in zip(requests, forced)]
    by_task: dict[str, list[int]] = {}
    for i, r in enumerate(requests):
        by_task.setdefault(r.task, []).append(i)
    result = BackendResult(status="pass", tasks={t: TaskResult() for t in by_task})
    if prefix_cache and engine.backend != "reference":  # first, while the engine is fresh
        for task, indices in by_task.items():
            if task != BASE_TASK:
                i = indices[0]
                result.tasks[task].prefix_cache = check_prefix_cache(
                    engine, f"{backend}/{task} [prefix cache]", i, requests[i], forced[i], tol)
    for mode in modes:
        batch = mode == "batch"
        if batch:
            drop_prefixes(engine)  # the batch computes every task's prefix together
        logits = engine_logits(engine, items, batch=batch)
        if logits_out is not None and mode == modes[0]:
            logits_out.extend(logits)
        if batch:
            drop_prefixes(engine)
        tokens = engine_greedy(engine, requests, batch=batch)
        for task, indices in by_task.items():
            result.tasks[task].modes[mode] = compare_mode(f"{backend}/{task} [{mode}]", indices, requests, expected,
                                                          tokens, logits, tol, reference_logits)
    result.failures = [f for t in result.tasks.values() for f in t.failures]
    leak = pool_leaks(engine)
    if leak:
        result.failures.append(f"{backend}: {leak}")
    result.status = "fail" if result.failures else "pass"
    return result


def _run_guarded(engine, backend: str, *args, **kwargs) -> BackendResult:
    """run_backend, with a backend that raises reported as failed (with the error) instead of ending the run."""
    try:
        return run_backend(engine, backend, *args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any crash of the path under test is a verification failure
        return BackendResult(status="fail", note=f"crashed: {exc!r}",
                             failures=[f"{backend}: crashed while running the requests: {type(exc).__name__}: {exc}"])


# ---- the whole verification ------------------------------------------------------------------------------
@dataclass
class Report:
    model_dir: str
    dtype: str
    device: str
    oracle: str  # "hf+peft" or "reference"
    tolerance: Tolerance
    num_requests: int
    backends: dict[str, BackendResult] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    calibration: dict | None = None
    seconds: float = 0.0

    @property
    def failures(self) -> list[str]:
        return [f for b in self.backends.values() for f in b.failures]

    @property
    def unavailable(self) -> list[str]:
        return [name for name, b in self.backends.items() if b.status == "unavailable"]

    @property
    def passed(self) -> bool:
        return not self.failures

    def exit_code(self) -> int:
        """0: every backend ran and is within tolerance; 1: a tolerance is broken; 3: a requested backend
        could not run (nothing broken among the rest)."""
        return 1 if self.failures else 3 if self.unavailable else 0

    def to_dict(self) -> dict:
        data = asdict(self)
        data.update(passed=self.passed, exit_code=self.exit_code(), failures=self.failures)
        return _finite_json(data)

    def summary(self) -> str:
        tol = self.tolerance
        oracle = "HF transformers + PEFT" if self.oracle == "hf+peft" else "the engine's reference path"
        lines = [f"softprompt verify: {self.model_dir} ({self.dtype}, {self.device}), {self.num_requests} requests, "
                 f"oracle: {oracle}",
                 f"tolerance: max |logit diff| {tol.max_abs:g}, mean {tol.mean_abs:g}, near-tie margin "
                 f"{tol.near_tie:g}"]
        lines += [f"note: {n}" for n in self.notes]
        header = f"{'backend':<10} {'task':<16} {'mode':<8} {'max|diff|':>10} {'mean|diff|':>10} {'greedy':>8}  result"
        lines += ["", header]
        for name, b in self.backends.items():
            if b.status == "unavailable":
                lines.append(f"{name:<10} {'-':<16} {'-':<8} {'':>10} {'':>10} {'':>8}  UNAVAILABLE: {b.note}")
                continue
            for task, t in b.tasks.items():
                for mode, m in t.modes.items():
                    greedy = f"{m.greedy_agree}/{m.num_requests}"
                    ties = sum(d.near_tie for d in m.divergences)
                    verdict = "FAIL" if m.failures else "ok" + (f" ({ties} near-tie)" if ties else "")
                    lines.append(f"{name:<10} {task:<16} {mode:<8} {m.max_abs:>10.3g} {m.mean_abs:>10.3g} "
                                 f"{greedy:>8}  {verdict}")
                if t.prefix_cache is not None:
                    pc = t.prefix_cache
                    verdict = "FAIL" if pc.failures else "ok"
                    lines.append(f"{name:<10} {task:<16} {'hit/miss':<8} {pc.miss_vs_hit_max_abs:>10.3g} "
                                 f"{'':>10} {'same' if pc.tokens_equal else 'differ':>8}  {verdict}")
        lines.append("")
        if self.failures:
            lines.append(f"FAILED ({len(self.failures)}):")
            lines += [f"  {f}" for f in self.failures]
        elif self.unavailable:
            lines.append(f"INCOMPLETE: {', '.join(self.unavailable)} could not run; every other backend passed")
        else:
            lines.append(f"PASSED: every backend within tolerance ({self.seconds:.1f} s)")
        return "\n".join(lines)


def _finite_json(x):
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _finite_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite_json(v) for v in x]
    return x


EngineFactory = Callable[[str, dict[str, Path]], object]


def default_engine_factory(model_dir: str | Path, device, dtype, **engine_kwargs) -> EngineFactory:
    """factory(backend, adapters) -> an Engine (with `engine_kwargs`) with every adapter registered under its task
    name."""

    def make(backend: str, adapters: dict[str, Path]):
        from .api import Engine

        engine = Engine(model_dir, device=device, dtype=dtype, backend=backend, **engine_kwargs)
        for name, adapter in adapters.items():
            engine.add_prompt(name, adapter)
        return engine

    return make


def peft_available() -> bool:
    return importlib.util.find_spec("peft") is not None


def _oracle_outputs(oracle, requests: Sequence[VerifyRequest]) -> list[PathOutput]:
    outs = []
    for r in requests:
        tokens = oracle.greedy(r.prompt, r.input_ids, r.max_new_tokens)
        outs.append(PathOutput(tokens, oracle.logits(r.prompt, r.input_ids + tokens)))
    return outs


class _EngineOracle:
    """An Engine (normally backend="reference") used as the oracle."""

    def __init__(self, engine):
        self.engine = engine
        self.name = "reference" if engine.backend == "reference" else f"engine[{engine.backend}]"

    def greedy(self, prompt, ids, n):
        return engine_greedy(self.engine, [VerifyRequest(prompt, ids, n)])[0]

    def logits(self, prompt, ids):
        return engine_logits(self.engine, [(prompt, ids)])[0]


def calibrate(model_dir, adapters: dict[str, Path], requests: Sequence[VerifyRequest], expected: Sequence[PathOutput],
              device: torch.device, factor: float = CALIBRATION_FACTOR) -> tuple[Tolerance, dict]:
    """A tolerance for this checkpoint: `factor` x HF's own half-precision-vs-fp32 logit difference on these
    requests (the half-precision oracle outputs in `expected`), near_tie = 2 x max_abs."""
    oracle = HFPeftOracle(model_dir, adapters, torch.float32, device)
    try:
        mx, total, count = 0.0, 0.0, 0
        for r, e in zip(requests, expected):
            m, s, _, n = _diff_stats(e.logits, oracle.logits(r.prompt, r.input_ids + e.tokens))
            mx, total, count = max(mx, m), total + s, count + n
    finally:
        oracle.close()
    mean = total / max(count, 1)
    floor = DEFAULT_TOLERANCES[torch.float32]  # never tighter than float32's
    tol = Tolerance(max_abs=max(factor * mx, floor.max_abs), mean_abs=max(factor * mean, floor.mean_abs),
                    near_tie=max(2 * factor * mx, floor.near_tie))
    return tol, {"factor": factor, "hf_half_vs_fp32_max_abs": mx, "hf_half_vs_fp32_mean_abs": mean}


def verify(model_dir: str | Path, prompts: dict[str, str | Path], backends: Sequence[str] = ("torch",),
           dtype: str | torch.dtype | None = None, device: str | torch.device | None = None,
           requests: Sequence[VerifyRequest] | None = None, tolerance: Tolerance | None = None,
           engine_factory: EngineFactory | None = None, use_hf: bool | None = None, calibrate_tolerance: bool = False,
           reference_column: bool = True, random_per_task: int = 3, max_new_tokens: int = 16, seed: int = 0,
           log: Callable[[str], None] | None = None) -> Report:
    """Run `backends` (and the reference path) on `requests` and compare each with the oracle (HF + PEFT when
    peft is installed and `use_hf` is not False, else the reference path). `prompts` maps task name -> PEFT
    adapter directory. `engine_factory(backend, adapters)` builds each engine (tests inject faulty ones)."""
    from .config import load_model_config
    from .loader import resolve_device, resolve_dtype

    start = time.perf_counter()
    log = log or (lambda _msg: None)
    model_dir = resolve_model(model_dir)
    config = load_model_config(model_dir)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, config, dev)
    adapters = {check_prompt_name(name): resolve_prompt_source(path) for name, path in prompts.items()}
    lengths = {name: read_peft_adapter(*split_task_suffix(path)).length for name, path in adapters.items()}
    if requests is None:
        requests = random_requests(lengths, random_per_task, config.vocab_size, config.max_positions, max_new_tokens,
                                   seed=seed)
    requests = list(requests)
    if not requests:
        raise VerifyError("no requests to verify")
    check_requests(requests, lengths, config.vocab_size, config.max_positions)
    factory = engine_factory or default_engine_factory(model_dir, dev, dt)
    report = Report(str(model_dir), str(dt).removeprefix("torch."), str(dev), "reference",
                    tolerance or DEFAULT_TOLERANCES[dt], len(requests))

    hf = peft_available() if use_hf is None else use_hf
    if use_hf is None and not hf:
        report.notes.append("peft is not installed: compared against the engine's reference path, not HF + PEFT "
                            "(pip install peft to compare with the model you validated)")
    if hf:
        log("running HF transformers + PEFT (the oracle)")
        oracle = HFPeftOracle(model_dir, adapters, dt, dev)
        try:
            expected = _oracle_outputs(oracle, requests)
        finally:
            oracle.close()
        report.oracle = "hf+peft"
        if calibrate_tolerance:
            if dt == torch.float32:
                report.notes.append("--calibrate ignored in float32: the default tolerance applies")
            else:
                log("calibrating: HF in float32 on the same sequences")
                report.tolerance, report.calibration = calibrate(model_dir, adapters, requests, expected, dev)
    tol = report.tolerance

    reference_logits: list[Tensor] | None = None
    if reference_column or not hf:
        log("running backend 'reference'")
        engine = factory("reference", adapters)
        if hf:
            reference_logits = []
            report.backends["reference"] = _run_guarded(engine, "reference", requests, expected, tol,
                                                        modes=("single",), logits_out=reference_logits)
            if len(reference_logits) != len(requests):  # the reference itself failed to run
                reference_logits = None
        else:
            expected = _oracle_outputs(_EngineOracle(engine), requests)
            reference_logits = [e.logits for e in expected]
        del engine
        _free_memory()

    for backend in backends:
        if backend == "reference":
            continue
        log(f"running backend {backend!r}")
        try:
            engine = factory(backend, adapters)
        except SoftPromptError as exc:
            if backend != "triton":
                raise
            report.backends[backend] = BackendResult(status="unavailable", note=str(exc))
            continue
        report.backends[backend] = _run_guarded(engine, backend, requests, expected, tol, reference_logits)
        del engine
        _free_memory()
    report.seconds = time.perf_counter() - start
    return report


# ---- command line ----------------------------------------------------------------------------------------
def parse_prompt_args(values: Sequence[str]) -> dict[str, Path]:
    """`NAME=ADAPTER_DIR` or `ADAPTER_DIR` (named after the directory) -> {name: dir}."""
    out: dict[str, Path] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep:
            path = value
            name = re.sub(r"[^A-Za-z0-9._-]", "_", Path(value).resolve().name).lstrip("._-") or "task"
            if name == BASE_TASK:
                name = "base_prompt"
            base, k = name, 2
            while name in out:
                name, k = f"{base}-{k}", k + 1
        elif name in out:
            raise VerifyError(f"--prompts names {name!r} twice")
        path = resolve_prompt_source(path)  # a Hub adapter id: its local snapshot
        if not split_task_suffix(path)[0].is_dir():
            raise VerifyError(f"--prompts: {path!r} is not a PEFT adapter directory (DIR, or DIR#N: task N of a "
                              "multitask prompt-tuning adapter)")
        out[check_prompt_name(name)] = Path(path)
    return out


def add_verify_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", help="the Hugging Face checkpoint directory (config.json + safetensors), or a "
                        "Hub model id (org/name or org/name@revision)")
    parser.add_argument("--prompts", nargs="+", default=[], metavar="[NAME=]ADAPTER_DIR",
                        help="PEFT prompt-learning adapters (directories or Hub ids ORG/NAME), one task each (named "
                        "after the directory or repo unless NAME=); DIR#N is task N of a multitask prompt-tuning "
                        "adapter")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16, float16 or auto (the checkpoint's)")
    parser.add_argument("--backends", default=None,
                        help="comma-separated: torch, triton (default: torch, plus triton on CUDA)")
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--inputs", default=None, metavar="FILE.jsonl",
                     help='requests, one a line: {"prompt": NAME or null, "text": ...} or {..., "input_ids": [...]}')
    src.add_argument("--random", type=int, default=None, metavar="N",
                     help="N random-token requests per task and for the bare model (default: 3)")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="greedy tokens per request (default: 16)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --random requests")
    parser.add_argument("--max-abs", type=float, default=None, help="override: max |logit diff| allowed")
    parser.add_argument("--mean-abs", type=float, default=None, help="override: mean |logit diff| allowed")
    parser.add_argument("--near-tie", type=float, default=None,
                        help="override: oracle top-2 margin below which a greedy divergence is a near-tie "
                             "(default: 2 x max-abs)")
    parser.add_argument("--calibrate", action="store_true",
                        help="half precision: set the tolerance to 4x HF's own half-vs-fp32 logit difference on "
                             "this checkpoint and these requests (loads the model in float32 once more)")
    parser.add_argument("--no-hf", action="store_true", help="compare with the engine's reference path, not HF + PEFT")
    parser.add_argument("--report", default="softprompt-verify.json", metavar="FILE.json",
                        help="where to write the JSON report (default: softprompt-verify.json)")


def run_verify(args: argparse.Namespace) -> int:
    """`softprompt verify`: prints a summary, writes the JSON report; 0 pass, 1 tolerance broken, 3 incomplete."""
    from .config import load_model_config
    from .loader import resolve_device, resolve_dtype
    from .tokenizer import load_tokenizer

    adapters = parse_prompt_args(args.prompts)
    if args.max_new_tokens < 1:
        raise VerifyError("--max-new-tokens must be >= 1")
    if args.random is not None and args.random < 1:
        raise VerifyError("--random must be >= 1")
    overrides = dict(max_abs=args.max_abs, mean_abs=args.mean_abs, near_tie=args.near_tie)
    if args.calibrate and (args.no_hf or not peft_available()):
        raise VerifyError("--calibrate measures HF + PEFT: it needs peft installed and no --no-hf")
    if args.calibrate and any(v is not None for v in overrides.values()):
        raise VerifyError("give either --calibrate or explicit --max-abs/--mean-abs/--near-tie, not both")
    args.model_dir = resolve_model(args.model_dir)
    dev = resolve_device(args.device)
    dt = resolve_dtype(args.dtype, load_model_config(args.model_dir), dev)
    if args.backends is None:
        backends = ["torch"] + (["triton"] if dev.type == "cuda" else [])
    else:
        backends = [b.strip() for b in args.backends.split(",") if b.strip()]
        unknown = [b for b in backends if b not in ("torch", "triton", "reference")]
        if unknown or not backends:
            raise VerifyError(f"--backends: unknown backend {unknown[0] if unknown else '(none)'!r}; "
                              "choose from torch, triton, reference")
    requests = None
    if args.inputs is not None:
        tokenizer = load_tokenizer(args.model_dir)
        requests = load_requests_jsonl(args.inputs, tokenizer.encode if tokenizer else None, args.max_new_tokens)
    report = verify(args.model_dir, adapters, backends, dt, dev, requests, default_tolerance(dt, **overrides),
                    use_hf=False if args.no_hf else None, calibrate_tolerance=args.calibrate,
                    random_per_task=args.random or 3, max_new_tokens=args.max_new_tokens, seed=args.seed,
                    log=lambda msg: print(f"... {msg}", file=sys.stderr, flush=True))
    Path(args.report).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    print(report.summary())
    print(f"report written to {args.report}")
    return report.exit_code()
