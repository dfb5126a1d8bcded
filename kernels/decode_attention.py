"""Decode attention over a shared task prefix (cascade / Hydragen style) with split-K flash-decoding.

Each of B sequences has one new query token; its keys are its group's prefix (shared blocks, positions 0..P-1, read
once per group) followed by its own tokens (own blocks, positions P..P+L-1, all visible). Three launches:
  1. prefix: grid (G, Hkv, prefix splits). A program stacks the queries of all the group's sequences for the
     Hq/Hkv query heads of its KV head into [BLOCK_M, D] tiles (looping over them if the group is larger) and runs
     them against its slice of the prefix with tl.dot, writing a partial (out, lse) per (seq, head, split).
  2. own: grid (B, Hkv, own splits), the same kernel over each sequence's own blocks (one sequence's query heads).
  3. merge: a small Triton kernel, grid (B, Hq), combines all partials of a (seq, head) by log-sum-exp.
Partials are fp32; lse is kept in base 2. Keys are gathered token by token through the block tables, so any block
size works and block ids need not be contiguous. A sliding window W hides keys W or more positions behind a
sequence's query: own programs split only the own keys within it; prefix programs mask per query row. A softcap C
(Gemma 2) turns each scaled score s into C * tanh(s / C) before masking. Attention sinks (gpt-oss) join the merge as
one more partial per (seq, head): lse = the head's sink logit, output 0.
"""

from __future__ import annotations

import functools
import itertools

import torch
import triton
import triton.language as tl
from torch import Tensor

from .prefill_attention import check_head_vector, softcapped, softmax_with_sinks
from .tiles import gpu_tiles

_MIN_KEYS_PER_SPLIT = 256  # the auto heuristic never gives a split fewer keys than this (per the tables' width)
_MAX_SPLITS = 16
_LOG2E = 1.4426950408889634


@triton.jit
def _partial_attention_kernel(
    q_ptr, k_ptr, v_ptr, part_out_ptr, part_lse_ptr, alibi_ptr, group_starts_ptr, lens_ptr, tables_ptr, pos0_ptr,
    qpos_ptr, stride_qb, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, stride_table,
    num_heads, total_splits, head_dim, qk_scale, window, softcap,
    OWN: tl.constexpr, SPLITS: tl.constexpr, SLOT_OFFSET: tl.constexpr, RATIO: tl.constexpr,
    HAS_ALIBI: tl.constexpr, HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Partial attention of a run of sequences' queries against one key segment's split `program_id(2)`.

    OWN: program_id(0) is a sequence, its own blocks, key positions start at pos0[seq].
    else: program_id(0) is a group, its prefix blocks, key positions start at 0.
    HAS_WINDOW: a row sees keys at positions > qpos[seq] - window (its query's position, from qpos_ptr).
    SOFTCAP: base-2 scores capped at `softcap` (the cap times log2(e)) with tanh.
    """
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    if OWN:
        seq_lo = pid
        num_rows = RATIO
    else:
        seq_lo = tl.load(group_starts_ptr + pid)
        num_rows = (tl.load(group_starts_ptr + pid + 1) - seq_lo) * RATIO
    pos0 = 0
    if HAS_ALIBI or HAS_WINDOW:
        if OWN:
            pos0 = tl.load(pos0_ptr + pid)
    kv_len = tl.load(lens_ptr + pid)
    first = 0  # the first key the splits cover: with a window, an own segment's first key within it
    if HAS_WINDOW:
        if OWN:
            first = tl.maximum(kv_len - window, 0)
    chunk = tl.cdiv(tl.cdiv(kv_len - first, SPLITS), BLOCK_N) * BLOCK_N
    k_lo = first + split * chunk
    k_hi = tl.minimum(kv_len, k_lo + chunk)
    table = tables_ptr + pid.to(tl.int64) * stride_table

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    k_head = k_ptr + kvh.to(tl.int64) * stride_kh
    v_head = v_ptr + kvh.to(tl.int64) * stride_vh
    for m0 in range(0, num_rows, BLOCK_M):
        rows = m0 + offs_m
        row_mask = rows < num_rows
        seq = (seq_lo + rows // RATIO).to(tl.int64)
        head = kvh * RATIO + rows % RATIO
        q = tl.load(q_ptr + seq[:, None] * stride_qb + head[:, None] * stride_qh + offs_d[None, :],
                    mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        if HAS_ALIBI:
            slope = tl.load(alibi_ptr + head, mask=row_mask, other=0.0) * 1.4426950408889634  # log2(e)
        if HAS_WINDOW:
            horizon = tl.load(qpos_ptr + seq, mask=row_mask, other=0) - window  # keys at or before it are hidden
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for n0 in range(k_lo, k_hi, BLOCK_N):
            keys = n0 + offs_n
            n_mask = keys < k_hi
            blk = tl.load(table + keys // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
            tok = keys % BLOCK_SIZE
            kv_mask = d_mask[:, None] & n_mask[None, :]
            k = tl.load(k_head + blk[None, :] * stride_kb + tok[None, :] * stride_kt + offs_d[:, None],
                        mask=kv_mask, other=0.0)  # [BLOCK_D, BLOCK_N]
            s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale  # base-2 logits
            if SOFTCAP:
                s = softcapped(s, softcap)
            if HAS_ALIBI:
                s += slope[:, None] * (pos0 + keys).to(tl.float32)[None, :]
            s = tl.where(n_mask[None, :], s, float("-inf"))
            if HAS_WINDOW:
                s = tl.where((pos0 + keys)[None, :] > horizon[:, None], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = m_new
            if HAS_WINDOW:  # a row that has seen no key yet exponentiates against 0 instead of -inf
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_use)
            p = tl.exp2(s - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_head + blk[:, None] * stride_vb + tok[:, None] * stride_vt + offs_d[None, :],
                        mask=n_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new
        empty = l_i == 0.0  # an empty split: lse = -inf, out = 0 (weight 0 in the merge)
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
        part = (seq * num_heads + head) * total_splits + SLOT_OFFSET + split
        tl.store(part_lse_ptr + part, lse, mask=row_mask)
        tl.store(part_out_ptr + part[:, None] * head_dim + offs_d[None, :], out,
                 mask=row_mask[:, None] & d_mask[None, :])


@triton.jit
def _merge_kernel(part_out_ptr, part_lse_ptr, out_ptr, sinks_ptr, stride_ob, stride_oh, num_heads, total_splits,
                  head_dim, HAS_SINKS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[b, h] = sum_s 2^lse_s * out_s / sum_s 2^lse_s over the (seq, head)'s partials; HAS_SINKS: the head's sink
    (lse = sink * log2(e), output 0) is one more partial."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < total_splits
    d_mask = offs_d < head_dim
    part = (b * num_heads + h) * total_splits + offs_s
    lse = tl.load(part_lse_ptr + part, mask=s_mask, other=float("-inf"))
    top = tl.max(lse, 0)
    if HAS_SINKS:
        sink = tl.load(sinks_ptr + h).to(tl.float32) * 1.4426950408889634  # log2(e)
        top = tl.maximum(top, sink)
    w = tl.exp2(lse - top)
    o = tl.load(part_out_ptr + part[:, None] * head_dim + offs_d[None, :], mask=s_mask[:, None] & d_mask[None, :],
                other=0.0)
    total = tl.sum(w, 0)
    if HAS_SINKS:
        total += tl.exp2(sink - top)
    out = tl.sum(w[:, None] * o, 0) / total
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty), mask=d_mask)


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _auto_splits(num_programs: int, max_keys: int, device: torch.device) -> int:
    """Enough splits for ~2 programs per SM, but no split shorter than _MIN_KEYS_PER_SPLIT keys."""
    want = triton.cdiv(2 * _num_sms(device), max(num_programs, 1))
    return max(1, min(want, triton.cdiv(max_keys, _MIN_KEYS_PER_SPLIT), _MAX_SPLITS))


def _check_inputs(q, k_cache, v_cache, group_starts, group_prefix_block_tables, group_prefix_lens,
                  own_block_tables, own_lens, alibi_slopes, num_splits, sinks=None) -> None:
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"q must be [B, Hq, D] and k/v caches equal [blocks, block_size, Hkv, D], got "
                         f"{tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    b, hq, d = q.shape
    hkv = k_cache.shape[2]
    if k_cache.shape[3] != d or hq % hkv:
        raise ValueError(f"head dims must match and Hq ({hq}) be a multiple of Hkv ({hkv})")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or not q.dtype == k_cache.dtype == v_cache.dtype:
        raise ValueError(f"q, k_cache, v_cache must share one of fp16/bf16/fp32, got "
                         f"{q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("q, k_cache and v_cache must have unit stride on the head dim")
    g = group_starts.shape[0] - 1
    meta = {"group_starts": (group_starts, 1), "group_prefix_block_tables": (group_prefix_block_tables, 2),
            "group_prefix_lens": (group_prefix_lens, 1), "own_block_tables": (own_block_tables, 2),
            "own_lens": (own_lens, 1)}
    for name, (t, dims) in meta.items():
        if t.dtype != torch.int32 or t.dim() != dims:
            raise ValueError(f"{name} must be a {dims}-D int32 tensor, got {t.dtype} {tuple(t.shape)}")
    if g < 1 or group_prefix_block_tables.shape[0] != g or group_prefix_lens.shape[0] != g:
        raise ValueError(f"group_starts [G+1] with G >= 1, group tables [G, *] and group lens [G] disagree: "
                         f"{tuple(group_starts.shape)}, {tuple(group_prefix_block_tables.shape)}, "
                         f"{tuple(group_prefix_lens.shape)}")
    if own_block_tables.shape[0] != b or own_lens.shape[0] != b or own_block_tables.shape[1] < 1:
        raise ValueError(f"own_block_tables must be [{b}, >=1] and own_lens [{b}]")
    check_head_vector("alibi_slopes", alibi_slopes, hq, q.device)
    check_head_vector("sinks", sinks, hq, q.device)
    tensors = [k_cache, v_cache, *(t for t, _ in meta.values())]
    if any(t.device != q.device for t in tensors):
        raise ValueError("all tensors must be on q's device")
    if num_splits is not None and (not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"num_splits must be a positive int or None, got {num_splits!r}")


def decode_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    group_starts: Tensor,
    group_prefix_block_tables: Tensor,
    group_prefix_lens: Tensor,
    own_block_tables: Tensor,
    own_lens: Tensor,
    scale: float,
    alibi_slopes: Tensor | None = None,
    num_splits: int | None = None,
    prefix_block_m: int | None = None,
    window: int = 0,
    softcap: float = 0.0,
    sinks: Tensor | None = None,
) -> Tensor:
    """Attention of one query per sequence over [group prefix ; own tokens] -> [B, Hq, D] in q's dtype.

    q [B, Hq, D] holds each group's sequences contiguously (see `group_by_prefix`); sequences
    group_starts[g]..group_starts[g+1]-1 share the prefix group_prefix_block_tables[g][:group_prefix_lens[g]].
    own_lens (>= 1, counting the current token) are all visible. ALiBi adds slope[h] * absolute key position.
    num_splits splits both key segments (None: per segment, from the SM count and the tables' widths; no host sync).
    prefix_block_m: query rows per tile of a prefix program (a power of two in 16..64; None: from the mean group
    size B/G, which a padded batch with empty groups understates, as in a CUDA-graph decode step).
    window > 0: a sequence's query (at position P + own_len - 1) sees only keys at positions > its own - window.
    softcap > 0: each scaled score s becomes softcap * tanh(s / softcap) before the mask (Gemma 2).
    sinks: [Hq] fp32 or None, each head's attention-sink logit (gpt-oss), in every row's softmax denominator.
    Metadata values (lens within the tables, valid block ids, group_starts covering 0..B) are not checked.
    """
    if prefix_block_m is not None and prefix_block_m not in (16, 32, 64):
        raise ValueError(f"prefix_block_m must be 16, 32 or 64, got {prefix_block_m!r}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise ValueError(f"window must be an int >= 0 (0: none), got {window!r}")
    if not isinstance(softcap, (int, float)) or not softcap >= 0:
        raise ValueError(f"softcap must be a number >= 0 (0: none), got {softcap!r}")
    _check_inputs(q, k_cache, v_cache, group_starts, group_prefix_block_tables, group_prefix_lens,
                  own_block_tables, own_lens, alibi_slopes, num_splits, sinks)
    b, hq, d = q.shape
    _, block_size, hkv, _ = k_cache.shape
    g = group_starts.shape[0] - 1
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if b == 0:
        return out
    ratio = hq // hkv
    max_prefix_keys = group_prefix_block_tables.shape[1] * block_size
    prefix_splits = (num_splits or _auto_splits(g * hkv, max_prefix_keys, q.device)) if max_prefix_keys else 0
    own_splits = num_splits or _auto_splits(b * hkv, own_block_tables.shape[1] * block_size, q.device)
    total = prefix_splits + own_splits
    part_out = torch.empty(b, hq, total, d, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(b, hq, total, dtype=torch.float32, device=q.device)

    pos0 = qpos = own_lens  # never read without ALiBi or a window
    if alibi_slopes is not None or window:
        pos0 = torch.repeat_interleave(group_prefix_lens, group_starts.diff(), output_size=b)
    if window:
        qpos = pos0 + own_lens - 1  # each sequence's query position
    alibi = alibi_slopes if alibi_slopes is not None else part_lse  # never read without ALiBi
    block_d = triton.next_power_of_2(d)
    # CUDA: 64 keys per tile while a K/V tile row is <= 256 bytes (shared memory for pipelined K/V tiles), else 32.
    # The interpreter (CPU) uses 16 so that the tiny test shapes span several key tiles.
    block_n = (64 if q.element_size() * block_d <= 256 else 32) if gpu_tiles(q) else 16
    common = dict(
        stride_qb=q.stride(0), stride_qh=q.stride(1), stride_kb=k_cache.stride(0), stride_kt=k_cache.stride(1),
        stride_kh=k_cache.stride(2), stride_vb=v_cache.stride(0), stride_vt=v_cache.stride(1),
        stride_vh=v_cache.stride(2), num_heads=hq, total_splits=total, head_dim=d, qk_scale=scale * _LOG2E,
        window=window, softcap=float(softcap) * _LOG2E, qpos_ptr=qpos, RATIO=ratio,
        HAS_ALIBI=alibi_slopes is not None, HAS_WINDOW=window > 0, SOFTCAP=softcap > 0,
        BLOCK_SIZE=block_size, BLOCK_N=block_n, BLOCK_D=block_d,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=4,
    )
    if prefix_splits:
        tables = group_prefix_block_tables.contiguous()
        rows_per_group = ratio * triton.cdiv(b, g)  # mean group size: known without a host sync
        _partial_attention_kernel[(g, hkv, prefix_splits)](
            q, k_cache, v_cache, part_out, part_lse, alibi, group_starts.contiguous(), group_prefix_lens.contiguous(),
            tables, pos0, stride_table=tables.stride(0), OWN=False, SPLITS=prefix_splits, SLOT_OFFSET=0,
            BLOCK_M=prefix_block_m or min(64, max(16, triton.next_power_of_2(rows_per_group))), **common,
        )
    tables = own_block_tables.contiguous()
    _partial_attention_kernel[(b, hkv, own_splits)](
        q, k_cache, v_cache, part_out, part_lse, alibi, group_starts, own_lens.contiguous(), tables, pos0,
        stride_table=tables.stride(0), OWN=True, SPLITS=own_splits, SLOT_OFFSET=prefix_splits,
        BLOCK_M=min(64, max(16, triton.next_power_of_2(ratio))), **common,
    )
    _merge_kernel[(b, hq)](
        part_out, part_lse, out, sinks if sinks is not None else part_lse, out.stride(0), out.stride(1), hq, total, d,
        HAS_SINKS=sinks is not None, BLOCK_S=triton.next_power_of_2(total), BLOCK_D=block_d,
        num_warps=4 if block_d >= 128 else 2,
    )
    return out


def decode_attention_reference(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    group_starts: Tensor,
    group_prefix_block_tables: Tensor,
    group_prefix_lens: Tensor,
    own_block_tables: Tensor,
    own_lens: Tensor,
    scale: float,
    alibi_slopes: Tensor | None = None,
    num_splits: int | None = None,
    prefix_block_m: int | None = None,
    window: int = 0,
    softcap: float = 0.0,
    sinks: Tensor | None = None,
) -> Tensor:
    """Plain-PyTorch `decode_attention`, one sequence at a time in fp32 (num_splits, prefix_block_m ignored)."""
    _check_inputs(q, k_cache, v_cache, group_starts, group_prefix_block_tables, group_prefix_lens,
                  own_block_tables, own_lens, alibi_slopes, num_splits, sinks)
    block_size, hkv = k_cache.shape[1], k_cache.shape[2]
    ratio = q.shape[1] // hkv
    out = torch.empty_like(q)
    starts = group_starts.tolist()

    def gather(cache: Tensor, table: Tensor, n: int) -> Tensor:
        idx = torch.arange(n, device=cache.device)
        return cache[table[idx // block_size].long(), idx % block_size].float()  # [n, Hkv, D]

    for grp, (lo, hi) in enumerate(itertools.pairwise(starts)):
        p = int(group_prefix_lens[grp])
        pre_k = gather(k_cache, group_prefix_block_tables[grp], p)
        pre_v = gather(v_cache, group_prefix_block_tables[grp], p)
        for s in range(lo, hi):
            n = int(own_lens[s])
            keys = torch.cat([pre_k, gather(k_cache, own_block_tables[s], n)]).repeat_interleave(ratio, dim=1)
            values = torch.cat([pre_v, gather(v_cache, own_block_tables[s], n)]).repeat_interleave(ratio, dim=1)
            scores = torch.einsum("hd,nhd->hn", q[s].float(), keys) * scale
            if softcap:
                scores = torch.tanh(scores / softcap) * softcap
            if alibi_slopes is not None:
                scores = scores + alibi_slopes[:, None] * torch.arange(p + n, device=q.device, dtype=torch.float32)
            if window:
                hidden = torch.arange(p + n, device=q.device) <= p + n - 1 - window
                scores = scores.masked_fill(hidden[None, :], float("-inf"))
            out[s] = torch.einsum("hn,nhd->hd", softmax_with_sinks(scores, sinks), values).to(q.dtype)
    return out


def group_by_prefix(prefix_ids: list) -> tuple[list[int], list[int]]:
    """(perm, group_starts): perm[i] is the original index of the i-th sequence once sequences sharing a prefix id
    are contiguous (groups in order of first appearance, stable within a group); group g is perm[starts[g]:starts[g+1]].

    Ids are any hashables (e.g. a task id, or None for sequences without a prefix). Gather q and the per-sequence
    metadata with perm, and scatter the output back with it; group g's prefix is that of prefix_ids[perm[starts[g]]].
    """
    members: dict = {}
    for i, pid in enumerate(prefix_ids):
        members.setdefault(pid, []).append(i)
    perm = [i for group in members.values() for i in group]
    starts = [0, *itertools.accumulate(len(group) for group in members.values())]
    return perm, starts
