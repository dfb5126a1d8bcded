"""Shared-prefix decode attention: Triton kernel vs its reference, and the reference vs the torch backend.

Without CUDA the kernel runs in the Triton interpreter on tiny shapes; with CUDA the large cases run too.
Caches are filled with NaN wherever no sequence's keys live (spare blocks, tails of partly used blocks, table padding
points at such blocks), so any read outside the visible keys poisons the output.
"""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import pytest
import torch

from softprompt.engine.attention_padded import BatchMetadata
from softprompt.engine.attention_torch import SeqSlice, TorchPagedAttention
from softprompt.engine.kv_pool import KVPool
from softprompt.kernels.decode_attention import decode_attention, decode_attention_reference, group_by_prefix

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
# fp32: exact dots (input_precision="ieee"), only summation order differs. fp16/bf16: probabilities are rounded to
# the input dtype before the P @ V dot and the output is rounded once (reference: fp32 throughout, rounded once).
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=3e-3, rtol=3e-3),
       torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}

# groups: (prefix length P, [own length of each member]); an empty member list is a group with no sequences.
CASES = {
    "one_big_group": [(21, [1, 3, 9, 17, 2, 5])],
    "singletons": [(0, [3]), (1, [1]), (8, [12]), (13, [2]), (30, [7])],
    "mixed": [(16, [1, 4, 2]), (0, [5, 1]), (1, [9]), (11, []), (37, [1, 20, 3, 6, 2])],  # ratio 4: 20 rows > BLOCK_M
    "no_prefix": [(0, [2, 7]), (0, [1])],
}
LARGE_CASES = {  # CUDA only
    "large_groups": [(1000, [1, 700, 33, 2049] * 16), (0, [5, 300]), (4099, [17] * 40), (1, [1])],
    "many_singletons": [(p, [o]) for p, o in zip(range(0, 3000, 61), range(1, 5000, 97))],
}


def make_case(groups, hq, hkv, d, block_size, dtype, alibi=False, seed=0):
    """Kernel kwargs for `groups` on DEVICE, with shuffled block ids and NaN wherever no visible key lives."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=gen, device=DEVICE)  # noqa: E731
    blocks = lambda n: -(-n // block_size)  # noqa: E731
    needed = sum(blocks(p) + sum(blocks(n) for n in own) for p, own in groups)
    num_blocks = needed + 3
    ids = iter(torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist())
    spare = [next(ids) for _ in range(3)]
    k_cache = torch.full((num_blocks, block_size, hkv, d), float("nan"), device=DEVICE)
    v_cache = torch.full_like(k_cache, float("nan"))

    def fill(n: int) -> list[int]:
        table = [next(ids) for _ in range(blocks(n))]
        idx = torch.arange(n, device=DEVICE)
        where = (torch.tensor(table, dtype=torch.long, device=DEVICE)[idx // block_size], idx % block_size)
        k_cache[where] = randn(n, hkv, d)
        v_cache[where] = randn(n, hkv, d)
        return table

    def padded(tables: list[list[int]]) -> torch.Tensor:
        width = max(len(t) for t in tables) + 1  # at least one padding column
        return torch.tensor([t + spare[:1] * (width - len(t)) for t in tables], dtype=torch.int32, device=DEVICE)

    prefix_tables = [fill(p) for p, _ in groups]
    own = [n for _, members in groups for n in members]
    own_tables = [fill(n) for n in own]
    starts = [0, *itertools.accumulate(len(members) for _, members in groups)]
    int32 = lambda values: torch.tensor(values, dtype=torch.int32, device=DEVICE)  # noqa: E731
    return dict(
        q=(randn(len(own), hq, d) * 2).to(dtype),  # sharper softmax than unit-variance scores
        k_cache=k_cache.to(dtype), v_cache=v_cache.to(dtype),
        group_starts=int32(starts),
        group_prefix_block_tables=padded(prefix_tables),
        group_prefix_lens=int32([p for p, _ in groups]),
        own_block_tables=padded(own_tables),
        own_lens=int32(own),
        scale=1 / math.sqrt(d),
        alibi_slopes=torch.rand(hq, generator=gen, device=DEVICE) * 0.5 if alibi else None,
    )


def check(groups, hq=4, hkv=2, d=32, block_size=8, dtype=torch.float32, alibi=False, num_splits=None, seed=0,
          window=0, softcap=0.0, sinks=None):
    case = make_case(groups, hq, hkv, d, block_size, dtype, alibi, seed)
    out = decode_attention(**case, num_splits=num_splits, window=window, softcap=softcap, sinks=sinks)
    ref = decode_attention_reference(**case, window=window, softcap=softcap, sinks=sinks)
    assert out.dtype == dtype and out.shape == case["q"].shape
    assert torch.isfinite(ref).all()
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype])


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("heads", [(2, 2), (8, 2)], ids=["mha", "gqa4"])
@pytest.mark.parametrize("case", list(CASES))
def test_kernel_matches_reference(case, heads, num_splits):
    check(CASES[case], hq=heads[0], hkv=heads[1], num_splits=num_splits)


# The interpreter's tl.dot multiplies bf16 operands as their raw uint16 bits (triton 3.9): bf16 runs on CUDA only.
BF16 = pytest.param(torch.bfloat16, id="bf16", marks=pytest.mark.skipif(not CUDA, reason="bf16 tl.dot needs CUDA"))


@pytest.mark.parametrize("dtype", [pytest.param(torch.float16, id="fp16"), BF16])
def test_half_dtypes(dtype):
    check(CASES["mixed"], hq=8, hkv=2, dtype=dtype, num_splits=2)


@pytest.mark.parametrize("d,dtype", [(64, torch.float32), (64, torch.float16), (80, torch.float32)])
def test_head_dims(d, dtype):
    check(CASES["mixed"], hq=4, hkv=1, d=d, dtype=dtype, num_splits=2, block_size=16)


@pytest.mark.parametrize("num_splits", [None, 2])
def test_alibi(num_splits):
    check(CASES["mixed"], hq=8, hkv=2, alibi=True, num_splits=num_splits)


def test_prefix_table_without_columns():
    """A batch with no prefix at all may pass [G, 0] prefix tables: the prefix pass is skipped."""
    case = make_case(CASES["no_prefix"], 4, 2, 32, 8, torch.float32)
    case["group_prefix_block_tables"] = case["group_prefix_block_tables"][:, :0]
    torch.testing.assert_close(decode_attention(**case), decode_attention_reference(**case), **TOL[torch.float32])


def test_more_splits_than_key_tiles():
    check(CASES["singletons"], hq=2, hkv=1, num_splits=7)  # most splits are empty (lse = -inf)


@pytest.mark.skipif(not CUDA, reason="large shapes need CUDA")
@pytest.mark.parametrize("num_splits", [None, 1, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("heads,d", [((32, 8), 128), ((8, 8), 64), ((16, 4), 80)],
                         ids=["gqa4-128", "mha-64", "gqa4-80-alibi"])
@pytest.mark.parametrize("case", list(LARGE_CASES))
def test_large_cuda(case, heads, d, dtype, num_splits):
    check(LARGE_CASES[case], hq=heads[0], hkv=heads[1], d=d, block_size=16, dtype=dtype, num_splits=num_splits,
          alibi=heads == (16, 4))


# sliding windows: the query alone, within the own tokens, across the prefix / own boundary, past every key
@pytest.mark.parametrize("window", [1, 3, 12, 100])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_sliding_window(window, num_splits):
    check(CASES["mixed"], hq=8, hkv=2, num_splits=num_splits, window=window)
    check(CASES["one_big_group"], hq=4, hkv=4, alibi=True, num_splits=num_splits, window=window)
    if window < 100:  # the window changes the result (the test can fail)
        case = make_case(CASES["mixed"], 8, 2, 32, 8, torch.float32)
        assert not torch.allclose(decode_attention_reference(**case), decode_attention_reference(**case, window=window))


@pytest.mark.parametrize("window", [0, 3])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_softcap(window, num_splits):
    """Gemma 2's attention-score softcap, with and without a sliding window."""
    check(CASES["mixed"], hq=8, hkv=2, num_splits=num_splits, window=window, softcap=0.7)
    case = make_case(CASES["mixed"], 8, 2, 32, 8, torch.float32)
    capped = decode_attention_reference(**case, window=window, softcap=0.7)
    assert not torch.allclose(decode_attention_reference(**case, window=window), capped)  # the test can fail


def _sinks(num_heads: int) -> torch.Tensor:
    return torch.randn(num_heads, generator=torch.Generator().manual_seed(11)).mul(2).to(DEVICE)


@pytest.mark.parametrize("window", [0, 3])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_sinks(window, num_splits):
    """gpt-oss's attention sinks: one more partial per (seq, head) in the merge (lse = the sink, output 0)."""
    check(CASES["mixed"], hq=8, hkv=2, num_splits=num_splits, window=window, sinks=_sinks(8))
    check(CASES["singletons"], hq=2, hkv=1, num_splits=7, window=window, sinks=_sinks(2))  # empty splits too
    case = make_case(CASES["mixed"], 8, 2, 32, 8, torch.float32)
    with_sinks = decode_attention_reference(**case, window=window, sinks=_sinks(8))
    assert not torch.allclose(decode_attention_reference(**case, window=window), with_sinks)  # the test can fail


@pytest.mark.parametrize("alibi, window, sinks", [(False, 0, False), (True, 0, False), (False, 5, False),
                                                  (False, 5, True)], ids=["plain", "alibi", "window", "sinks"])
def test_reference_matches_torch_backend(alibi, window, sinks):
    """One query per sequence through TorchPagedAttention on a real KVPool (layer 1) vs the reference."""
    groups, hq, hkv, d, bs = CASES["mixed"], 8, 2, 32, 8
    case = make_case(groups, hq, hkv, d, bs, torch.float32, alibi=alibi, seed=3)
    case["k_cache"] = torch.nan_to_num(case["k_cache"])  # SDPA's padded keys read slot 0: no NaN anywhere here
    case["v_cache"] = torch.nan_to_num(case["v_cache"])
    config = SimpleNamespace(num_layers=2, num_kv_heads=hkv, head_dim=d)
    pool = KVPool(config, case["k_cache"].shape[0], bs, torch.float32, DEVICE)
    pool.kv[1, 0] = case["k_cache"]
    pool.kv[1, 1] = case["v_cache"]
    seqs, group_of = [], [g for g, (_, members) in enumerate(groups) for _ in members]
    for s, g in enumerate(group_of):
        n = int(case["own_lens"][s])
        seqs.append(SeqSlice(num_queries=1, prefix_len=groups[g][0], own_start=n - 1,
                             prefix_blocks=case["group_prefix_block_tables"][g].tolist(),
                             own_blocks=case["own_block_tables"][s].tolist()))
    meta = BatchMetadata.build(seqs, bs, DEVICE)
    flat_k, flat_v = pool.kv[1, 0].flatten(0, 1), pool.kv[1, 1].flatten(0, 1)
    new_k, new_v = flat_k[meta.slot_mapping].clone(), flat_v[meta.slot_mapping].clone()  # rewrites what is there
    layer_sinks = _sinks(hq) if sinks else None
    backend = TorchPagedAttention(pool, seqs, case["scale"], case["alibi_slopes"], hq, torch.device(DEVICE),
                                  windows=(0, window),
                                  sinks=None if layer_sinks is None else torch.stack([layer_sinks * 0, layer_sinks]))
    torch_out = backend(1, case["q"], new_k, new_v)
    case["k_cache"], case["v_cache"] = pool.kv[1, 0], pool.kv[1, 1]
    ref = decode_attention_reference(**case, window=window, sinks=layer_sinks)
    torch.testing.assert_close(ref, torch_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(decode_attention(**case, window=window, sinks=layer_sinks), torch_out,
                               **TOL[torch.float32])


def test_group_by_prefix():
    ids = ["a", None, "b", "a", None, "a"]
    perm, starts = group_by_prefix(ids)
    assert perm == [0, 3, 5, 1, 4, 2] and starts == [0, 3, 5, 6]
    assert group_by_prefix([]) == ([], [0])
    grouped = [ids[i] for i in perm]
    for lo, hi in zip(starts, starts[1:]):
        assert len(set(grouped[lo:hi])) == 1


def test_noncontiguous_q_and_cache_views():
    """q as a head-sliced view, caches as one layer of a pool-like tensor."""
    case = make_case(CASES["mixed"], 4, 2, 32, 8, torch.float32, seed=5)
    case["q"] = torch.cat([case["q"], torch.zeros_like(case["q"])], dim=2)[:, :, :32]
    pool = torch.stack([torch.stack([case["k_cache"], case["v_cache"]])] * 2)
    case["k_cache"], case["v_cache"] = pool[1, 0], pool[1, 1]
    torch.testing.assert_close(decode_attention(**case, num_splits=2), decode_attention_reference(**case),
                               **TOL[torch.float32])


@pytest.mark.parametrize("change,match", [
    (dict(own_lens=torch.ones(3, dtype=torch.int64)), "own_lens must be a 1-D int32"),
    (dict(alibi_slopes=torch.ones(5)), "alibi_slopes"),
    (dict(sinks=torch.ones(4, dtype=torch.float16)), "sinks must be fp32"),
    (dict(group_prefix_lens=torch.zeros(2, dtype=torch.int32)), "disagree"),
    (dict(num_splits=0), "num_splits"),
])
def test_bad_input(change, match):
    case = make_case([(4, [1, 2, 3])], 4, 2, 16, 8, torch.float32)
    case.update({k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in change.items()})
    with pytest.raises(ValueError, match=match):
        decode_attention(**case)
