"""Request-block prefix caching: later requests of a task that begin like an earlier one reuse its full blocks'
K/V (computing only the rest) and give the reference path's tokens; other tasks, other prompt versions and
prompt-logprob requests never reuse them; idle cached blocks give way before task prefixes."""

from __future__ import annotations

import pytest
import torch

from softprompt import Engine, Request, SamplingParams
from softprompt.engine.kv_pool import KVPool
from softprompt.testing import build_prompt_tensor

from .runtime_helpers import assert_no_leaks

BLOCK = 4
INSTRUCTION = list(range(40, 51))  # 11 tokens: two full blocks of 4 shared, the rest computed per request


def engines(model_dir, backend: str = "torch", device: str = "cpu", **kwargs) -> tuple[Engine, Engine]:
    """The reference and a `backend` engine with tasks a and b."""
    ref = Engine(model_dir, device=device, dtype="float32", backend="reference")
    eng = Engine(model_dir, device=device, dtype="float32", backend=backend, block_size=BLOCK, **kwargs)
    for name, seed in (("a", 1), ("b", 2)):
        for e in (ref, eng):
            e.add_prompt(name, build_prompt_tensor(64, 5, seed=seed))
    return ref, eng


def with_instruction(task, tail, **sampling):
    params = SamplingParams(max_new_tokens=6, ignore_eos=True, **sampling)
    return Request(prompt=task, input_ids=INSTRUCTION + tail, sampling=params)


def hits_of(eng: Engine, requests: list[Request]) -> tuple[list[list[int]], int]:
    before = eng.block_cache.stats.hit_tokens
    outs = eng.generate(requests)
    hits = eng.block_cache.stats.hit_tokens - before
    assert sum(o.num_cached_tokens for o in outs) == hits  # each output says what it found (no preemption here)
    return [o.token_ids for o in outs], hits


@pytest.mark.parametrize("variant", ["llama", "bloom", "gpt2"])
def test_a_shared_instruction_is_computed_once_per_task(variant, model_dir_for):
    ref, eng = engines(model_dir_for(variant))
    first = [with_instruction("a", [7]), with_instruction("b", [7]), with_instruction(None, [7])]
    tokens, hits = hits_of(eng, first)
    assert hits == 0 and tokens == [o.token_ids for o in ref.generate(first)]
    later = [with_instruction(t, tail) for t in ("a", "b", None) for tail in ([9, 10, 11], [12], [])]
    tokens, hits = hits_of(eng, later)
    assert tokens == [o.token_ids for o in ref.generate(later)]
    # each finds the instruction's two full blocks (not a third: the first request's third block ends with its
    # tail, and with an empty tail a token is left to compute)
    assert hits == 3 * (8 + 8 + 8)
    assert_no_leaks(eng)


def test_a_request_finds_the_blocks_an_earlier_one_generated(model_dir_for):
    """A follow-up whose input is an earlier request's input and output (a chat's next turn) reuses both."""
    ref, eng = engines(model_dir_for("llama"))
    [out] = eng.generate([with_instruction("a", [7])])
    follow_up = Request(prompt="a", input_ids=INSTRUCTION + [7] + out.token_ids + [3, 4],
                        sampling=SamplingParams(max_new_tokens=5, ignore_eos=True))
    tokens, hits = hits_of(eng, [follow_up])
    # 12 input + 6 generated tokens: the K/V of the first 17 were computed (the last generated token's never was)
    assert hits == 16 and tokens == [ref.generate(follow_up)[0].token_ids]
    assert_no_leaks(eng)


def test_a_block_is_found_only_after_the_blocks_it_came_after(model_dir_for):
    """The same tokens after other tokens (or at other positions) have other K/V: a block is named by the block
    before it too."""
    ref, eng = engines(model_dir_for("llama"))
    shared = [60, 61, 62, 63]
    first = Request(prompt="a", input_ids=[1, 2, 3, 4] + shared + [9], sampling=SamplingParams(max_new_tokens=3))
    other = Request(prompt="a", input_ids=shared + [9, 10], sampling=SamplingParams(max_new_tokens=3))
    eng.generate([first])
    tokens, hits = hits_of(eng, [other])
    assert hits == 0 and tokens == [ref.generate(other)[0].token_ids]
    assert_no_leaks(eng)


def test_other_tasks_and_versions_and_scoring_requests_find_nothing(model_dir_for):
    ref, eng = engines(model_dir_for("llama"))
    eng.generate([with_instruction("a", [7])])
    assert hits_of(eng, [with_instruction("b", [7])])[1] == 0  # same tokens, another task: other K/V
    replacement = build_prompt_tensor(64, 5, seed=9)
    eng.add_prompt("a", replacement, replace=True)
    ref.add_prompt("a2", replacement)
    tokens, hits = hits_of(eng, [with_instruction("a", [7])])
    assert hits == 0 and tokens == [ref.generate(with_instruction("a2", [7]))[0].token_ids]
    scoring = with_instruction("a", [7], prompt_logprobs=0)  # scores every input row: computes them all
    [out] = eng.generate([scoring])
    assert eng.block_cache.stats.hit_tokens == 0
    want = ref.generate(with_instruction("a2", [7], prompt_logprobs=0))[0]
    assert out.token_ids == want.token_ids
    assert [x is None for x in out.prompt_logprobs] == [x is None for x in want.prompt_logprobs]
    # within 1e-4, as every logprob check (equal when rounded to 4 places was not: a CPU's GEMMs may put the two
    # on either side of a rounding boundary)
    torch.testing.assert_close(torch.tensor([x.logprob for x in out.prompt_logprobs if x is not None]),
                               torch.tensor([x.logprob for x in want.prompt_logprobs if x is not None]),
                               atol=1e-4, rtol=0)
    assert_no_leaks(eng)


def test_n_seeded_samples_of_one_input_equal_an_engine_without_the_cache(model_dir_for):
    d = model_dir_for("qwen2")
    _, eng = engines(d)
    _, plain = engines(d, enable_prefix_caching=False)
    assert plain.block_cache is None
    samples = [with_instruction("a", [5, 6, 7, 8], temperature=0.9, seed=s) for s in range(4)]
    eng.generate(samples[:1])
    tokens, hits = hits_of(eng, samples)
    assert hits == 4 * 12 and tokens == [o.token_ids for o in plain.generate(samples)]
    assert len({tuple(t) for t in tokens}) > 1
    assert_no_leaks(eng)
    assert_no_leaks(plain)


def test_samples_sent_together_compute_their_input_once(model_dir_for):
    """The n samples of a new input arrive together: the first computes the input's full blocks, the others wait
    one step for them instead of computing them too (in-batch prefix sharing)."""
    d = model_dir_for("qwen2")
    _, eng = engines(d)
    _, plain = engines(d, enable_prefix_caching=False)
    samples = [with_instruction("a", [5, 6, 7, 8], temperature=0.9, seed=s) for s in range(4)]
    tokens, hits = hits_of(eng, samples)
    assert hits == 3 * 12 and tokens == [o.token_ids for o in plain.generate(samples)]
    assert_no_leaks(eng)


def test_a_waiting_request_defers_only_while_its_block_is_computed(model_dir_for):
    """Deferral holds back the request whose next block another one is computing, not the requests behind it;
    it is admitted the next step, after the blocks were cached."""
    ref, eng = engines(model_dir_for("llama"))
    burst = [with_instruction("a", [7]), with_instruction("a", [8, 9]), with_instruction("b", [7]),
             with_instruction(None, [1, 2, 3, 4, 5, 6])]
    for r in burst:
        eng.add_request(r)
    eng.step()
    running = [s.request_id for s in eng.scheduler.running]
    assert running == [burst[0].request_id, burst[2].request_id, burst[3].request_id]
    assert [s.request_id for s in eng.scheduler.waiting] == [burst[1].request_id]
    eng.step()
    assert len(eng.scheduler.running) == 4 and eng.scheduler.running[-1].num_cached_tokens == 8
    outs = {}
    while eng.has_unfinished_requests():
        outs.update((o.request_id, o.token_ids) for o in eng.step() if o.finished)
    assert [outs[r.request_id] for r in burst] == [o.token_ids for o in ref.generate(burst)]
    assert_no_leaks(eng)


def test_idle_cached_blocks_give_way_before_task_prefixes(model_dir_for):
    d = model_dir_for("llama")
    from softprompt.engine.config import load_model_config

    bpb = KVPool.bytes_per_block(load_model_config(d), BLOCK, torch.float32)
    ref, eng = engines(d, kv_cache_bytes=16 * bpb)
    eng.generate([with_instruction("a", [7])])  # prefix a: 2 blocks; 4 cached blocks of its 17 computed tokens
    assert eng.block_cache.num_cached == 4
    big = Request(prompt="a", input_ids=list(range(60, 100)), sampling=SamplingParams(max_new_tokens=10,
                                                                                       ignore_eos=True))
    [out] = eng.generate([big])  # 50 tokens: 13 blocks, beside a's 2: the cached blocks must go, not the prefix
    assert out.token_ids == ref.generate(big)[0].token_ids
    assert eng.prefix_cache.stats.evictions == 0 and eng.block_cache.stats.evictions >= 3
    assert_no_leaks(eng)


def test_clear_frees_every_idle_block(model_dir_for):
    _, eng = engines(model_dir_for("llama"))
    eng.generate([with_instruction("a", [7]), with_instruction("b", [8])])
    assert eng.block_cache.num_cached > 0
    eng.block_cache.clear()
    assert eng.block_cache.num_cached == 0
    assert_no_leaks(eng)
