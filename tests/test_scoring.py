"""Engine.score (engine/scoring.py): a context's full blocks computed once and read by every continuation, logits
only where they predict a continuation token; equal to the reference path's log-likelihoods (fp32, 1e-4) at
context lengths around block boundaries, with and without a task prompt, and when the pool holds one sequence."""

from __future__ import annotations

import pytest
import torch

from softprompt import Engine
from softprompt.engine.errors import RequestError
from softprompt.engine.kv_pool import KVPool
from softprompt.engine.scoring import score_continuations
from softprompt.testing import build_prompt_tensor

from .runtime_helpers import assert_no_leaks

ATOL = 1e-4  # fp32: only the summation order differs
CONTINUATIONS = [[7], [8, 9], [10, 11, 12, 13, 14], [7, 300]]


def _engines(model_dir, block_size: int, **kwargs) -> tuple[Engine, Engine]:
    ref = Engine(model_dir, device="cpu", dtype="float32", backend="reference")
    eng = Engine(model_dir, device="cpu", dtype="float32", backend="torch", block_size=block_size, **kwargs)
    for e in (ref, eng):
        e.add_prompt("t", build_prompt_tensor(64, 6, seed=3))
    return ref, eng


@pytest.mark.parametrize("variant", ["llama", "bloom", "gpt2"])
@pytest.mark.parametrize("block_size", [4, 16])
def test_scores_equal_the_reference_around_block_boundaries(variant, block_size, model_dir_for):
    ref, eng = _engines(model_dir_for(variant), block_size)
    for prompt in ("t", None):
        for n in (1, 3, 4, 5, 16, 17, 33):  # a context of one token, and ones ending on, before, after a boundary
            context = [(17 * i) % 500 + 4 for i in range(n)]
            got = eng.score(prompt, context, CONTINUATIONS)
            want = ref.score(prompt, context, CONTINUATIONS)
            torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=ATOL, rtol=0)
    assert_no_leaks(eng)


def test_no_continuations_score_nothing(model_dir_for):
    ref, eng = _engines(model_dir_for("llama"), 4)
    for e in (ref, eng):
        assert e.score("t", list(range(20, 40)), []) == []
    t = eng.prompts.get("t")
    assert score_continuations(eng, [(t, [5, 6], []), (t, [5, 6], [[7]])])[0] == []
    assert_no_leaks(eng)


def test_many_contexts_in_one_pass_equal_one_at_a_time(model_dir_for):
    ref, eng = _engines(model_dir_for("llama"), 4)
    items = [(eng.prompts.get("t") if i % 2 else None, list(range(20, 20 + 3 * i + 1)), CONTINUATIONS[: i % 4 + 1])
             for i in range(7)]
    together = score_continuations(eng, items)
    alone = [score_continuations(eng, [item])[0] for item in items]
    for a, b, (_, ctx, conts) in zip(together, alone, items):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=ATOL, rtol=0)
        name = None if _ is None else "t"
        torch.testing.assert_close(torch.tensor(a), torch.tensor(ref.score(name, ctx, conts)), atol=ATOL, rtol=0)
    assert_no_leaks(eng)


def test_a_small_pool_scores_in_parts_and_a_too_small_one_says_so(model_dir_for):
    d = model_dir_for("llama")
    from softprompt.engine.config import load_model_config

    bpb = KVPool.bytes_per_block(load_model_config(d), 4, torch.float32)
    ref, eng = _engines(d, 4, kv_cache_bytes=14 * bpb)
    context = list(range(30, 66))  # 36 tokens: 8 shared blocks, beside the prompt's 2
    got = eng.score("t", context, CONTINUATIONS)  # the four at once need 10 + 8 blocks: scored in parts
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref.score("t", context, CONTINUATIONS)),
                               atol=ATOL, rtol=0)
    with pytest.raises(RequestError, match="too busy or too small"):
        eng.score("t", list(range(30, 80)), [[5, 6, 7]])  # 53 tokens: 14 blocks beside the prompt's 2
    assert_no_leaks(eng)
