"""Random traffic against the reference path: requests arrive between steps (many begin like earlier ones), some
are aborted, tasks come and go, and a small KV pool and token budget force chunked prefill, prefix eviction, cached
request blocks and preemption all at once. Every request that finishes must equal, token for token, the same
request run alone on the reference path (fp32)."""

from __future__ import annotations

import random

import pytest
import torch

from softprompt import Engine, Request, SamplingParams
from softprompt.engine.config import load_model_config
from softprompt.engine.kv_pool import KVPool
from softprompt.testing import build_prompt_tensor

from .runtime_helpers import assert_no_leaks


def _params(rng: random.Random, has_tokenizer: bool) -> SamplingParams:
    kind = rng.random()
    max_new = rng.randint(1, 14)
    common = {"max_new_tokens": max_new, "min_tokens": min(max_new, rng.choice([0, 0, 2])),
              "prompt_logprobs": 1 if rng.random() < 0.1 else None}
    if kind < 0.4:  # greedy, runs to max_new_tokens
        return SamplingParams(ignore_eos=True, **common)
    if kind < 0.55:  # greedy, stops at a frequent token id (or EOS)
        return SamplingParams(stop_token_ids=tuple(rng.sample(range(4, 64), 8)), **common)
    if kind < 0.65 and has_tokenizer:  # greedy, stops at a short string (found in the incremental text)
        return SamplingParams(stop=tuple(rng.sample(["e", "a", "t", " ", "in"], 2)), ignore_eos=True, **common)
    if kind < 0.85:  # seeded sampling: the same draws whatever the batch
        return SamplingParams(temperature=rng.choice([0.7, 1.0]), top_k=rng.choice([0, 20]), top_p=0.9,
                              seed=rng.randrange(2**31), ignore_eos=True, **common)
    return SamplingParams(repetition_penalty=1.3, presence_penalty=0.5, logprobs=2, **common)


def _close(got: list, expected: list) -> None:
    assert len(got) == len(expected)
    for x, y in zip(got, expected):
        assert (x is None) == (y is None)
        if x is not None:
            assert x.token_id == y.token_id and abs(x.logprob - y.logprob) < 1e-4


def soak(model_dir, seed: int, steps: int, backend: str = "torch", device: str = "cpu", **engine_kwargs) -> Engine:
    """Run `steps` steps of random traffic, drain, check every finished request against the reference."""
    rng = random.Random(seed)
    ref = Engine(model_dir, device=device, dtype="float32", backend="reference")
    eng = Engine(model_dir, device=device, dtype="float32", backend=backend, **engine_kwargs)
    live: dict[str, str] = {}  # task new requests may name -> its current version's name in the reference engine
    made = 0

    def new_version(name: str | None = None) -> None:
        nonlocal made
        tensor = build_prompt_tensor(eng.config.embedding_width, rng.randint(1, 21), seed=seed * 1000 + made)
        made += 1
        if name is None:
            name = f"t{made}"
        # a replaced task's running requests finish on the old version, so the reference keeps each version
        eng.add_prompt(name, tensor, replace=name in live, precompute=rng.random() < 0.3)
        live[name] = f"{name}.v{made}"
        ref.add_prompt(live[name], tensor)

    for _ in range(4):
        new_version()
    submitted: dict[str, Request] = {}  # as the reference runs it
    task_of: dict[str, str | None] = {}  # request id -> the task it named
    finished: dict[str, object] = {}
    aborted: set[str] = set()
    for step in range(steps + 2000):
        if step < steps:  # then drain what is left
            for _ in range(rng.choice([0, 0, 1, 1, 2, 3])):
                task = rng.choice([*live, None])
                ids = [rng.randrange(4, 500) for _ in range(rng.randint(1, 34))]
                if submitted and rng.random() < 0.45:  # begins like an earlier input (the block cache's case)
                    rid = rng.choice(list(submitted))
                    earlier = submitted[rid].input_ids
                    if task_of[rid] in live or task_of[rid] is None:  # mostly of the same task
                        task = task_of[rid] if rng.random() < 0.8 else task
                    ids = earlier[:rng.randint(1, len(earlier))] + ids[:rng.randint(0, 8)]
                    if rng.random() < 0.3:  # or its later blocks, moved forward (a key that forgot the block before
                        ids = earlier[4 * rng.randint(1, 3):] + ids[:3] or ids  # would find them)
                request = Request(prompt=task, input_ids=ids, sampling=_params(rng, ref.tokenizer is not None))
                eng.add_request(request)
                task_of[request.request_id] = task
                submitted[request.request_id] = Request(
                    prompt=None if task is None else live[task], input_ids=request.input_ids,
                    sampling=request.sampling, request_id=request.request_id)
            event = rng.random()
            if event < 0.06:
                new_version()
            elif event < 0.12:
                new_version(rng.choice(list(live)))
            elif event < 0.16 and len(live) > 2:  # running requests of a removed task still finish
                name = rng.choice(list(live))
                eng.remove_prompt(name)
                del live[name]
            running = [r for r in submitted if r not in finished and r not in aborted]
            if running and rng.random() < 0.1:
                victim = rng.choice(running)
                assert eng.abort(victim).finish_reason == "abort"
                aborted.add(victim)
        for out in eng.step():
            if out.finish_reason is not None:
                assert out.request_id not in finished, "a request finished twice"
                finished[out.request_id] = out
        if step >= steps and not eng.has_unfinished_requests():
            break
    assert not eng.has_unfinished_requests(), "requests still running after the drain"
    assert set(finished) | aborted == set(submitted)
    for rid, out in finished.items():
        expected = ref.generate(submitted[rid])[0]
        assert out.token_ids == expected.token_ids, f"{rid} ({submitted[rid].sampling})"
        assert (out.finish_reason, out.stop_reason, out.text) == (
            expected.finish_reason, expected.stop_reason, expected.text)
        for got, want in ((out.logprobs, expected.logprobs), (out.prompt_logprobs, expected.prompt_logprobs)):
            assert (got is None) == (want is None)
            if want is not None:
                _close(got, want)
    assert_no_leaks(eng)
    return eng


def tight_engine(model_dir, blocks: int = 48) -> dict:
    """Engine options under which the traffic goes through chunked prefill, prefix eviction and preemption. (A
    model without attention: room for 8 states, a block each, never preempted: a sequence takes its one block when
    admitted.)"""
    config = load_model_config(model_dir)
    if config.attention_free:
        blocks = 8
    return {"block_size": 4, "kv_cache_bytes": blocks * KVPool.unit_bytes(config, 4, torch.float32), "max_num_seqs": 6,
            "max_batched_tokens": 24}


@pytest.mark.parametrize("variant, seed",
                         [("llama", 0), ("bloom", 1), ("gpt2", 2), ("qwen2", 3), ("mistral_window", 4), ("gemma3", 5),
                          ("gemma4_unified", 6)])
def test_random_traffic_equals_the_reference(variant, seed, model_dir_for):
    d = model_dir_for(variant)
    eng = soak(d, seed, steps=140, **tight_engine(d))
    # the test is only worth something if the traffic really went through each of these paths
    assert eng.scheduler.num_preemptions > 0
    assert eng.prefix_cache.stats.evictions > 0
    assert eng.block_cache.stats.hit_tokens >= 64 and eng.block_cache.stats.evictions > 0  # 16+ blocks found
