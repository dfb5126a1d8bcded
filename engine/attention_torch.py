"""Paged two-segment attention in plain PyTorch (the `torch` backend, CPU and CUDA).

Each sequence's keys are its task prefix (shared blocks, length P, fully visible) followed by its own tokens
(own blocks, causal). This backend gathers both segments into a padded batch and calls SDPA; the Triton
backend reads the same metadata in place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .kv_pool import KVPool


@dataclass
class SeqSlice:
    """One sequence's part of a packed batch."""

    num_queries: int  # new tokens this step
    prefix_blocks: list[int]
    prefix_len: int
    own_blocks: list[int]
    own_start: int  # own index of the first new token (= tokens already in the pool)


@dataclass
class BatchMetadata:
    seqs: list[SeqSlice]
    slot_mapping: Tensor  # [T] flat pool slot of each new token's K/V
    query_rows: Tensor  # [B, maxQ] packed row of each (seq, query) or T (padding)
    key_slots: Tensor  # [B, maxK] flat pool slot of each key (padding: 0)
    key_positions: Tensor  # [B, maxK] absolute position of each key (for ALiBi)
    mask: Tensor  # [B, 1, maxQ, maxK] True where the query may attend

    @classmethod
    def build(cls, seqs: list[SeqSlice], block_size: int, device: torch.device) -> BatchMetadata:
        slots, rows, key_slots, key_pos, masks = [], [], [], [], []
        max_q = max(s.num_queries for s in seqs)
        max_k = max(s.prefix_len + s.own_start + s.num_queries for s in seqs)
        t = sum(s.num_queries for s in seqs)
        row = 0
        for s in seqs:
            own_len = s.own_start + s.num_queries
            own = torch.arange(own_len)
            own_slots = torch.tensor(s.own_blocks, dtype=torch.long)[own // block_size] * block_size + own % block_size
            pre = torch.arange(s.prefix_len)
            pre_slots = torch.tensor(s.prefix_blocks, dtype=torch.long)[pre // block_size] * block_size + pre % block_size
            slots.append(own_slots[s.own_start:])
            r = torch.full((max_q,), t, dtype=torch.long)
            r[: s.num_queries] = torch.arange(row, row + s.num_queries)
            rows.append(r)
            row += s.num_queries
            k = torch.zeros(max_k, dtype=torch.long)
            k[: s.prefix_len] = pre_slots
            k[s.prefix_len: s.prefix_len + own_len] = own_slots
            key_slots.append(k)
            key_pos.append(torch.arange(max_k))
            q_own = s.own_start + torch.arange(max_q)  # own index of each query
            k_idx = torch.arange(max_k)
            visible = (k_idx[None, :] < s.prefix_len) | (
                (k_idx[None, :] >= s.prefix_len) & (k_idx[None, :] - s.prefix_len <= q_own[:, None])
            )
            visible &= (k_idx < s.prefix_len + own_len)[None, :]
            visible[s.num_queries:] = True  # padding queries: any finite row, discarded afterwards
            masks.append(visible)
        return cls(
            seqs=seqs,
            slot_mapping=torch.cat(slots).to(device),
            query_rows=torch.stack(rows).to(device),
            key_slots=torch.stack(key_slots).to(device),
            key_positions=torch.stack(key_pos).to(device),
            mask=torch.stack(masks)[:, None].to(device),
        )


class TorchPagedAttention:
    """Writes the new tokens' K/V into the pool, then attends over [prefix ; own] per sequence."""

    def __init__(self, pool: KVPool, meta: BatchMetadata, scale: float, alibi_slopes: Tensor | None):
        self.pool = pool
        self.meta = meta
        self.scale = scale
        self.bias = None
        if alibi_slopes is not None:
            bias = alibi_slopes.float()[None, :, None, None] * meta.key_positions.float()[:, None, None, :]
            self.bias = bias.masked_fill(~meta.mask, float("-inf"))  # [B, H, maxQ, maxK]

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        kv = self.pool.kv[layer]
        nb, bs, hkv, d = kv.shape[1:]
        flat_k, flat_v = kv[0].view(nb * bs, hkv, d), kv[1].view(nb * bs, hkv, d)
        flat_k[self.meta.slot_mapping] = k
        flat_v[self.meta.slot_mapping] = v
        keys = flat_k[self.meta.key_slots].transpose(1, 2)  # [B, Hkv, maxK, D]
        values = flat_v[self.meta.key_slots].transpose(1, 2)
        padded_q = torch.cat([q, q.new_zeros(1, *q.shape[1:])])[self.meta.query_rows].transpose(1, 2)  # [B,Hq,maxQ,D]
        rep = q.shape[1] // hkv
        if rep > 1:
            keys, values = keys.repeat_interleave(rep, dim=1), values.repeat_interleave(rep, dim=1)
        mask = self.bias.to(q.dtype) if self.bias is not None else self.meta.mask
        out = F.scaled_dot_product_attention(padded_q, keys, values, attn_mask=mask, scale=self.scale)
        out = out.transpose(1, 2)  # [B, maxQ, Hq, D]
        valid = self.meta.query_rows < q.shape[0]
        result = torch.empty_like(q)
        result[self.meta.query_rows[valid]] = out[valid]
        return result
