"""Layers with a recurrent state instead of K/V: Qwen3.5's linear attention (Gated DeltaNet), LFM2's short
convolutions, Mamba-2 layers (Granite 4.0, Nemotron-H) and Kimi Linear's KDA. The chunked delta rules and Mamba-2
scan against their token-by-token forms, and the engine's recurrent states (one per sequence and per task prompt,
kept with blocks) against the reference path, across delta-rule and scan chunks, prefill chunks, preemption, aborts
and prompt eviction. (HF + PEFT against the reference: tests/test_models_vs_hf.py's `qwen3_5*`, `qwen3_next`,
`lfm2*`, `granite_hybrid*`, `nemotron_h` and `kimi_linear*` variants.)"""

from __future__ import annotations

import pytest
import torch

from softprompt import Engine, Request, SamplingParams
from softprompt.engine.errors import SoftPromptError
from softprompt.engine.kv_pool import KVPool
from softprompt.engine.models import mamba
from softprompt.engine.models.kimi_linear import kda_chunked, kda_step
from softprompt.engine.models.mamba import selective_chunked, selective_step
from softprompt.engine.models.mamba2 import ssd_chunked, ssd_step
from softprompt.engine.models.qwen3_5 import delta_rule_chunked, delta_rule_step, l2_normalize
from softprompt.testing import build_prefix_tuning_adapter, build_prompt_tensor

from .runtime_helpers import assert_no_leaks, make_requests, register_tasks, run

HYBRID = ["qwen3_5", "lfm2", "granite_hybrid", "nemotron_h", "jamba", "olmo_hybrid", "falcon_h1", "lfm3", "kimi_linear"]
ATTENTION_FREE = ["mamba", "mamba2"]
STATEFUL = HYBRID + ATTENTION_FREE


@pytest.mark.parametrize("n", [1, 5, 64, 150])
def test_chunked_delta_rule_equals_token_by_token(n):
    g = torch.Generator().manual_seed(n)
    h, dk, dv = 3, 8, 5
    q = l2_normalize(torch.randn(n, h, dk, generator=g)) * dk**-0.5
    k = l2_normalize(torch.randn(n, h, dk, generator=g))
    v = torch.randn(n, h, dv, generator=g)
    decay = -torch.rand(n, h, generator=g)  # log decays (< 0)
    beta = torch.rand(n, h, generator=g)
    state0 = torch.randn(h, dk, dv, generator=g)
    out, state = delta_rule_chunked(q, k, v, decay, beta, state0, chunk=16)
    s = state0[None]
    for t in range(n):
        o, s = delta_rule_step(q[t:t + 1], k[t:t + 1], v[t:t + 1], decay[t:t + 1], beta[t:t + 1], s)
        torch.testing.assert_close(out[t], o[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state, s[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n", [1, 5, 64, 150])
def test_chunked_kimi_delta_rule_equals_token_by_token(n):
    """Kimi Delta Attention: the delta rule with a decay per key channel, chunk-wise against token by token."""
    g = torch.Generator().manual_seed(n)
    h, dk, dv = 3, 8, 5
    q = l2_normalize(torch.randn(n, h, dk, generator=g)) * dk**-0.5
    k = l2_normalize(torch.randn(n, h, dk, generator=g))
    v = torch.randn(n, h, dv, generator=g)
    decay = -torch.rand(n, h, dk, generator=g)  # log decays (< 0), one per key channel
    beta = torch.rand(n, h, generator=g)
    state0 = torch.randn(h, dk, dv, generator=g)
    out, state = kda_chunked(q, k, v, decay, beta, state0, chunk=16)
    s = state0[None]
    for t in range(n):
        o, s = kda_step(q[t:t + 1], k[t:t + 1], v[t:t + 1], decay[t:t + 1], beta[t:t + 1], s)
        torch.testing.assert_close(out[t], o[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state, s[0], atol=1e-5, rtol=1e-5)
    per_head = kda_chunked(q, k, v, decay.mean(-1, keepdim=True).expand_as(decay), beta, state0, chunk=16)[0]
    assert n == 1 or (per_head - out).abs().max() > 1e-3  # (the channels' decays matter)


@pytest.mark.parametrize("n", [1, 7, 16, 50])
def test_chunked_mamba2_scan_equals_token_by_token(n):
    g = torch.Generator().manual_seed(100 + n)
    h, p, s = 3, 4, 5
    x, b, c = torch.randn(n, h, p, generator=g), torch.randn(n, h, s, generator=g), torch.randn(n, h, s, generator=g)
    dt = torch.rand(n, h, generator=g)
    a = -torch.rand(h, generator=g) * 2
    state0 = torch.randn(h, p, s, generator=g)
    out, state = ssd_chunked(x, dt, a, b, c, state0, chunk=8)
    st = state0[None]
    for t in range(n):
        o, st = ssd_step(x[t:t + 1], dt[t:t + 1], a, b[t:t + 1], c[t:t + 1], st)
        torch.testing.assert_close(out[t], o[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state, st[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n", [1, 7, 16, 50])
def test_chunked_selective_scan_equals_token_by_token(n, monkeypatch):
    """Mamba-1's scan in chunks of 7 tokens (its pairwise decays capped at 7 x 7 x 3 x 4 elements)."""
    monkeypatch.setattr(mamba, "PAIRWISE_ELEMENTS", 7 * 7 * 3 * 4)
    g = torch.Generator().manual_seed(200 + n)
    d, s = 3, 4
    x, dt = torch.randn(n, d, generator=g), torch.rand(n, d, generator=g)
    b, c = torch.randn(n, s, generator=g), torch.randn(n, s, generator=g)
    a = -torch.rand(d, s, generator=g) * 2
    state0 = torch.randn(d, s, generator=g)
    out, state = selective_chunked(x, dt, a, b, c, state0)
    st = state0[None]
    for t in range(n):
        o, st = selective_step(x[t:t + 1], dt[t:t + 1], a, b[t:t + 1], c[t:t + 1], st)
        torch.testing.assert_close(out[t], o[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state, st[0], atol=1e-5, rtol=1e-5)


def _engines(model_dir, **kwargs):
    ref = Engine(model_dir, device="cpu", dtype="float32", backend="reference")
    return ref, Engine(model_dir, device="cpu", dtype="float32", backend="torch", **kwargs)


def _long_requests(names: list[str | None], seed: int) -> list[dict]:
    """Inputs longer than a delta-rule chunk (64 tokens), with short ones beside them."""
    g = torch.Generator().manual_seed(seed)
    specs = []
    for i, length in enumerate([150, 3, 70, 1, 90, 20]):
        ids = torch.randint(4, 512, (length,), generator=g).tolist()
        specs.append({"prompt": names[i % len(names)], "input_ids": ids,
                      "sampling": SamplingParams(max_new_tokens=6, ignore_eos=True)})
    return specs


@pytest.mark.parametrize("variant", STATEFUL)
def test_long_prompts_and_inputs_across_chunks_equal_the_reference(variant, model_dir_for):
    """Prompts of 70 rows and inputs up to 150 tokens (several delta-rule chunks), prefill split into chunks of 50
    tokens across steps: the same tokens as the reference, and prompt logprobs within fp32 noise of it."""
    ref, eng = _engines(model_dir_for(variant), max_batched_tokens=50)
    width = eng.config.embedding_width
    for e in (ref, eng):
        e.add_prompt("long", build_prompt_tensor(width, 70, seed=1))
        e.add_prompt("short", build_prompt_tensor(width, 5, seed=2))
    specs = _long_requests(["long", "short", None], seed=3)
    for spec in specs:
        spec["sampling"] = SamplingParams(max_new_tokens=6, ignore_eos=True, prompt_logprobs=0)
    got, want = eng.generate([Request(**s) for s in specs]), ref.generate([Request(**s) for s in specs])
    for g, w in zip(got, want):  # (the prompt logprobs of chunked prefill: every input position)
        assert g.token_ids == w.token_ids
        assert max((abs(a.logprob - b.logprob) for a, b in zip(g.prompt_logprobs[1:], w.prompt_logprobs[1:])),
                   default=0.0) < 1e-4
    assert eng.pool.states.num_held == len(eng.prefix_cache.entries)  # the prompts' states alone
    assert_no_leaks(eng)


@pytest.mark.parametrize("variant", HYBRID)
def test_preemption_restarts_from_the_prompt_state(variant, model_dir_for):
    d = model_dir_for(variant)
    bytes_per_block = KVPool.bytes_per_block(Engine(d, device="cpu", dtype="float32",
                                                    backend="reference").config, 4, torch.float32)
    ref, eng = _engines(d, block_size=4, kv_cache_bytes=40 * bytes_per_block)
    names = register_tasks([ref, eng], 2)
    specs = make_requests(names, 10, seed=7, max_new_tokens=12)
    assert run(eng, specs) == run(ref, specs)
    assert eng.scheduler.num_preemptions > 0
    assert eng.pool.states.num_held == len(eng.prefix_cache.entries)
    assert_no_leaks(eng)


@pytest.mark.parametrize("variant", STATEFUL)
def test_states_go_with_their_blocks(variant, model_dir_for):
    """An aborted request's state is freed with its blocks, a removed prompt's with its prefix; the other requests
    go on unchanged."""
    ref, eng = _engines(model_dir_for(variant))
    names = register_tasks([ref, eng], 3)
    specs = make_requests(names, 6, seed=11, max_new_tokens=10)
    expected = run(ref, specs)
    ids = [eng.add_request(Request(**s)) for s in specs]
    outs = {}
    for _ in range(3):
        for o in eng.step():
            outs[o.request_id] = o
    assert eng.pool.states.num_held == 6 + 3  # each running request's, each prompt's
    eng.abort(ids[2])
    assert eng.pool.states.num_held == 5 + 3
    while eng.has_unfinished_requests():
        for o in eng.step():
            outs[o.request_id] = o
    assert [outs[r].token_ids for i, r in enumerate(ids) if i != 2] == [e for i, e in enumerate(expected) if i != 2]
    assert eng.pool.states.num_held == 3
    eng.remove_prompt("task0")
    assert eng.pool.states.num_held == 2
    assert_no_leaks(eng)


@pytest.mark.parametrize("variant", STATEFUL)
def test_what_a_recurrent_state_rules_out(variant, model_dir_for, tmp_path):
    """No block cache (cached K/V cannot restore a state), no prefix-tuning adapter: off, or refused by name. (No
    CUDA-graph decode either: tests/kernels/test_triton_backend.py.)"""
    d = model_dir_for(variant)
    eng = Engine(d, device="cpu", dtype="float32", backend="torch")
    assert eng.block_cache is None
    adapter = build_prefix_tuning_adapter(d, tmp_path / "prefix", num_virtual_tokens=4)
    with pytest.raises(SoftPromptError, match="recurrent state"):
        eng.add_prompt("kv", adapter)


@pytest.mark.parametrize("variant", STATEFUL)
def test_random_traffic_equals_the_reference(variant, model_dir_for):
    """test_soak's random traffic (tasks added and replaced mid-run, aborts, sampling, stop strings) through chunked
    prefill, prompt eviction and preemption, every finished request checked against the reference path."""
    from .test_soak import soak, tight_engine

    d = model_dir_for(variant)
    eng = soak(d, 7 + STATEFUL.index(variant), steps=140, **tight_engine(d))
    assert eng.scheduler.num_preemptions > 0 or variant in ATTENTION_FREE  # (a block a sequence: none to grow)
    assert eng.prefix_cache.stats.evictions > 0
    assert eng.block_cache is None


@pytest.mark.parametrize("variant", ATTENTION_FREE)
def test_a_model_without_attention_keeps_states_alone(variant, model_dir_for):
    """Mamba / Mamba-2: no K/V at all; a block is one state (a running sequence's or a cached prompt's) as long as the
    model's positions, and the pool holds as many as kv_cache_bytes buys. With room for 5, twelve requests of four
    tasks wait their turn and evict prompts, and still give the reference path's tokens."""
    d = model_dir_for(variant)
    ref = Engine(d, device="cpu", dtype="float32", backend="reference")
    config = ref.config
    state_bytes = KVPool.unit_bytes(config, 4, torch.float32)
    assert config.attention_free and KVPool.bytes_per_block(config, 4, torch.float32) == 0
    assert state_bytes == sum(ref.pool.states.conv[layer][0].numel() * 4 + ref.pool.states.ssm[layer][0].numel() * 4
                              for layer in config.recurrent_state.layers)
    eng = Engine(d, device="cpu", dtype="float32", backend="torch", block_size=4, kv_cache_bytes=5 * state_bytes + 7,
                 max_model_len=4096)
    assert (eng.pool.num_blocks, eng.pool.block_size) == (5, 4096)
    assert eng.pool.kv.numel() == 0
    names = register_tasks([ref, eng], 4)
    specs = make_requests(names, 12, seed=21, max_new_tokens=9)
    ids = [eng.add_request(Request(**s)) for s in specs]
    outs, peak = {}, 0
    while eng.has_unfinished_requests():
        for o in eng.step():
            outs[o.request_id] = o
        peak = max(peak, eng.pool.states.num_held)
        assert eng.pool.num_free + eng.pool.states.num_held == 5  # a state for every block in use
    assert peak == 5 and eng.prefix_cache.stats.evictions > 0
    assert [outs[i].token_ids for i in ids] == run(ref, specs)
    assert_no_leaks(eng)
    with pytest.raises(SoftPromptError, match="max_model_len"):
        Engine(d, device="cpu", dtype="float32", max_model_len=config.max_positions + 1)
