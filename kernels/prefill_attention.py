"""Prefill attention over [task prefix KV ; own KV], read in place from the paged KV pool.

FlashAttention-2 style (online softmax in fp32, exp2) over varlen packed queries. Each sequence's keys are two
segments of the pool, each addressed through its own block table: the task prefix (length P, absolute positions
0..P-1, fully visible) and the sequence's own tokens (own index j at position P + j, causal: query i sees own keys
0..own_start + i). Nothing is gathered, concatenated or padded to a batch. ALiBi adds `slope[h] * key_position`.
A sliding window W (Mistral, Qwen, Phi-3, Gemma layers) hides keys W or more positions behind the query; tiles
wholly behind every query of a tile are skipped. A softcap C (Gemma 2) turns each scaled score s into C * tanh(s / C)
before masking. Attention sinks (gpt-oss) add one learned logit per head to every row's softmax denominator, a key
with no value: the online softmax starts from it (m = sink, l = 1) instead of from nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .tiles import gpu_tiles

_LOG2E = 1.4426950408889634


def check_head_vector(name: str, vector: Tensor | None, num_heads: int, device: torch.device) -> None:
    """A per-head fp32 vector argument (ALiBi slopes, attention sinks): None, or [num_heads] fp32 on `device`."""
    if vector is not None and (vector.shape != (num_heads,) or vector.dtype != torch.float32
                               or vector.device != device):
        raise ValueError(f"{name} must be fp32 [{num_heads}] on the queries' device, got {vector.dtype} "
                         f"{tuple(vector.shape)} on {vector.device}")


def softmax_with_sinks(scores: Tensor, sinks: Tensor | None) -> Tensor:
    """softmax over the last dim of fp32 scores [H, ..., keys], with head h's sink logit (gpt-oss) joining each row's
    denominator as a key without a value (HF's eager attention: concatenated as a last column, dropped after)."""
    if sinks is None:
        return scores.softmax(-1)
    column = sinks.float().view(-1, *([1] * (scores.dim() - 1))).expand(*scores.shape[:-1], 1)
    return torch.cat([scores, column], dim=-1).softmax(-1)[..., :-1]


@triton.jit
def softcapped(s, cap):
    """cap * tanh(s / cap), tanh written with the sigmoid (exact in fp32 to a few ulps, in every Triton version)."""
    return cap * (2.0 * tl.sigmoid(2.0 * s / cap) - 1.0)


@triton.jit
def _find_seq(cu_seqlens_ptr, tile_id, num_seqs, BLOCK_M: tl.constexpr):
    """The sequence of query tile `tile_id`: sequence b owns tiles cu[b] // BLOCK_M + b onwards (binary search)."""
    lo = 0
    hi = num_seqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        first_tile = tl.load(cu_seqlens_ptr + mid) // BLOCK_M + mid
        lo = tl.where(first_tile <= tile_id, mid, lo)
        hi = tl.where(first_tile <= tile_id, hi, mid - 1)
    return lo


@triton.jit
def _attend_segment(
    acc, l_i, m_i, q, k_ptr, v_ptr, table_ptr, n_lo, n_hi, seg_len, pos_offset, q_own, alibi_slope,
    qk_scale, stride_kb, stride_ks, offs_d, head_dim, q_pos, window, softcap,
    BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, EVEN_D: tl.constexpr, HAS_ALIBI: tl.constexpr,
    MASK_LEN: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
):
    """Online-softmax update over keys n_lo..n_hi (BLOCK_N steps) of one segment, addressed through its block table.

    MASK_LEN masks keys >= seg_len (a segment's last partial tile); CAUSAL masks own key n from the query of own
    index q_own where n > q_own (the diagonal tiles). Unmasked tiles load without any key predicate. HAS_WINDOW
    masks keys at positions (pos_offset + n) <= q_pos - window. SOFTCAP caps the (log2-domain) scores at `softcap`
    (the cap times log2(e)).
    """
    for n_start in range(n_lo, n_hi, BLOCK_N):
        offs_n = n_start + tl.arange(0, BLOCK_N)
        if MASK_LEN:
            in_seg = offs_n < seg_len
            blocks = tl.load(table_ptr + offs_n // BLOCK_SIZE, mask=in_seg, other=0)
        else:
            blocks = tl.load(table_ptr + offs_n // BLOCK_SIZE)
        rows = blocks.to(tl.int64) * stride_kb + (offs_n % BLOCK_SIZE) * stride_ks
        kv_offs = rows[:, None] + offs_d[None, :]
        if MASK_LEN:
            kv_mask = in_seg[:, None] & (offs_d[None, :] < head_dim)
            k = tl.load(k_ptr + kv_offs, mask=kv_mask, other=0.0)
            v = tl.load(v_ptr + kv_offs, mask=kv_mask, other=0.0)
        elif EVEN_D:
            k = tl.load(k_ptr + kv_offs)
            v = tl.load(v_ptr + kv_offs)
        else:
            k = tl.load(k_ptr + kv_offs, mask=offs_d[None, :] < head_dim, other=0.0)
            v = tl.load(v_ptr + kv_offs, mask=offs_d[None, :] < head_dim, other=0.0)

        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale  # log2 domain
        if SOFTCAP:
            s = softcapped(s, softcap)
        if HAS_ALIBI:
            s += alibi_slope * (pos_offset + offs_n).to(tl.float32)[None, :]
        if CAUSAL:
            s = tl.where((offs_n[None, :] <= q_own[:, None]) & in_seg[None, :], s, float("-inf"))
        elif MASK_LEN:
            s = tl.where(in_seg[None, :], s, float("-inf"))
        if HAS_WINDOW:
            s = tl.where((pos_offset + offs_n)[None, :] > (q_pos - window)[:, None], s, float("-inf"))
        # Without a window every row sees a key in its first tile (prefix key 0 or own key 0), so m_new is finite
        # from then on; with one, a row that has seen no key yet exponentiates against 0 instead of -inf.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = m_new
        if HAS_WINDOW:
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _prefill_attention_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, cu_seqlens_ptr, prefix_tables_ptr, prefix_lens_ptr, own_tables_ptr, own_starts_ptr,
    slopes_ptr, sinks_ptr, qk_scale, num_seqs, head_dim, window, softcap,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_kb, stride_ks, stride_kh, stride_pt, stride_own,
    GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
):
    tile_id = tl.program_id(0)
    head = tl.program_id(1)
    seq = _find_seq(cu_seqlens_ptr, tile_id, num_seqs, BLOCK_M)
    q_start = tl.load(cu_seqlens_ptr + seq)
    q_len = tl.load(cu_seqlens_ptr + seq + 1) - q_start
    m_start = (tile_id - q_start // BLOCK_M - seq) * BLOCK_M
    if m_start >= q_len:  # the grid over-counts tiles by up to one per sequence
        return

    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_rows = (q_start + offs_m).to(tl.int64)
    q_mask = (offs_m[:, None] < q_len) & (offs_d[None, :] < head_dim)
    q = tl.load(q_ptr + q_rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :], mask=q_mask, other=0.0)

    kv_head = (head // GROUP).to(tl.int64)
    k_ptr += kv_head * stride_kh
    v_ptr += kv_head * stride_kh
    alibi_slope = 0.0
    if HAS_ALIBI:
        alibi_slope = tl.load(slopes_ptr + head).to(tl.float32) * 1.4426950408889634  # log2(e)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if HAS_SINKS:  # the sink's logit (log2 domain) as a first key with weight 1 and no value
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + tl.load(sinks_ptr + head).to(tl.float32) * 1.4426950408889634
        l_i = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
    else:
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)

    prefix_len = tl.load(prefix_lens_ptr + seq)
    own_start = tl.load(own_starts_ptr + seq)
    q_pos = prefix_len + own_start + offs_m  # the rows' absolute positions
    # with a window: the first key position any row of the tile sees (tiles wholly before it are skipped)
    first_seen = 0
    if HAS_WINDOW:
        first_seen = tl.maximum(prefix_len + own_start + m_start - window + 1, 0)

    # Task prefix: full tiles unmasked, then the partial tail (if any) masked by length.
    prefix_table = prefix_tables_ptr + seq.to(tl.int64) * stride_pt
    prefix_full = (prefix_len // BLOCK_N) * BLOCK_N
    prefix_lo = tl.minimum((first_seen // BLOCK_N) * BLOCK_N, prefix_full)
    acc, l_i, m_i = _attend_segment(
        acc, l_i, m_i, q, k_ptr, v_ptr, prefix_table, prefix_lo, prefix_full, prefix_len, 0, offs_m, alibi_slope,
        qk_scale, stride_kb, stride_ks, offs_d, head_dim, q_pos, window, softcap,
        BLOCK_N, BLOCK_SIZE, EVEN_D, HAS_ALIBI, MASK_LEN=False, CAUSAL=False, HAS_WINDOW=HAS_WINDOW, SOFTCAP=SOFTCAP)
    acc, l_i, m_i = _attend_segment(
        acc, l_i, m_i, q, k_ptr, v_ptr, prefix_table, prefix_full, prefix_len, prefix_len, 0, offs_m, alibi_slope,
        qk_scale, stride_kb, stride_ks, offs_d, head_dim, q_pos, window, softcap,
        BLOCK_N, BLOCK_SIZE, EVEN_D, HAS_ALIBI, MASK_LEN=True, CAUSAL=False, HAS_WINDOW=HAS_WINDOW, SOFTCAP=SOFTCAP)

    # Own tokens: keys every row of the tile sees (< own index of the tile's first query + 1) unmasked, then the
    # diagonal tiles up to the last query's own index, masked causally.
    own_len = own_start + q_len
    own_table = own_tables_ptr + seq.to(tl.int64) * stride_own
    own_full = ((own_start + m_start + 1) // BLOCK_N) * BLOCK_N
    own_hi = own_start + tl.minimum(m_start + BLOCK_M, q_len)
    own_lo = tl.minimum((tl.maximum(first_seen - prefix_len, 0) // BLOCK_N) * BLOCK_N, own_full)
    acc, l_i, m_i = _attend_segment(
        acc, l_i, m_i, q, k_ptr, v_ptr, own_table, own_lo, own_full, own_len, prefix_len, offs_m, alibi_slope,
        qk_scale, stride_kb, stride_ks, offs_d, head_dim, q_pos, window, softcap,
        BLOCK_N, BLOCK_SIZE, EVEN_D, HAS_ALIBI, MASK_LEN=False, CAUSAL=False, HAS_WINDOW=HAS_WINDOW, SOFTCAP=SOFTCAP)
    acc, l_i, m_i = _attend_segment(
        acc, l_i, m_i, q, k_ptr, v_ptr, own_table, own_full, own_hi, own_len, prefix_len, own_start + offs_m,
        alibi_slope, qk_scale, stride_kb, stride_ks, offs_d, head_dim, q_pos, window, softcap,
        BLOCK_N, BLOCK_SIZE, EVEN_D, HAS_ALIBI, MASK_LEN=True, CAUSAL=True, HAS_WINDOW=HAS_WINDOW, SOFTCAP=SOFTCAP)

    if HAS_WINDOW:  # rows past the sequence's last query may see no key within the window (never stored)
        l_i = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_i[:, None]
    tl.store(o_ptr + q_rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=q_mask)


def _launch_config(head_dim: int, dtype: torch.dtype, on_gpu: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages). Small tiles under the interpreter keep its tests fast."""
    if not on_gpu:
        return 32, 16, 4, 1
    if dtype == torch.float32:
        return 32, 32, 4, 2
    if head_dim <= 64:
        return 128, 64, 4, 3
    if head_dim > 256:  # (Gemma 4's 512-wide heads: 128 x 64 tiles would need 256 KiB of shared memory)
        return 64, 32, 8, 2
    return 128, 64, 8, 2


def prefill_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cu_seqlens_q: Tensor,
    prefix_block_tables: Tensor,
    prefix_lens: Tensor,
    own_block_tables: Tensor,
    own_starts: Tensor,
    scale: float,
    alibi_slopes: Tensor | None = None,
    window: int = 0,
    softcap: float = 0.0,
    sinks: Tensor | None = None,
) -> Tensor:
    """Attention of packed queries q [T, Hq, D] over each sequence's [prefix ; own] keys in the paged pool.

    k_cache / v_cache: [num_blocks, block_size, Hkv, D], already holding this step's K/V. cu_seqlens_q: [B+1]
    int32 query offsets. prefix_block_tables [B, *] / prefix_lens [B] and own_block_tables [B, *] / own_starts [B]
    (int32) address the two segments; query i of sequence b sees every prefix key and own keys 0..own_starts[b] + i.
    alibi_slopes: [Hq] fp32 or None. window > 0: a query at position t sees only keys at positions > t - window
    (the prefix at 0..P-1, own key j at P + j). softcap > 0: each scaled score s becomes softcap * tanh(s /
    softcap) before the mask. sinks: [Hq] fp32 or None, each head's attention-sink logit (gpt-oss): exp(sink) joins
    every row's softmax denominator. Returns [T, Hq, D] in q's dtype. Metadata values are not bounds-checked.
    """
    if q.dim() != 3 or k_cache.dim() != 4:
        raise ValueError(f"q must be [T, Hq, D] and k_cache [blocks, block_size, Hkv, D], got {tuple(q.shape)}, "
                         f"{tuple(k_cache.shape)}")
    t, hq, d = q.shape
    _, block_size, hkv, _ = k_cache.shape
    if v_cache.shape != k_cache.shape or v_cache.stride() != k_cache.stride():
        raise ValueError("k_cache and v_cache must have the same shape and strides")
    if k_cache.shape[3] != d or hq % hkv:
        raise ValueError(f"q {tuple(q.shape)} does not fit the caches {tuple(k_cache.shape)} (Hq % Hkv == 0, same D)")
    if not (q.dtype == k_cache.dtype == v_cache.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q and caches must share one of fp16/bf16/fp32, got {q.dtype}, {k_cache.dtype}, "
                         f"{v_cache.dtype}")
    if block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of 2, got {block_size}")
    if q.stride(2) != 1 or k_cache.stride(3) != 1:
        raise ValueError("q and the caches must have unit stride on the head dim")
    metadata = (cu_seqlens_q, prefix_block_tables, prefix_lens, own_block_tables, own_starts)
    if any(x.dtype != torch.int32 for x in metadata):
        raise ValueError("cu_seqlens_q, block tables, prefix_lens and own_starts must be int32")
    if any(x.device != q.device for x in (k_cache, v_cache, *metadata)) or (
            alibi_slopes is not None and alibi_slopes.device != q.device):
        raise ValueError("all tensors must be on q's device")
    b = cu_seqlens_q.shape[0] - 1
    if cu_seqlens_q.dim() != 1 or b < 0 or prefix_lens.shape != (b,) or own_starts.shape != (b,):
        raise ValueError(f"cu_seqlens_q must be [B+1] and prefix_lens / own_starts [B], got "
                         f"{tuple(cu_seqlens_q.shape)}, {tuple(prefix_lens.shape)}, {tuple(own_starts.shape)}")
    for table in (prefix_block_tables, own_block_tables):
        if table.dim() != 2 or table.shape[0] != b or (table.shape[1] > 1 and table.stride(1) != 1):
            raise ValueError(f"block tables must be [B={b}, max_blocks] with unit stride on blocks")
    check_head_vector("alibi_slopes", alibi_slopes, hq, q.device)
    check_head_vector("sinks", sinks, hq, q.device)
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise ValueError(f"window must be an int >= 0 (0: none), got {window!r}")
    if not isinstance(softcap, (int, float)) or not softcap >= 0:
        raise ValueError(f"softcap must be a number >= 0 (0: none), got {softcap!r}")

    out = torch.empty_like(q)
    if t == 0:
        return out
    block_m, block_n, num_warps, num_stages = _launch_config(d, q.dtype, gpu_tiles(q))
    block_d = max(16, triton.next_power_of_2(d))
    # Sequence b's tiles are numbered from cu[b] // BLOCK_M + b, so T // BLOCK_M + B tiles cover every sequence.
    grid = (t // block_m + b, hq)
    _prefill_attention_kernel[grid](
        q, k_cache, v_cache, out, cu_seqlens_q.contiguous(),
        prefix_block_tables if prefix_block_tables.numel() else prefix_lens,  # an empty table is never read
        prefix_lens.contiguous(), own_block_tables, own_starts.contiguous(),
        alibi_slopes if alibi_slopes is not None else q,  # never read without ALiBi
        sinks if sinks is not None else q,  # never read without sinks
        scale * _LOG2E, b, d, window, float(softcap) * _LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), prefix_block_tables.stride(0), own_block_tables.stride(0),
        GROUP=hq // hkv, BLOCK_SIZE=block_size, HAS_ALIBI=alibi_slopes is not None, HAS_WINDOW=window > 0,
        SOFTCAP=softcap > 0, HAS_SINKS=sinks is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        EVEN_D=block_d == d,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


def prefill_attention_reference(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cu_seqlens_q: Tensor,
    prefix_block_tables: Tensor,
    prefix_lens: Tensor,
    own_block_tables: Tensor,
    own_starts: Tensor,
    scale: float,
    alibi_slopes: Tensor | None = None,
    window: int = 0,
    softcap: float = 0.0,
    sinks: Tensor | None = None,
) -> Tensor:
    """Plain-PyTorch `prefill_attention`: per sequence, gather [prefix ; own] keys and attend in fp32."""
    _, hq, d = q.shape
    _, block_size, hkv, _ = k_cache.shape
    out = torch.empty_like(q)
    cu = cu_seqlens_q.tolist()

    def gather(cache: Tensor, table: Tensor, length: int) -> Tensor:
        blocks = table[: -(-length // block_size)].long()
        return cache[blocks].reshape(-1, hkv, d)[:length].float()

    for b in range(len(cu) - 1):
        n = cu[b + 1] - cu[b]
        if n == 0:
            continue
        prefix_len, own_start = int(prefix_lens[b]), int(own_starts[b])
        own_len = own_start + n
        keys = torch.cat([gather(k_cache, prefix_block_tables[b], prefix_len),
                          gather(k_cache, own_block_tables[b], own_len)]).repeat_interleave(hq // hkv, dim=1)
        values = torch.cat([gather(v_cache, prefix_block_tables[b], prefix_len),
                            gather(v_cache, own_block_tables[b], own_len)]).repeat_interleave(hq // hkv, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[cu[b]: cu[b + 1]].float(), keys) * scale
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        pos = torch.arange(prefix_len + own_len, device=q.device)
        if alibi_slopes is not None:
            scores += alibi_slopes.float()[:, None, None] * pos.float()
        q_own = own_start + torch.arange(n, device=q.device)
        visible = (pos[None, :] < prefix_len) | (pos[None, :] - prefix_len <= q_own[:, None])
        if window:
            visible &= pos[None, :] > (prefix_len + q_own)[:, None] - window
        scores = scores.masked_fill(~visible, float("-inf"))
        out[cu[b]: cu[b + 1]] = torch.einsum("hqk,khd->qhd", softmax_with_sinks(scores, sinks), values).to(q.dtype)
    return out
