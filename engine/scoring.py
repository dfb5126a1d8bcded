"""Log-likelihoods of continuations after a context (`Engine.score`, `softprompt eval`'s score mode).

Each context's full blocks (all but its last token's block) are computed once and read in place by every one of
its continuations; a continuation computes only the context's last, partial block and its own tokens, and the LM
head runs only on the rows that predict a continuation token. Scoring L continuations of an N-token context costs
N + L x (|c| + under a block) tokens and L x |c| rows of logits, not L x (N + |c|) of each.
"""

from __future__ import annotations

import math

import torch

from .errors import RequestError
from .kv_pool import OutOfBlocks
from .prompts import SoftPrompt, tokens_as_input_ids
from .sampling import token_logprobs
from .sequence import Sequence

ScoreItem = tuple[SoftPrompt | None, list[int], list[list[int]]]  # (task prompt, context ids, continuations' ids)


def _summed(logits: torch.Tensor, targets: list[int]) -> float:
    return math.fsum(lp.logprob for lp in token_logprobs(logits, targets, 0, rank=False))


@torch.no_grad()
def score_continuations(engine, items: list[ScoreItem]) -> list[list[float]]:
    """The summed log-prob of each continuation after its context, under its task's prompt, per item (fewer items
    at a time when the KV pool cannot hold them all; the reference backend: each context + continuation alone)."""
    if any(not conts for _, _, conts in items):  # nothing to score after those contexts: not computed
        scored = iter(score_continuations(engine, [item for item in items if item[2]]))
        return [next(scored) if conts else [] for _, _, conts in items]
    if not items:
        return []
    if engine.backend == "reference":
        return [[_summed(engine.reference.logits(None if prompt is None else prompt.reference_input, ctx + c,
                                                 tokens_as_input_ids(prompt))[len(ctx) - 1:-1], c)
                 for c in conts] for prompt, ctx, conts in items]
    try:
        return _score(engine, items)
    except OutOfBlocks:
        if len(items) > 1:
            half = len(items) // 2
            return score_continuations(engine, items[:half]) + score_continuations(engine, items[half:])
        prompt, ctx, conts = items[0]
        if len(conts) > 1:
            half = len(conts) // 2
            return [score_continuations(engine, [(prompt, ctx, conts[:half])])[0]
                    + score_continuations(engine, [(prompt, ctx, conts[half:])])[0]]
        raise RequestError("the KV pool is too busy or too small for this sequence right now") from None


def _score(engine, items: list[ScoreItem]) -> list[list[float]]:
    size, cache, pool = engine.pool.block_size, engine.prefix_cache, engine.pool
    held, allocated = [], []
    try:
        held += cache.acquire_many([p for p, _, _ in items if p is not None])

        def new_sequence(prompt: SoftPrompt | None, tokens: list[int], shared: list[int]) -> Sequence:
            seq = Sequence.of_tokens(prompt, tokens)
            if prompt is not None:
                seq.prefix = cache.acquire(prompt)
                held.append(seq.prefix)
            own = cache.allocate(pool.blocks_for(len(tokens)) - len(shared))
            allocated.extend(own)
            seq.blocks, seq.num_computed = shared + own, len(shared) * size
            return seq

        # 1. each context's full blocks before its last token (K/V only)
        contexts, shared = [], []
        for prompt, ctx, _ in items:
            # (a model with linear-attention layers computes each continuation whole: its recurrent state after
            # the context cannot be shared by several continuations' blocks)
            full = (len(ctx) - 1) // size * size if pool.states is None else 0
            seq = new_sequence(prompt, ctx[:full], []) if full else None
            shared.append([] if seq is None else seq.blocks)
            if seq is not None:
                contexts.append(seq)
        if contexts:
            engine.runner.hidden(contexts, [s.num_tokens for s in contexts], rows_for=[0])
        # 2. every continuation after them: the rows that predict its tokens
        seqs, rows, targets, offset = [], [], [], 0
        for (prompt, ctx, conts), blocks in zip(items, shared):
            for c in conts:
                seq = new_sequence(prompt, ctx + c, blocks)
                first = offset + len(ctx) - 1 - seq.num_computed  # the row of the context's last token
                rows.extend(range(first, first + len(c)))
                targets.extend(c)
                offset += seq.num_tokens - seq.num_computed
                seqs.append(seq)
        hidden = engine.runner.hidden(seqs, [s.num_tokens - s.num_computed for s in seqs], all_rows=True)
        logits = engine.model.compute_logits(hidden.index_select(0, torch.tensor(rows, device=hidden.device)))
        values = iter(lp.logprob for lp in token_logprobs(logits, targets, 0, rank=False))
        return [[math.fsum(next(values) for _ in c) for c in conts] for _, _, conts in items]
    finally:
        pool.free(allocated)
        for entry in held:
            cache.release(entry)
