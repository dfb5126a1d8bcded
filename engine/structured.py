"""Structured outputs (vLLM's guided_json, guided_regex, guided_grammar and JSON mode) through xgrammar, the
library vLLM and SGLang use: the output is constrained to a JSON schema, any JSON value, a regular expression or
an EBNF grammar at the byte level, whatever tokens spell it. xgrammar is an optional dependency
(`pip install 'softprompt-engine[structured]'`); without it these options are refused by name.

Each request holds a `GrammarGuide` (xgrammar's matcher) that follows its generated tokens; each step the guided
rows' allowed tokens are filled into one bitmask and every other token's logit is set to -inf before the other
logit processors run (vLLM's order). When the grammar is complete only EOS is allowed, so the request ends there.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from .errors import RequestError

if TYPE_CHECKING:
    from .reasoning import ThoughtGate
    from .sampling import SamplingParams

_COMPILED_CACHE_SIZE = 256
_CPP_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: \(.*?\) is false: )?")


def xgrammar_module():
    """The xgrammar module, or a RequestError saying how to install it."""
    try:
        import xgrammar
    except ImportError:
        raise RequestError("structured outputs (guided_json, guided_regex, guided_grammar, JSON mode) need "
                           "xgrammar: pip install 'softprompt-engine[structured]'") from None
    return xgrammar


def canonical_json_schema(schema: object) -> str:
    """A JSON schema given as a dict or as JSON text, as JSON text (a SamplingParams field must be hashable)."""
    if isinstance(schema, str):
        try:
            json.loads(schema)
        except ValueError as exc:
            raise ValueError(f"guided_json is not valid JSON: {exc}") from None
        return schema
    if isinstance(schema, (dict, bool)):
        return json.dumps(schema)
    raise ValueError(f"guided_json must be a JSON schema (an object or its JSON text), got {type(schema).__name__}")


class StructuredOutputs:
    """Compiles a request's constraint for the engine's tokenizer and vocabulary (cached by its text)."""

    def __init__(self, hf_tokenizer, vocab_size: int, eos_token_ids: Sequence[int]):
        self._hf = hf_tokenizer
        self._vocab_size = vocab_size
        self._eos = list(eos_token_ids)
        self._compiler = None
        self._compiled: OrderedDict[tuple[str, str, bool], object] = OrderedDict()
        self._lock = threading.Lock()  # the server compiles on worker threads, the engine thread looks up

    def compile(self, kind: str, spec: str, any_whitespace: bool = True) -> object:
        """xgrammar's CompiledGrammar for (kind, spec); a RequestError names what is wrong with the spec.
        `any_whitespace=False` (JSON kinds): no whitespace but one space after `,` and `:` (vLLM's
        disable_any_whitespace: some models otherwise emit whitespace until they run out of tokens)."""
        key = (kind, spec, any_whitespace)
        with self._lock:
            if key in self._compiled:
                self._compiled.move_to_end(key)
                return self._compiled[key]
            xgr = xgrammar_module()
            if self._compiler is None:
                info = xgr.TokenizerInfo.from_huggingface(self._hf, vocab_size=self._vocab_size,
                                                          stop_token_ids=self._eos)
                self._compiler = xgr.GrammarCompiler(info)
        try:  # outside the lock: a long compile holds up no lookup (xgrammar's compiler is thread-safe)
            if kind == "json" or (kind == "json_object" and not any_whitespace):
                compiled = self._compiler.compile_json_schema(spec if kind == "json" else "{}",
                                                              any_whitespace=any_whitespace)
            elif kind == "json_object":
                compiled = self._compiler.compile_builtin_json_grammar()
            elif kind == "regex":
                compiled = self._compiler.compile_regex(spec)
            elif kind == "grammar":
                compiled = self._compiler.compile_grammar(spec)
            else:
                raise ValueError(f"unknown structured output kind {kind!r}")
        except (RuntimeError, ValueError) as exc:  # xgrammar's C++ errors come as RuntimeError
            message = _CPP_PREFIX.sub("", str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc))
            raise RequestError(f"invalid guided_{kind}: {message}") from None
        with self._lock:
            self._compiled[key] = compiled
            if len(self._compiled) > _COMPILED_CACHE_SIZE:
                self._compiled.popitem(last=False)
        return compiled

    def compile_for(self, params: SamplingParams) -> object | None:
        """The compiled constraint a request's params ask for, or None."""
        if params.structured is None:
            return None
        return self.compile(*params.structured, not params.disable_any_whitespace)


class GrammarGuide:
    """One request's grammar state: accepts its generated tokens as they come and gives the next allowed ones.
    `gate` (a reasoning.ThoughtGate): the grammar holds on the answer after a thinking model's thought only."""

    def __init__(self, compiled: object, gate: ThoughtGate | None = None):
        self._matcher = xgrammar_module().GrammarMatcher(compiled)
        self._gate = gate
        self._accepted = 0
        self.off_grammar = False  # a token the grammar refused was picked: it no longer constrains the request

    def follow(self, generated: Sequence[int]) -> bool:
        """Accept the tokens generated since the last call; False while the grammar does not constrain yet (in the
        thought). Only conflicting constraints can pick a refused token (other processors banning every token the
        grammar allows, see sampling.py): the engine keeps serving."""
        if self._gate is not None:
            generated = self._gate.answer(generated)
            if generated is None:
                return False
        for token in generated[self._accepted:]:
            if not self.off_grammar and not self._matcher.accept_token(token):
                self.off_grammar = True
            self._accepted += 1
        return True

    def fill(self, bitmask: torch.Tensor, row: int, generated: Sequence[int] = ()) -> None:
        """Row `row` of `bitmask`: the tokens the grammar allows next (and `<think>` where the answer may still
        open a thought first)."""
        if self.off_grammar:
            return
        self._matcher.fill_next_token_bitmask(bitmask, row)
        if self._gate is not None and self._gate.may_open(generated):
            word, bit = divmod(self._gate.start_id, 32)
            if word < bitmask.shape[1]:
                value = int(bitmask[row, word]) | (1 << bit)
                bitmask[row, word] = value - (1 << 32) if value >= 1 << 31 else value  # as int32


def apply_guides(logits: torch.Tensor, guides: list[tuple[int, GrammarGuide]],
                 histories: list[tuple[Sequence[int], Sequence[int]]]) -> None:
    """Mask logits [B, V] in place: each guided row (row, guide) keeps only the tokens its grammar allows next."""
    xgr = xgrammar_module()
    bitmask = xgr.allocate_token_bitmask(logits.shape[0], logits.shape[1])  # all allowed
    for row, guide in guides:
        generated = histories[row][1]
        if guide.follow(generated):
            guide.fill(bitmask, row, generated)
    xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), vocab_size=logits.shape[1])
