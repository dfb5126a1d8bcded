"""rope_kv_write against its reference and against our Llama's rotary_cos_sin + apply_rotary.

Tolerances: fp32 1e-5. fp16 is bit-exact in practice (each product and the sum are rounded to fp16 like the eager
ops); bound 2e-3. bf16 5e-2 / 2e-2: the Triton interpreter truncates fp32 -> bf16 instead of rounding to nearest,
so a result can be off by one bf16 ulp of the products (CUDA rounds like torch).
"""

from __future__ import annotations

import pytest
import torch

from softprompt.engine.loader import load_model
from softprompt.engine.models.common import apply_rotary, rotary_cos_sin
from softprompt.kernels.rope_kv_write import rope_kv_write, rope_kv_write_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (5e-2, 2e-2)}  # (atol, rtol)
GPU = torch.cuda.is_available()
MAX_POS = 128


def rope_tables(dim: int, dtype: torch.dtype, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    return rotary_cos_sin(inv_freq.to(DEVICE), 1.0, torch.arange(MAX_POS, device=DEVICE), dtype)


def make_batch(seq_lens: list[int], block_size: int, num_blocks: int, seed: int):
    """Positions (task prefix length + own index, so never from 0) and slots in shuffled own blocks, per sequence."""
    g = torch.Generator().manual_seed(seed)
    free = torch.randperm(num_blocks, generator=g).tolist()
    positions, slots = [], []
    for i, n in enumerate(seq_lens):
        prefix, done = 3 + 5 * i, i  # decode-style: some own tokens already cached
        own = torch.arange(done, done + n)
        blocks = torch.tensor([free.pop() for _ in range((done + n + block_size - 1) // block_size)])
        positions.append(prefix + own)
        slots.append(blocks[own // block_size] * block_size + own % block_size)
    return torch.cat(positions).to(DEVICE), torch.cat(slots).to(DEVICE)


def fused_qkv(t: int, hq: int, hkv: int, dim: int, dtype: torch.dtype, layout: str, g: torch.Generator):
    """Non-contiguous q/k/v views of one projection output: Llama-style [q | k | v] or BLOOM-style per head."""
    if layout == "split":
        qkv = torch.randn(t, (hq + 2 * hkv) * dim, generator=g).to(DEVICE, dtype)
        return qkv.view(t, hq + 2 * hkv, dim).split([hq, hkv, hkv], dim=1)
    qkv = torch.randn(t, hq * 3 * dim, generator=g).to(DEVICE, dtype).view(t, hq, 3, dim)  # BLOOM: Hq == Hkv
    return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]


CASES = [  # (seq_lens, Hq, Hkv, head_dim, layout)
    ([1, 4, 3], 4, 4, 64, "split"),
    ([5, 2], 8, 2, 64, "split"),  # GQA 4
    ([1, 6], 4, 1, 80, "split"),
    ([3, 1], 2, 2, 128, "interleaved"),
    ([2, 3], 4, 1, 128, "split"),
] + ([([37, 1, 200, 64], 32, 8, 128, "split"), ([100, 17], 16, 16, 64, "interleaved")] if GPU else [])


@pytest.mark.parametrize("rotary", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"T{sum(c[0])}-q{c[1]}-kv{c[2]}-d{c[3]}-{c[4]}")
def test_matches_reference(case, dtype, rotary):
    seq_lens, hq, hkv, dim, layout = case
    g = torch.Generator().manual_seed(dim + hq)
    block_size, num_blocks = 4, 4 * len(seq_lens) + sum(seq_lens) // 4 + 3
    positions, slots = make_batch(seq_lens, block_size, num_blocks, seed=hkv)
    q, k, v = fused_qkv(len(positions), hq, hkv, dim, dtype, layout, g)
    assert not q.is_contiguous() and not k.is_contiguous()
    k_cache = torch.randn(num_blocks, block_size, hkv, dim, generator=g).to(DEVICE, dtype)
    v_cache = torch.randn(num_blocks, block_size, hkv, dim, generator=g).to(DEVICE, dtype)
    k_ref, v_ref, k_before, v_before = k_cache.clone(), v_cache.clone(), k_cache.clone(), v_cache.clone()
    cos_sin = rope_tables(dim, dtype) if rotary else None

    q_out = rope_kv_write(q, k, v, positions, cos_sin, k_cache, v_cache, slots)
    q_ref = rope_kv_write_reference(q, k, v, positions, cos_sin, k_ref, v_ref, slots)

    assert q_out.is_contiguous() and q_out.shape == q.shape and q_out.dtype == dtype
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(q_out, q_ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(k_cache, k_ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(v_cache, v_ref, atol=0, rtol=0)  # v is copied, never rotated
    if not rotary:
        torch.testing.assert_close(q_out, q, atol=0, rtol=0)
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool, device=DEVICE)
    untouched[slots] = False
    for cache, before in ((k_cache, k_before), (v_cache, v_before)):
        assert torch.equal(cache.flatten(0, 1)[untouched], before.flatten(0, 1)[untouched])


def test_rejects_bad_inputs():
    q = torch.randn(3, 4, 64, device=DEVICE)
    k = torch.randn(3, 2, 64, device=DEVICE)
    cache = torch.zeros(2, 4, 2, 64, device=DEVICE)
    pos = torch.arange(3, device=DEVICE)
    with pytest.raises(ValueError, match="dtype"):
        rope_kv_write(q, k, k, pos, None, cache.half(), cache.half(), pos)
    with pytest.raises(ValueError, match="caches"):
        rope_kv_write(q, k, k, pos, None, cache[:, :, :1], cache[:, :, :1], pos)
    with pytest.raises(ValueError, match="cos/sin"):
        rope_kv_write(q, k, k, pos, rope_tables(64, torch.float16), cache, cache, pos)
    with pytest.raises(ValueError, match="unit stride"):
        rope_kv_write(torch.randn(3, 64, 4, device=DEVICE).transpose(1, 2), k, k, pos, None, cache, cache, pos)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("variant", ["llama", "llama3_rope"])
def test_matches_model_rotary(variant, dtype, model_dir_for):
    """Layer 0's q/k of a real tiny Llama, rotated in place of the model's apply_rotary(rotary_cos_sin(...))."""
    model = load_model(model_dir_for(variant), DEVICE, "float32" if dtype == torch.float32 else "float16")
    c = model.config
    attn = model.model.layers[0].self_attn
    g = torch.Generator().manual_seed(2)
    t = 9
    positions = torch.arange(4, 4 + t, device=DEVICE)  # after a 4-row task prefix
    x = torch.randn(t, c.hidden_size, generator=g).to(DEVICE, dtype)
    with torch.no_grad():
        weight = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])  # one fused QKV GEMM
        q, k, v = (x @ weight.T).view(t, -1, c.head_dim).split([c.num_heads, c.num_kv_heads, c.num_kv_heads], dim=1)
        cos, sin = rotary_cos_sin(model.inv_freq, model.rope_scaling, positions, dtype)
        want_q, want_k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    block_size = 4
    k_cache = torch.zeros(4, block_size, c.num_kv_heads, c.head_dim, device=DEVICE, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.tensor([2, 0, 3], device=DEVICE)[torch.arange(t, device=DEVICE) // block_size] * block_size + (
        torch.arange(t, device=DEVICE) % block_size)
    table = rotary_cos_sin(model.inv_freq, model.rope_scaling, torch.arange(c.max_positions, device=DEVICE), dtype)
    q_out = rope_kv_write(q, k, v, positions, table, k_cache, v_cache, slots)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(q_out, want_q, atol=atol, rtol=rtol)
    flat_k, flat_v = k_cache.flatten(0, 1), v_cache.flatten(0, 1)
    torch.testing.assert_close(flat_k[slots], want_k, atol=atol, rtol=rtol)
    torch.testing.assert_close(flat_v[slots], v, atol=0, rtol=0)
