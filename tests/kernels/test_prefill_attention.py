"""Prefill attention: Triton kernel == plain-PyTorch reference == the engine's torch backend (TorchPagedAttention).

A one-layer pool is filled with random K/V; tasks' prefix blocks and sequences' own blocks are drawn from a shuffled
list of block ids, so every block table is non-contiguous. The torch backend writes the new tokens' K/V into the pool
and attends; the reference and the kernel then read the same pool in place.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from softprompt.engine.attention_torch import SeqSlice, TorchPagedAttention
from softprompt.kernels.prefill_attention import prefill_attention, prefill_attention_reference

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")

# (Hq, Hkv, head_dim, block_size, task prefix lengths, sequences as (task, own_start, num_queries), alibi).
# Under the interpreter the kernel runs with BLOCK_M=32, BLOCK_N=16, so these shapes cover several query tiles, prefix
# tails, diagonal tiles spanning two key tiles and chunked-prefill continuations (own_start > 0).
SMALL = [
    pytest.param(2, 2, 64, 16, [1, 0], [(0, 0, 1), (1, 0, 37), (0, 15, 5)], False, id="mha-P1-P0-odd"),
    pytest.param(8, 2, 32, 16, [21, 32], [(0, 3, 17), (1, 0, 33), (0, 16, 2), (1, 0, 0), (0, 0, 1)], False,
                 id="gqa4-tail-chunked-empty"),
    pytest.param(4, 4, 64, 32, [7], [(0, 0, 39), (0, 5, 12)], True, id="alibi-bs32"),
    pytest.param(2, 1, 80, 16, [19], [(0, 0, 23)], False, id="d80-padded"),
    pytest.param(2, 2, 32, 16, [0], [(0, 0, 20), (0, 4, 3)], False, id="no-prefix-empty-table"),
    pytest.param(4, 1, 16, 8, [1, 16, 0, 33, 8], [(0, 0, 3), (1, 2, 5), (2, 0, 9), (3, 0, 1), (4, 14, 4), (1, 0, 11)],
                 True, id="many-tasks-bs8-alibi"),
]
LARGE = [
    pytest.param(32, 8, 128, 16, [300, 0, 17], [(0, 0, 700), (1, 0, 513), (2, 62, 129), (0, 64, 1), (1, 0, 64)],
                 False, id="gpu-gqa4-d128"),
    pytest.param(16, 16, 64, 32, [256, 100], [(0, 0, 1000), (1, 63, 333), (0, 0, 77)], True, id="gpu-alibi-d64"),
    pytest.param(8, 2, 96, 16, [45], [(0, 0, 300), (0, 10, 257)], False, id="gpu-d96"),
    pytest.param(12, 12, 80, 64, [130, 1], [(0, 0, 255), (1, 3, 190)], True, id="gpu-alibi-d80-bs64"),
]
CASES = SMALL + (LARGE if CUDA else [])
# The interpreter's tl.dot returns garbage for bf16 operands (triton 3.9 numpy emulation): bf16 is tested on CUDA only.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
# Kernel vs reference (fp32 math): fp32 is tight; fp16/bf16 round P to the input dtype before P @ V and round the
# output, so they get a few output ulps.
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def _alibi_slopes(num_heads: int) -> torch.Tensor:
    return torch.tensor([2 ** (-8 * (h + 1) / num_heads) for h in range(num_heads)], dtype=torch.float32)


def _build(hq, hkv, head_dim, block_size, task_prefix, seqs, alibi, dtype):
    """The pool, the backend's metadata, the new tokens' q/k/v and the kernel's arguments for one batch."""
    g = torch.Generator().manual_seed(hq * 1000 + head_dim * 10 + len(seqs))

    def blocks(num_tokens: int) -> int:
        return -(-num_tokens // block_size)

    num_blocks = sum(blocks(p) for p in task_prefix) + sum(blocks(s + n) for _, s, n in seqs) + 3  # 3 unused
    ids = torch.randperm(num_blocks, generator=g).tolist()
    prefix_blocks = [[ids.pop() for _ in range(blocks(p))] for p in task_prefix]
    slices = [SeqSlice(num_queries=n, prefix_blocks=prefix_blocks[task], prefix_len=task_prefix[task],
                       own_blocks=[ids.pop() for _ in range(blocks(s + n))], own_start=s) for task, s, n in seqs]

    kv = torch.randn(1, 2, num_blocks, block_size, hkv, head_dim, generator=g).to(DEVICE, dtype)
    t = sum(n for _, _, n in seqs)
    q, k, v = (torch.randn(t, h, head_dim, generator=g).to(DEVICE, dtype) for h in (hq, hkv, hkv))

    def table(rows):  # padded with 0, a valid id
        width = max(len(r) for r in rows)  # 0 for prefix tables when no sequence has a prefix
        return torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.int32, device=DEVICE)

    lengths = torch.tensor([0] + [n for _, _, n in seqs])
    args = dict(
        cu_seqlens_q=torch.cumsum(lengths, 0).to(DEVICE, torch.int32),
        prefix_block_tables=table([s.prefix_blocks for s in slices]),
        prefix_lens=torch.tensor([s.prefix_len for s in slices], dtype=torch.int32, device=DEVICE),
        own_block_tables=table([s.own_blocks for s in slices]),
        own_starts=torch.tensor([s.own_start for s in slices], dtype=torch.int32, device=DEVICE),
        scale=head_dim ** -0.5,
        alibi_slopes=_alibi_slopes(hq).to(DEVICE) if alibi else None,
    )
    return kv, slices, (q, k, v), args


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hq, hkv, head_dim, block_size, task_prefix, seqs, alibi", CASES)
def test_kernel_matches_reference_and_torch_backend(hq, hkv, head_dim, block_size, task_prefix, seqs, alibi, dtype):
    kv, slices, (q, k, v), args = _build(hq, hkv, head_dim, block_size, task_prefix, seqs, alibi, dtype)
    pool = SimpleNamespace(kv=kv, block_size=block_size)
    backend = TorchPagedAttention(pool, slices, args["scale"], args["alibi_slopes"], hq, torch.device(DEVICE))
    expected = backend(0, q, k, v)  # also writes the new tokens' K/V into the pool

    reference = prefill_attention_reference(q, kv[0, 0], kv[0, 1], **args)
    out = prefill_attention(q, kv[0, 0], kv[0, 1], **args)
    assert out.dtype == q.dtype and out.shape == q.shape
    torch.testing.assert_close(out, reference, atol=TOL[dtype], rtol=TOL[dtype])
    # The backend computes in the input dtype: a looser bound there. It also rounds the ALiBi bias to that dtype
    # (an error of up to 2 in the logits at position 1000 in bf16), so half-precision ALiBi is checked in fp32 only.
    if dtype == torch.float32 or not alibi:
        backend_tol = TOL[dtype] * (1 if dtype == torch.float32 else 3)
        torch.testing.assert_close(reference, expected, atol=backend_tol, rtol=backend_tol)


def test_rejects_bad_shapes():
    kv, _, (q, _, _), args = _build(4, 2, 16, 16, [3], [(0, 0, 5)], False, torch.float32)
    with pytest.raises(ValueError, match="does not fit"):
        prefill_attention(q[:, :3], kv[0, 0], kv[0, 1], **args)
    with pytest.raises(ValueError, match="int32"):
        prefill_attention(q, kv[0, 0], kv[0, 1], **{**args, "prefix_lens": args["prefix_lens"].long()})


# sliding windows: 1 (a query sees itself alone), shorter than a tile, across the prefix / own boundary, past all
WINDOW_CASES = [SMALL[1], SMALL[5]] + ([LARGE[0]] if CUDA else [])


@pytest.mark.parametrize("window", [1, 6, 23, 300])
@pytest.mark.parametrize("hq, hkv, head_dim, block_size, task_prefix, seqs, alibi", WINDOW_CASES)
def test_sliding_window_matches_reference_and_torch_backend(hq, hkv, head_dim, block_size, task_prefix, seqs, alibi,
                                                            window):
    kv, slices, (q, k, v), args = _build(hq, hkv, head_dim, block_size, task_prefix, seqs, alibi, torch.float32)
    pool = SimpleNamespace(kv=kv, block_size=block_size)
    backend = TorchPagedAttention(pool, slices, args["scale"], args["alibi_slopes"], hq, torch.device(DEVICE),
                                  windows=(window,))
    expected = backend(0, q, k, v)
    reference = prefill_attention_reference(q, kv[0, 0], kv[0, 1], **args, window=window)
    out = prefill_attention(q, kv[0, 0], kv[0, 1], **args, window=window)
    torch.testing.assert_close(out, reference, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(reference, expected, atol=1e-4, rtol=1e-4)
    if window < 300:  # the window changes the result (the test can fail)
        full = prefill_attention_reference(q, kv[0, 0], kv[0, 1], **args)
        assert not torch.allclose(full, reference, atol=1e-3)


@pytest.mark.parametrize("window", [0, 6])
@pytest.mark.parametrize("hq, hkv, head_dim, block_size, task_prefix, seqs, alibi", [SMALL[1], SMALL[3]])
def test_softcap_matches_reference_and_torch_backend(hq, hkv, head_dim, block_size, task_prefix, seqs, alibi, window):
    """Gemma 2's attention-score softcap (cap * tanh(score / cap)), with and without a sliding window."""
    kv, slices, (q, k, v), args = _build(hq, hkv, head_dim, block_size, task_prefix, seqs, alibi, torch.float32)
    q = q * 3  # scores well past the cap
    pool = SimpleNamespace(kv=kv, block_size=block_size)
    backend = TorchPagedAttention(pool, slices, args["scale"], args["alibi_slopes"], hq, torch.device(DEVICE),
                                  windows=(window,), softcap=1.5)
    expected = backend(0, q, k, v)
    reference = prefill_attention_reference(q, kv[0, 0], kv[0, 1], **args, window=window, softcap=1.5)
    out = prefill_attention(q, kv[0, 0], kv[0, 1], **args, window=window, softcap=1.5)
    torch.testing.assert_close(out, reference, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(reference, expected, atol=1e-4, rtol=1e-4)
    uncapped = prefill_attention_reference(q, kv[0, 0], kv[0, 1], **args, window=window)
    assert not torch.allclose(uncapped, reference, atol=1e-3)  # the cap changes the result (the test can fail)


@pytest.mark.parametrize("window", [0, 6])
@pytest.mark.parametrize("hq, hkv, head_dim, block_size, task_prefix, seqs, alibi", [SMALL[0], SMALL[1], SMALL[4]])
def test_sinks_match_reference_and_torch_backend(hq, hkv, head_dim, block_size, task_prefix, seqs, alibi, window):
    """gpt-oss's attention sinks (a logit per head in every row's softmax denominator), with and without a sliding
    window; the kernel starts each row's online softmax from the sink."""
    kv, slices, (q, k, v), args = _build(hq, hkv, head_dim, block_size, task_prefix, seqs, alibi, torch.float32)
    sinks = torch.randn(hq, generator=torch.Generator().manual_seed(7)).mul(2).to(DEVICE)
    pool = SimpleNamespace(kv=kv, block_size=block_size)
    backend = TorchPagedAttention(pool, slices, args["scale"], args["alibi_slopes"], hq, torch.device(DEVICE),
                                  windows=(window,), sinks=sinks[None])
    expected = backend(0, q, k, v)
    reference = prefill_attention_reference(q, kv[0, 0], kv[0, 1], **args, window=window, sinks=sinks)
    out = prefill_attention(q, kv[0, 0], kv[0, 1], **args, window=window, sinks=sinks)
    torch.testing.assert_close(out, reference, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(reference, expected, atol=1e-4, rtol=1e-4)
    plain = prefill_attention_reference(q, kv[0, 0], kv[0, 1], **args, window=window)
    assert not torch.allclose(plain, reference, atol=1e-3)  # the sinks change the result (the test can fail)
    with pytest.raises(ValueError, match="sinks must be fp32"):
        prefill_attention(q, kv[0, 0], kv[0, 1], **args, sinks=sinks[:-1])
