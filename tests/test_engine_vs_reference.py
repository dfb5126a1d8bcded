"""The batched runtime (backend="torch") against the reference path: identical greedy tokens in fp32."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from softprompt import Engine, Request, SamplingParams

from .runtime_helpers import assert_no_leaks, make_requests, register_tasks, run

ARCHS = ["llama", "qwen2", "qwen3", "phi3_longrope", "mistral_window", "ministral", "ministral3",
         "mistral3_multimodal", "smollm3", "granite", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "granitemoe",
         "gemma", "gemma2", "gemma3", "pythia", "phi", "phi_qk_norm_gqa", "opt", "opt_post_norm", "stablelm",
         "stablelm_parallel", "starcoder2", "olmo", "olmo2", "olmo3", "exaone4", "falcon", "falcon_new_arch",
         "falcon_serial", "gptj", "cohere", "cohere_qk_norm", "cohere2", "glm", "glm4", "ernie4_5", "seed_oss",
         "gpt2", "gpt2_inverse_scale", "gpt_bigcode", "gpt_bigcode_mha", "gpt_neo", "helium", "arcee", "nemotron",
         "cwm", "hyperclovax", "jais2", "apertus", "codegen", "xglm", "biogpt",
         "qwen2_5_vl", "qwen3_vl", "exaone4_5", "glm4_moe", "ernie4_5_moe",
         "qwen3_vl_moe", "deepseek_v3", "deepseek_v2", "glm4_moe_lite", "mistral4",
         "mistral3_mistral4", "youtu", "minicpm3", "dots1", "iquestcoder",
         "vaultgemma", "hunyuan_v1_dense", "hunyuan_v1_moe", "solar_open",
         "exaone_moe", "granitemoeshared", "flex_olmo", "mellum", "gpt_oss", "minimax_m2", "llama4_text", "llama4",
         "phimoe", "afmoe", "granite_swa", "granitemoe_swa", "cohere2_moe",
         "cohere2_moe_rms", "kolibri1", "flint", "deepseek_v32", "glm_moe_dsa", "mpt",
         "persimmon", "dbrx", "nanochat", "gpt-sw3", "hy_v3", "gemma4", "gemma4_moe", "gemma4_multimodal",
         "gemma4_unified", "gemma4_unified_multimodal", "laguna", "laguna_element_gate", "qwen3_5",
         "qwen3_5_multimodal", "qwen3_5_moe", "qwen3_5_moe_multimodal", "qwen3_next", "lfm2",
         "lfm2_conv_bias", "granite_hybrid", "granite_hybrid_dense",
         "nemotron_h", "bamba", "mamba", "falcon_mamba", "mamba2", "jamba", "lfm2_moe", "olmo_hybrid", "falcon_h1",
         "falcon_h1_no_norm", "lfm3", "lfm3_plain", "lfm2_vl", "lfm3_vl", "mimo_v2_flash",
         "mimo_v2_flash_plain", "axk1", "longcat_flash", "kimi_linear", "kimi_linear_dense",
         "bloom"]
LOGIT_ATOL = 1e-4  # fp32: only summation order differs (batched SDPA over packed items vs per-request matmul)


@pytest.fixture(scope="module")
def engines(model_dir_for):
    """(reference, torch) engines per variant, kept for the module: each torch engine's KV pool is 32 MiB (a CPU
    engine's default, up to 1 GiB zero-filled, times every architecture would not fit CI's memory)."""
    cache = {}

    def get(variant: str, **kwargs):
        key = (variant, tuple(sorted(kwargs.items())))
        if key not in cache:
            d = model_dir_for(variant)
            cache[key] = (Engine(d, device="cpu", dtype="float32", backend="reference"),
                          Engine(d, device="cpu", dtype="float32", backend="torch",
                                 **{"kv_cache_bytes": 32 << 20, **kwargs}))
        return cache[key]

    return get


@pytest.mark.parametrize("variant", ARCHS)
def test_mixed_batch_of_many_tasks(variant, model_dir_for):
    d = model_dir_for(variant)
    ref = Engine(d, device="cpu", dtype="float32", backend="reference")
    eng = Engine(d, device="cpu", dtype="float32", backend="torch")
    names = register_tasks([ref, eng], 8) + [None]  # None: requests without a prompt in the same batch
    specs = make_requests(names, 27, seed=1)
    assert run(eng, specs) == run(ref, specs)
    stats = eng.prefix_cache.stats
    assert stats.misses == 8 and all(v == 1 for v in stats.computations.values())
    assert stats.hits + stats.misses == sum(s["prompt"] is not None for s in specs)  # one or the other per request
    assert_no_leaks(eng)


def test_the_pool_holds_each_layers_own_kv_shape(model_dir_for):
    """Gemma 4's full-attention layers have wider and fewer K/V heads than its sliding ones: the pool holds each
    layer's own shape (no layer padded to another's), and a block's bytes are their sum; a layer attending with an
    earlier layer's K/V shares that layer's tensor and costs nothing more."""
    from softprompt.engine.kv_pool import KVPool

    eng = Engine(model_dir_for("gemma4"), device="cpu", dtype="float32", backend="torch", kv_cache_bytes=4 << 20)
    c = eng.config
    shapes = [tuple(layer_kv.shape[3:]) for layer_kv in eng.pool.kv]
    assert shapes == list(zip(c.layer_kv_heads, c.layer_head_dims)) and len(set(shapes)) == 2
    assert KVPool.bytes_per_block(c, 16, torch.float32) == sum(2 * 16 * h * d * 4 for h, d in shapes)
    shared = Engine(model_dir_for("gemma4_unified"), device="cpu", dtype="float32", backend="torch",
                    kv_cache_bytes=4 << 20)  # its last two layers attend with layers 2's and 3's K/V: share them
    assert shared.config.kv_source_layers == (0, 1, 2, 3, 2, 3)
    assert shared.pool.kv[4] is shared.pool.kv[2] and shared.pool.kv[5] is shared.pool.kv[3]
    owned = [tuple(layer_kv.shape[3:]) for layer_kv in shared.pool.kv[:4]]
    assert KVPool.bytes_per_block(shared.config, 16, torch.float32) == sum(2 * 16 * h * d * 4 for h, d in owned)


@pytest.mark.parametrize("variant", ["llama", "bloom"])
def test_alone_equals_in_batch_of_32_other_tasks(variant, model_dir_for):
    d = model_dir_for(variant)
    eng = Engine(d, device="cpu", dtype="float32", backend="torch")
    names = register_tasks([eng], 33)
    specs = make_requests(names, 33, seed=2)
    alone = run(eng, specs[:1])
    in_batch = run(eng, specs)
    assert in_batch[0] == alone[0]
    assert_no_leaks(eng)


def test_prefix_cache_hit_equals_miss_and_precompute(engines):
    ref, eng = engines("llama")
    register = lambda e, n: e.add_prompt(n, torch.randn(11, 64, generator=torch.Generator().manual_seed(7)))  # noqa: E731
    register(ref, "p"), register(eng, "p")
    specs = make_requests(["p"], 3, seed=3)
    misses = eng.prefix_cache.stats.misses
    cold = run(eng, specs[:1])
    assert eng.prefix_cache.stats.misses == misses + 1
    hits = eng.prefix_cache.stats.hits
    warm = run(eng, specs[:1])
    assert eng.prefix_cache.stats.misses == misses + 1 and eng.prefix_cache.stats.hits == hits + 1
    assert cold == warm == run(ref, specs[:1])
    eng.add_prompt("q", torch.randn(5, 64), precompute=True)
    assert eng.prefix_cache.stats.computations[eng.prompts.get("q").key] == 1
    assert_no_leaks(eng)


def test_replacing_a_prompt_invalidates_its_prefix(engines):
    ref, eng = engines("gpt2")
    t1, t2 = torch.randn(6, 64), torch.randn(6, 64)
    eng.add_prompt("r", t1)
    ref.add_prompt("r", t2)
    specs = make_requests(["r"], 2, seed=4)
    run(eng, specs)
    old_key = eng.prompts.get("r").key
    eng.add_prompt("r", t2, replace=True)
    assert run(eng, specs) == run(ref, specs)
    assert old_key not in {e.prompt.key for e in eng.prefix_cache.entries}
    assert_no_leaks(eng)


def test_eviction_and_recompute(model_dir_for):
    d = model_dir_for("llama")
    ref = Engine(d, device="cpu", dtype="float32", backend="reference")
    # 2 layers * 2 * 16 tokens * 2 kv heads * 16 dims * 4 bytes = 8 KiB per block; 24 blocks
    eng = Engine(d, device="cpu", dtype="float32", backend="torch", kv_cache_bytes=24 * 8192)
    names = register_tasks([ref, eng], 10, base_len=17)
    specs = make_requests(names, 20, seed=5, max_new_tokens=4)
    assert run(eng, specs) == run(ref, specs)
    assert eng.prefix_cache.stats.evictions > 0
    assert any(v > 1 for v in eng.prefix_cache.stats.computations.values())  # recomputed after eviction
    assert_no_leaks(eng)


def test_chunked_prefill(model_dir_for):
    d = model_dir_for("qwen2")
    ref = Engine(d, device="cpu", dtype="float32", backend="reference")
    eng = Engine(d, device="cpu", dtype="float32", backend="torch", max_batched_tokens=7)
    names = register_tasks([ref, eng], 3)
    specs = make_requests(names, 6, seed=6)
    assert max(len(s["input_ids"]) for s in specs) > 7  # inputs really are split into chunks
    assert run(eng, specs) == run(ref, specs)
    assert_no_leaks(eng)


@pytest.mark.parametrize("variant", ["llama", "bloom"])
def test_preemption_by_recompute(variant, model_dir_for):
    d = model_dir_for(variant)
    ref = Engine(d, device="cpu", dtype="float32", backend="reference")
    bpb = __import__("softprompt.engine.kv_pool", fromlist=["KVPool"]).KVPool.bytes_per_block(
        ref.config, 4, torch.float32)
    eng = Engine(d, device="cpu", dtype="float32", backend="torch", block_size=4, kv_cache_bytes=40 * bpb)
    names = register_tasks([ref, eng], 2)
    specs = make_requests(names, 10, seed=7, max_new_tokens=12)
    assert run(eng, specs) == run(ref, specs)
    assert eng.scheduler.num_preemptions > 0
    assert_no_leaks(eng)


@pytest.mark.parametrize("variant", ARCHS)
def test_scores_and_logprobs_close_to_reference(variant, engines):
    ref, eng = engines(variant)
    prompt = torch.randn(9, eng.config.embedding_width, generator=torch.Generator().manual_seed(8))
    ref.add_prompt("s", prompt, replace=True), eng.add_prompt("s", prompt, replace=True)
    conts = [[10, 11, 12], [13], [400, 401]]
    torch.testing.assert_close(torch.tensor(eng.score("s", [5, 6, 7, 8], conts)),
                               torch.tensor(ref.score("s", [5, 6, 7, 8], conts)), atol=LOGIT_ATOL, rtol=0)
    spec = make_requests(["s"], 1, seed=9, logprobs=3)[0]
    a, b = eng.generate([Request(**spec)])[0], ref.generate([Request(**spec)])[0]
    assert a.token_ids == b.token_ids
    for x, y in zip(a.logprobs, b.logprobs):
        assert x.token_id == y.token_id and abs(x.logprob - y.logprob) < LOGIT_ATOL
        assert x.top.keys() == y.top.keys() and len(x.top) == 3
    assert_no_leaks(eng)


def test_seeded_sampling_independent_of_batch(engines):
    ref, eng = engines("llama")
    names = register_tasks([eng], 4) if "task0" not in eng.prompts else ["task0", "task1", "task2", "task3"]
    specs = make_requests(names, 12, seed=10, temperature=0.9, top_p=0.9, top_k=50)
    specs = [dict(s, sampling=SamplingParams(**{**s["sampling"].__dict__, "seed": i})) for i, s in enumerate(specs)]
    together = run(eng, specs)
    alone = [run(eng, [s])[0] for s in specs[:4]]
    assert together[:4] == alone
    assert len({tuple(t) for t in together}) > 1
    assert_no_leaks(eng)


def test_abort_frees_and_others_unaffected(engines):
    ref, eng = engines("gpt2")
    names = register_tasks([ref, eng], 3) if "task0" not in eng.prompts else ["task0", "task1", "task2"]
    specs = make_requests(names, 6, seed=11, max_new_tokens=10)
    expected = run(ref, specs)
    ids = [eng.add_request(Request(**s)) for s in specs]
    outs = {}
    for _ in range(3):
        for o in eng.step():
            outs[o.request_id] = o
    aborted = eng.abort(ids[2])
    assert aborted.finish_reason == "abort"
    assert eng.abort("no-such-request") is None
    while eng.has_unfinished_requests():
        for o in eng.step():
            outs[o.request_id] = o
    for i, rid in enumerate(ids):
        if i != 2:
            assert outs[rid].token_ids == expected[i]
    assert_no_leaks(eng)


def test_stream_yields_growing_outputs_and_close_aborts(engines):
    ref, eng = engines("llama")
    names = register_tasks([eng], 2) if "task0" not in eng.prompts else ["task0", "task1"]
    specs = make_requests(names, 2, seed=12, max_new_tokens=6)
    seen: dict[str, list[int]] = {}
    for out in eng.stream([Request(**s) for s in specs]):
        prev = seen.get(out.request_id, [])
        assert out.token_ids[: len(prev)] == prev and len(out.token_ids) == len(prev) + 1
        seen[out.request_id] = out.token_ids
    assert sorted(len(v) for v in seen.values()) == [6, 6]
    gen = eng.stream([Request(**s) for s in specs])
    next(gen)
    gen.close()
    assert_no_leaks(eng)


@pytest.mark.parametrize("pool_blocks, batched_tokens", [(None, 16), (40, 64)], ids=["chunked", "preempted"])
def test_prompt_logprobs_in_prefill_equal_the_reference(pool_blocks, batched_tokens, model_dir_for):
    """SamplingParams(prompt_logprobs=N): the prefill's rows score the input, across prefill chunks and after
    preemption (recomputed rows score nothing twice); equal to the reference path and to Engine.prompt_logprobs."""
    from softprompt.engine.kv_pool import KVPool

    d = model_dir_for("llama")
    ref = Engine(d, device="cpu", dtype="float32", backend="reference")
    kv = None if pool_blocks is None else pool_blocks * KVPool.bytes_per_block(ref.config, 4, torch.float32)
    eng = Engine(d, device="cpu", dtype="float32", block_size=4, kv_cache_bytes=kv, max_batched_tokens=batched_tokens)
    names = register_tasks([ref, eng], 2)
    specs = make_requests(names, 10, seed=8, max_new_tokens=12)
    for i, spec in enumerate(specs):
        spec["sampling"] = replace(spec["sampling"], prompt_logprobs=[None, 0, 3][i % 3])
    got, want = eng.generate([Request(**s) for s in specs]), ref.generate([Request(**s) for s in specs])
    if pool_blocks is not None:
        assert eng.scheduler.num_preemptions > 0
    else:
        assert max(len(s["input_ids"]) for s in specs) > batched_tokens  # inputs really are split into chunks
    for spec, g, w in zip(specs, got, want):
        assert g.token_ids == w.token_ids
        if spec["sampling"].prompt_logprobs is None:
            assert g.prompt_logprobs is None and w.prompt_logprobs is None
            continue
        direct = eng.prompt_logprobs(spec["prompt"], spec["input_ids"], spec["sampling"].prompt_logprobs)
        assert len(g.prompt_logprobs) == len(spec["input_ids"]) and g.prompt_logprobs[0] is None
        for a, b, c in zip(g.prompt_logprobs[1:], w.prompt_logprobs[1:], direct[1:]):
            assert a.token_id == b.token_id == c.token_id
            assert abs(a.logprob - b.logprob) < 1e-4 and abs(a.logprob - c.logprob) < 1e-4
            assert list(a.top) == list(b.top) and len(a.top) == spec["sampling"].prompt_logprobs
    assert_no_leaks(eng)
