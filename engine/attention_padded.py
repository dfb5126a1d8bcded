"""The plain way to attend over the paged two-segment KV, what torch ships: gather [prefix ; own] of every sequence
into a padded batch (the prefix copied once per sequence) and call SDPA.

Not the engine's torch backend (that is `attention_torch.TorchPagedAttention`): the kernel benchmark's torch
baseline, and an independent check of the backend in the tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention_torch import SeqSlice, block_slots, new_token_slots, pad_block_tables, write_new_kv
from .errors import SoftPromptError
from .kv_pool import KVPool


@dataclass
class BatchMetadata:
    """Everything attention needs for one step, built with a fixed number of tensor ops whatever the batch size."""

    slot_mapping: Tensor  # [T] flat pool slot of each new token's K/V
    query_rows: Tensor  # [B, maxQ] packed row of each (seq, query) or T (padding)
    key_slots: Tensor  # [B, maxK] flat pool slot of each key (padding: 0)
    key_positions: Tensor  # [B, maxK] absolute position of each key (for ALiBi)
    query_positions: Tensor  # [B, maxQ] absolute position of each query
    mask: Tensor  # [B, 1, maxQ, maxK] True where the query may attend

    @classmethod
    def build(cls, seqs: list[SeqSlice], block_size: int, device: torch.device) -> BatchMetadata:
        """Metadata for sequences whose new tokens are packed contiguously, in order, from row 0."""
        nq = torch.tensor([s.num_queries for s in seqs])
        plen = torch.tensor([s.prefix_len for s in seqs])
        start = torch.tensor([s.own_start for s in seqs])
        prefix_tab = pad_block_tables([s.prefix_blocks for s in seqs])
        own_tab = pad_block_tables([s.own_blocks for s in seqs])
        own_len = start + nq
        max_q, max_k = int(nq.max()), int((plen + own_len).max())
        cu = torch.cumsum(nq, 0) - nq
        t = int(nq.sum())

        k = torch.arange(max_k)[None, :]
        own_idx = (k - plen[:, None]).clamp(min=0)
        is_prefix = k < plen[:, None]
        key_valid = k < (plen + own_len)[:, None]
        prefix_k = k.clamp(max=max(0, prefix_tab.shape[1] * block_size - 1)).expand(len(seqs), -1)
        key_slots = torch.where(is_prefix, block_slots(prefix_tab, prefix_k, block_size),
                                block_slots(own_tab, own_idx, block_size))
        key_slots = key_slots.masked_fill(~key_valid, 0)

        qi = torch.arange(max_q)[None, :]
        q_valid = qi < nq[:, None]
        query_rows = torch.where(q_valid, cu[:, None] + qi, torch.full_like(qi, t))
        q_own = start[:, None] + qi  # own index of each query
        visible = is_prefix[:, None, :] | (
            (~is_prefix)[:, None, :] & (own_idx[:, None, :] <= q_own[:, :, None])
        )
        visible = (visible & key_valid[:, None, :]) | ~q_valid[:, :, None]  # padding queries: any finite row

        return cls(
            slot_mapping=new_token_slots(seqs, block_size).to(device),
            query_rows=query_rows.to(device),
            key_slots=key_slots.to(device),
            key_positions=k.expand(len(seqs), -1).to(device),
            query_positions=(plen[:, None] + q_own).to(device),
            mask=visible[:, None].to(device),
        )


def group_for_padding(num_queries: list[int], max_waste: float = 2.0) -> list[list[int]]:
    """Split sequences (by index) into groups attended as one padded batch each: all single-query (decode)
    sequences together, prefill sequences by similar length so that padding at most doubles the work."""
    decode = [i for i, n in enumerate(num_queries) if n == 1]
    prefill = sorted((i for i, n in enumerate(num_queries) if n > 1), key=lambda i: num_queries[i])
    groups = [decode] if decode else []
    current: list[int] = []
    for i in prefill:
        if current and num_queries[i] * (len(current) + 1) > max_waste * sum(num_queries[j] for j in current + [i]):
            groups.append(current)
            current = []
        current.append(i)
    if current:
        groups.append(current)
    return groups


class PaddedSDPAAttention:
    """Writes the new tokens' K/V into the pool, then one padded SDPA call per group of similar sequences (see
    `group_for_padding`) over each sequence's gathered [prefix ; own] keys."""

    def __init__(self, pool: KVPool, seqs: list[SeqSlice], scale: float, alibi_slopes: Tensor | None,
                 num_heads: int, device: torch.device):
        offsets = torch.tensor([0] + [s.num_queries for s in seqs]).cumsum(0).tolist()
        self.groups: list[tuple[Tensor, _PaddedGroup]] = []
        members_of = group_for_padding([s.num_queries for s in seqs])
        for members in members_of:
            meta = BatchMetadata.build([seqs[i] for i in members], pool.block_size, device)
            rows = torch.tensor([r for i in members for r in range(offsets[i], offsets[i + 1])], device=device)
            self.groups.append((rows, _PaddedGroup(pool, meta, scale, alibi_slopes, num_heads)))
        self.pool = pool
        self.slot_mapping = new_token_slots(seqs, pool.block_size).to(device)
        self.single = len(members_of) == 1 and members_of[0] == list(range(len(seqs)))  # already in packed order

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        write_new_kv(self.pool, layer, self.slot_mapping, k, v)
        if self.single:
            return self.groups[0][1](layer, q)
        out = torch.empty_like(q)
        for rows, group in self.groups:
            out.index_copy_(0, rows, group(layer, q.index_select(0, rows)))
        return out


class _PaddedGroup:
    """One padded SDPA call over a group of sequences whose queries are packed contiguously.

    Grouped-query attention folds the query heads that share a KV head into the query axis, so K/V are
    never repeated."""

    def __init__(self, pool: KVPool, meta: BatchMetadata, scale: float, alibi_slopes: Tensor | None, num_heads: int):
        self.pool = pool
        self.meta = meta
        self.scale = scale
        if len({layer_kv.shape for layer_kv in pool.kv}) != 1:
            raise SoftPromptError("the padded gather+SDPA baseline takes a pool whose layers have one K/V shape")
        hkv = pool.kv[0].shape[3]
        self.rep = num_heads // hkv
        b, _, max_q, max_k = meta.mask.shape
        t = meta.slot_mapping.shape[0]
        # packed rows are numbered in (sequence, query) order, so the valid padded positions, in order, are rows 0..T-1
        self.padded_rows = meta.query_rows.flatten()
        self.valid_positions = torch.nonzero(self.padded_rows < t).flatten()
        self.key_slots = meta.key_slots.flatten()
        if alibi_slopes is not None:
            # slope * (key - query position): softmax ignores the per-query shift, and the values that matter
            # (recent keys) stay near 0, so the bias keeps its precision when cast to fp16/bf16
            distance = meta.key_positions[:, None, :] - meta.query_positions[:, :, None]  # [B, maxQ, maxK]
            bias = alibi_slopes.float()[None, :, None, None] * distance.float()[:, None]
            bias = bias.masked_fill(~meta.mask, float("-inf"))  # [B, Hq, maxQ, maxK]
            self.mask = bias.view(b, hkv, self.rep * max_q, max_k)
        else:
            self.mask = meta.mask.expand(b, 1, max_q, max_k).repeat(1, 1, self.rep, 1) if self.rep > 1 else meta.mask

    def __call__(self, layer: int, q: Tensor) -> Tensor:
        kv = self.pool.kv[layer]
        nb, bs, hkv, d = kv.shape[1:]
        flat_k, flat_v = kv[0].view(nb * bs, hkv, d), kv[1].view(nb * bs, hkv, d)
        b, max_q = self.meta.query_rows.shape
        max_k = self.meta.key_slots.shape[1]
        keys = flat_k.index_select(0, self.key_slots).view(b, max_k, hkv, d).transpose(1, 2)  # [B, Hkv, maxK, D]
        values = flat_v.index_select(0, self.key_slots).view(b, max_k, hkv, d).transpose(1, 2)
        if max_q == 1:  # decode: one query per sequence, nothing to pad
            padded_q = q
        else:
            padded_q = torch.cat([q, q.new_zeros(1, *q.shape[1:])]).index_select(0, self.padded_rows)
        # [B, maxQ, Hkv, rep, D] -> [B, Hkv, rep * maxQ, D]: the queries of one KV head side by side
        grouped = padded_q.view(b, max_q, hkv, self.rep, d).permute(0, 2, 3, 1, 4).reshape(b, hkv, self.rep * max_q, d)
        mask = self.mask.to(q.dtype) if self.mask.dtype != torch.bool else self.mask
        out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask, scale=self.scale)
        out = out.view(b, hkv, self.rep, max_q, d).permute(0, 3, 1, 2, 4).reshape(b * max_q, hkv * self.rep, d)
        return out if max_q == 1 else out.index_select(0, self.valid_positions)
