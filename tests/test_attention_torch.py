"""The torch backend's attention (`TorchPagedAttention`: sequences sharing a prefix attended together, by whole
blocks) against a plain per-sequence computation and against the gather+cat+SDPA baseline (`PaddedSDPAAttention`),
on random batches: decode and prefill mixed, chunked-prefill continuations, sequences without a prefix, sequences
with no new token, GQA and MHA, ALiBi, fp32 and half precision. Block ids are shuffled, so no table is contiguous."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from softprompt.engine.attention_padded import PaddedSDPAAttention
from softprompt.engine.attention_torch import (DECODE_PACKING, PREFILL_PACKING, SeqSlice, TorchPagedAttention, _calls,
                                              _items)


def _slopes(num_heads: int) -> torch.Tensor:
    return torch.tensor([2 ** (-8 * (h + 1) / num_heads) for h in range(num_heads)])


def _batch(rng: random.Random, block_size: int, num_tasks: int, num_seqs: int, decode_share: float):
    """Tasks' prefixes (some empty), sequences as (task, own_start, num_queries), and their blocks."""
    prefix_lens = [rng.choice([0, 1, block_size, rng.randint(2, 3 * block_size)]) for _ in range(num_tasks)]
    specs = []
    for _ in range(num_seqs):
        task = rng.randrange(num_tasks)
        if rng.random() < decode_share:
            specs.append((task, rng.randint(0, 3 * block_size), 1))
        else:
            specs.append((task, rng.choice([0, 0, rng.randint(1, 2 * block_size)]), rng.randint(0, 2 * block_size)))
    blocks = lambda n: -(-n // block_size)  # noqa: E731
    num_blocks = sum(blocks(p) for p in prefix_lens) + sum(blocks(s + n) + 1 for _, s, n in specs) + 2
    ids = list(range(num_blocks))
    rng.shuffle(ids)
    prefix_blocks = [[ids.pop() for _ in range(blocks(p))] for p in prefix_lens]
    spare = [rng.randint(0, 1) for _ in specs]  # some own tables have a spare block past the sequence's length
    slices = [SeqSlice(n, prefix_blocks[t], prefix_lens[t], [ids.pop() for _ in range(blocks(s + n) + extra)], s)
              for (t, s, n), extra in zip(specs, spare)]
    return slices, num_blocks


def _naive(kv: torch.Tensor, seqs: list[SeqSlice], q: torch.Tensor, scale: float, slopes, rep: int) -> torch.Tensor:
    """Each query against [prefix ; own tokens up to itself], one at a time, in float64."""
    flat_k, flat_v = (kv[0, i].flatten(0, 1).double() for i in (0, 1))
    bs = kv.shape[3]
    out, row = torch.empty(q.shape, dtype=torch.float64), 0
    for s in seqs:
        def slots(blocks, n):
            return [blocks[j // bs] * bs + j % bs for j in range(n)]
        for i in range(s.num_queries):
            own_len = s.own_start + i + 1
            idx = torch.tensor(slots(s.prefix_blocks, s.prefix_len) + slots(s.own_blocks, own_len))
            keys = flat_k[idx].repeat_interleave(rep, 1)  # [L, Hq, D]
            values = flat_v[idx].repeat_interleave(rep, 1)
            scores = torch.einsum("hd,lhd->hl", q[row].double(), keys) * scale
            if slopes is not None:
                scores += slopes.double()[:, None] * (torch.arange(len(idx)) - (len(idx) - 1)).double()
            out[row] = torch.einsum("hl,lhd->hd", scores.softmax(-1), values)
            row += 1
    return out


CASES = [  # (Hq, Hkv, D, block size, tasks, sequences, share of decoding sequences, alibi)
    pytest.param(4, 2, 16, 4, 3, 12, 0.8, False, id="gqa-mostly-decode"),
    pytest.param(4, 4, 8, 8, 2, 9, 0.3, True, id="mha-alibi-mostly-prefill"),
    pytest.param(8, 1, 16, 4, 5, 20, 0.5, True, id="mqa-alibi-mixed"),
    pytest.param(2, 2, 32, 16, 1, 16, 1.0, False, id="one-task-all-decode"),
    pytest.param(6, 2, 8, 2, 4, 7, 0.0, False, id="all-prefill-bs2"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("hq, hkv, d, bs, tasks, num_seqs, decode_share, alibi", CASES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_per_sequence_attention_and_the_padded_baseline(hq, hkv, d, bs, tasks, num_seqs, decode_share,
                                                                 alibi, dtype, seed):
    rng = random.Random(seed)
    seqs, num_blocks = _batch(rng, bs, tasks, num_seqs, decode_share)
    g = torch.Generator().manual_seed(seed)
    t = sum(s.num_queries for s in seqs)
    kv = torch.randn(1, 2, num_blocks, bs, hkv, d, generator=g).to(dtype)
    q, k, v = (torch.randn(t, h, d, generator=g).to(dtype) for h in (hq, hkv, hkv))
    slopes = _slopes(hq) if alibi else None
    scale = d ** -0.5
    outputs = []
    for cls in (TorchPagedAttention, PaddedSDPAAttention):
        pool = SimpleNamespace(kv=kv.clone(), block_size=bs)
        outputs.append(cls(pool, seqs, scale, slopes, hq, torch.device("cpu"))(0, q, k, v))
    want = _naive(pool.kv, seqs, q, scale, slopes, hq // hkv)  # pool.kv now holds the new tokens' K/V
    tol = 2e-5 if dtype == torch.float32 else 3e-2
    ours, padded = outputs
    assert ours.shape == q.shape and ours.dtype == dtype
    torch.testing.assert_close(ours.double(), want, atol=tol, rtol=tol)
    torch.testing.assert_close(padded.double(), want, atol=tol, rtol=tol)


def test_a_prefix_is_read_once_per_item_and_padding_is_bounded():
    """64 decoding sequences of 16 tasks: far fewer items than sequences, each item's members share its prefix,
    every sequence is in exactly one item, and no item pads beyond max_waste x its members' work."""
    rng = random.Random(5)
    bs = 16
    prefixes = [[100 + 4 * task + j for j in range(4)] for task in range(16)]
    seqs = [SeqSlice(1, prefixes[i % 16], 64, [1000 + 10 * i + j for j in range(5)], rng.randint(16, 79))
            for i in range(64)]
    items = _items(seqs, bs)
    assert len(items) <= 24
    assert sorted(r for it in items for r in it.rows) == list(range(64))
    for it in items:
        assert it.blocks[:4] in prefixes
        assert all(seqs[r].prefix_blocks == it.blocks[:4] for r in it.rows)
        assert it.packing is DECODE_PACKING
        assert len(it.rows) * len(it.blocks) * bs <= DECODE_PACKING.max_waste * it.work


def test_decode_and_prefill_rows_are_packed_apart():
    """Decode and prefill sequences of the same tasks in one step: no item or call mixes them, and prefill items
    take only members that cost no more work together than apart (PREFILL_PACKING's slack is 0)."""
    bs = 16
    prefixes = [[100 + 4 * task + j for j in range(4)] for task in range(4)]
    seqs = [SeqSlice(1 if i % 2 else 20 + i, prefixes[i % 4], 64, [1000 + 10 * i + j for j in range(6)],
                     40 if i % 2 else 0) for i in range(32)]
    seq_of_row = [j for j, s in enumerate(seqs) for _ in range(s.num_queries)]
    items = _items(seqs, bs)
    for it in items:
        kinds = {seqs[seq_of_row[r]].num_queries == 1 for r in it.rows}
        assert len(kinds) == 1
        assert it.packing is (DECODE_PACKING if kinds == {True} else PREFILL_PACKING)
    for call in _calls(items, bs):
        assert len({it.packing for it in call}) == 1
    assert PREFILL_PACKING.slack == 0 and PREFILL_PACKING.max_waste < DECODE_PACKING.max_waste


def test_long_members_are_not_packed_together():
    """Chunked prefill of two long sequences of one task: packing both in one item would nearly double the work,
    so each gets its own item (the prefix is read twice, which is cheaper)."""
    seqs = [SeqSlice(64, [0], 4, list(range(10 + 20 * i, 30 + 20 * i)), 256) for i in range(2)]
    assert [len(it.rows) for it in _items(seqs, 16)] == [64, 64]
