"""Paged two-segment attention in plain PyTorch (the `torch` backend, CPU and CUDA).

Each sequence's keys are its task prefix (shared blocks, length P, fully visible) followed by its own tokens
(own blocks, causal). This backend attends the sequences that share a prefix together, reading the prefix once
for all of them (see `TorchPagedAttention`); the Triton backend reads the same metadata (`SeqSlice`) in place.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from .indices import index_tensor
from .kv_pool import KVPool


@dataclass
class SeqSlice:
    """One sequence's part of a packed batch."""

    num_queries: int  # new tokens this step
    prefix_blocks: list[int]
    prefix_len: int
    own_blocks: list[int]
    own_start: int  # own index of the first new token (= tokens already in the pool)


def pad_block_tables(tables: list[list[int]], dtype: torch.dtype = torch.long,
                     device: torch.device | None = None) -> Tensor:
    """Block tables as one [B, max blocks] tensor, padded with block 0 (never read past a sequence's length)."""
    width = max(1, max(len(t) for t in tables))
    flat: list[int] = []
    for t in tables:
        flat += t + [0] * (width - len(t))
    return index_tensor(flat, device, dtype).view(len(tables), width)


def block_slots(table: Tensor, idx: Tensor, block_size: int) -> Tensor:
    """Flat pool slots of token indices idx [B, N] (>= 0) within the segments addressed by table [B, blocks]."""
    blocks = table.gather(1, (idx // block_size).clamp(max=table.shape[1] - 1))
    return blocks * block_size + idx % block_size


def write_new_kv(pool: KVPool, layer: int, slot_mapping: Tensor, k: Tensor, v: Tensor) -> None:
    """The new tokens' K/V [T, Hkv, D] into their pool slots (`new_token_slots`) of `layer`."""
    kv = pool.kv[layer]
    nb, bs, hkv, d = kv.shape[1:]
    kv[0].view(nb * bs, hkv, d).index_copy_(0, slot_mapping, k)
    kv[1].view(nb * bs, hkv, d).index_copy_(0, slot_mapping, v)


def new_token_slots(seqs: list[SeqSlice], block_size: int) -> Tensor:
    """Flat pool slot [T] of each new token, in packed order: own index own_start + i in its own blocks."""
    return index_tensor([s.own_blocks[i // block_size] * block_size + i % block_size
                         for s in seqs for i in range(s.own_start, s.own_start + s.num_queries)])


@dataclass(frozen=True)
class Packing:
    """How far sequences are packed together into one padded attention row, and items into one call."""

    max_waste: float  # an item's (a call's) padded work, query rows x keys, is at most this multiple of what it needs
    slack: int  # a member joins an item even if that costs up to this much more work (rows x keys) than apart


# Tuned on C1's captured decode and prefill calls, replayed in turn on a CPU. Decode rows (one query per sequence)
# cost little next to a call's fixed cost, so they pack more. Prefill rows are work, so they pack only where the
# shared prefix saves some. One setting for both, (2.5, 4096), was about 1.4x slower on each.
DECODE_PACKING = Packing(4.0, 8192)
PREFILL_PACKING = Packing(1.25, 0)


@dataclass
class _Item:
    """Sequences sharing one prefix, attended as one padded row of a batched SDPA call: their queries against the
    keys [prefix blocks | 1st member's own blocks | 2nd member's own blocks | ...], each member seeing the prefix
    and, causally, only its own tokens."""

    prefix_len: int
    blocks: list[int]
    packing: Packing
    rows: list[int] = field(default_factory=list)  # packed query rows of all members
    own_offsets: list[int] = field(default_factory=list)  # per row: its member's first own key in the item
    own_limits: list[int] = field(default_factory=list)  # per row: the last own key it sees (own index)
    work: int = 0  # what the members need: their query rows x (prefix + own keys)

    def add(self, s: SeqSlice, first_row: int, block_size: int) -> None:
        offset = len(self.blocks) * block_size
        self.blocks += s.own_blocks[:_blocks(s.own_start + s.num_queries, block_size)]
        self.rows += range(first_row, first_row + s.num_queries)
        self.own_offsets += [offset] * s.num_queries
        self.own_limits += range(s.own_start, s.own_start + s.num_queries)
        self.work += _need(s)

    def takes(self, s: SeqSlice, prefix_blocks: int, block_size: int) -> bool:
        """Whether `s` should join: padded work bounded by `max_waste`, and at most `slack` more than apart."""
        own_blocks = _blocks(s.own_start + s.num_queries, block_size)
        packed = (len(self.rows) + s.num_queries) * (len(self.blocks) + own_blocks) * block_size
        apart = (len(self.rows) * len(self.blocks) + s.num_queries * (prefix_blocks + own_blocks)) * block_size
        return packed <= self.packing.max_waste * (self.work + _need(s)) and packed <= apart + self.packing.slack


def _blocks(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def _need(s: SeqSlice) -> int:
    """The attention work a sequence needs: its query rows x (prefix + own keys)."""
    return s.num_queries * (s.prefix_len + s.own_start + s.num_queries)


def _items(seqs: list[SeqSlice], block_size: int) -> list[_Item]:
    """Sequences grouped by prefix (those without one form a group too) and by decode vs prefill, each group cut
    greedily into items (see `_Item.takes`): a prefix read once for several sequences, and fewer, larger attention
    calls."""
    groups: dict[tuple, list[tuple[SeqSlice, int]]] = {}
    row = 0
    for s in seqs:
        if s.num_queries:
            key = (tuple(s.prefix_blocks[:_blocks(s.prefix_len, block_size)]), s.prefix_len, s.num_queries == 1)
            groups.setdefault(key, []).append((s, row))
        row += s.num_queries
    items = []
    for (prefix_blocks, prefix_len, decode), members in groups.items():
        packing = DECODE_PACKING if decode else PREFILL_PACKING
        item = None
        for s, first_row in members:
            if item is None or not item.takes(s, len(prefix_blocks), block_size):
                item = _Item(prefix_len, list(prefix_blocks), packing)
                items.append(item)
            item.add(s, first_row, block_size)
    return items


def _calls(items: list[_Item], block_size: int) -> list[list[_Item]]:
    """Items cut into batched calls (decode and prefill items apart), in order of size, each padded to its largest
    item's rows and keys: a call grows while its padded work stays within `max_waste` x its items' (plus `slack`
    per item)."""
    calls: list[list[_Item]] = []
    rows = keys = work = 0
    for item in sorted(items, key=lambda it: (it.packing is PREFILL_PACKING, len(it.rows), len(it.blocks))):
        packing = item.packing
        own = len(item.rows) * len(item.blocks) * block_size + packing.slack
        r, k = max(rows, len(item.rows)), max(keys, len(item.blocks) * block_size)
        w = work + own
        if calls and calls[-1][0].packing is packing and (len(calls[-1]) + 1) * r * k <= packing.max_waste * w:
            calls[-1].append(item)
            rows, keys, work = r, k, w
        else:
            calls.append([item])
            rows, keys, work = len(item.rows), len(item.blocks) * block_size, own
    return calls


class _PaddedCall:
    """One SDPA call over items padded to the most rows and the most keys among them."""

    def __init__(self, items: list[_Item], block_size: int, num_rows: int, slopes: Tensor | None,
                 dtype: torch.dtype, device: torch.device):
        n, m = len(items), max(len(it.rows) for it in items)
        width = max(len(it.blocks) for it in items)
        self.shape = (n, m)
        # one host-to-tensor copy of all the call's indices, cut into views. Padding rows read row num_rows (zeros)
        # and see key 0 at least (a prefix key, or the first member's first).
        flat: list[int] = []
        for it in items:
            flat += it.rows + [num_rows] * (m - len(it.rows))
        for it in items:
            flat += it.blocks + [0] * (width - len(it.blocks))
        for it in items:
            flat += it.own_offsets + [0] * (m - len(it.own_offsets))
        for it in items:
            flat += it.own_limits + [0] * (m - len(it.own_limits))
        flat += [it.prefix_len for it in items]
        flat += [len(it.rows) for it in items]
        query_rows, block_table, offset, limit, prefix, counts = index_tensor(flat, device).split(
            [n * m, n * width, n * m, n * m, n, n])
        self.query_rows, self.block_table = query_rows, block_table
        prefix, offset, limit = prefix[:, None, None], offset.view(n, m, 1), limit.view(n, m, 1)
        key = torch.arange(width * block_size, device=device)
        own = key - offset  # own index of each key in the row's member segment
        self._visible = (key < prefix) | ((own >= 0) & (own <= limit))  # [N, M, L]
        self._parts = key, prefix, own, limit, counts  # for the query - key distances, built when first needed
        self._back: Tensor | None = None
        self._slopes, self._dtype = slopes, dtype
        self._biases: dict[tuple[int, int], Tensor] = {}
        self.rows = [r for it in items for r in it.rows]
        self.valid = (None if all(len(it.rows) == m for it in items) else
                      index_tensor([i * m + j for i, it in enumerate(items) for j in range(len(it.rows))], device))

    def back(self) -> Tensor:
        """Query position - key position [N, M, L] (the prefix at 0..P-1, own key j at P + j, a row's query at
        P + its own index)."""
        if self._back is None:
            key, prefix, own, limit, _ = self._parts
            self._back = limit - torch.where(key < prefix, key - prefix, own)
        return self._back

    def bias_for(self, window: int, rep: int) -> Tensor:
        """The SDPA mask (+ ALiBi) [N, Hkv or 1, rep * M, L], for a layer with this sliding window (0: none) and
        this many query heads per K/V head (a layer's own, where the layers differ: Gemma 4)."""
        if (window, rep) not in self._biases:
            n, m = self.shape
            visible = self._visible
            if window:  # a padding row keeps key 0 in sight, so that no row is empty
                key, _, _, _, counts = self._parts
                padding_row = torch.arange(m, device=key.device)[None, :, None] >= counts[:, None, None]
                visible = visible & (self.back() < window) | (padding_row & (key == 0))
            bias = torch.zeros(visible.shape, device=visible.device).masked_fill_(~visible, float("-inf"))
            if self._slopes is None:  # [N, 1, rep * M, L]: a KV head's query rows ordered (rep, M)
                bias = bias[:, None, None].expand(-1, 1, rep, -1, -1)
            else:  # slope * (key position - query position): softmax ignores the per-row shift
                bias = self._slopes[None, :, :, None, None] * -self.back()[:, None, None].float() + bias[:, None, None]
            self._biases[window, rep] = bias.reshape(n, -1, rep * m, bias.shape[-1]).to(self._dtype)
        return self._biases[window, rep]

    def __call__(self, k_cache: Tensor, v_cache: Tensor, q_padded: Tensor, scale: float, window: int = 0,
                 softcap: float = 0.0, sinks: Tensor | None = None) -> Tensor:
        """The outputs [rows, Hq, D] of the call's query rows, in `self.rows` order (`window`: the layer's sliding
        window, 0 for none; `softcap` > 0: scores become softcap * tanh(score / softcap) before the mask; `sinks`
        [Hq] (gpt-oss): each head's sink logit joins every row's softmax denominator. SDPA can do neither, so those
        layers attend in plain ops as HF's eager attention does)."""
        n, m = self.shape
        hkv, d = k_cache.shape[2:]
        rep = q_padded.shape[1] // hkv
        q = q_padded.index_select(0, self.query_rows).view(n, m, hkv, rep, d).permute(0, 2, 3, 1, 4)
        keys = k_cache.index_select(0, self.block_table).view(n, -1, hkv, d).transpose(1, 2)
        values = v_cache.index_select(0, self.block_table).view(n, -1, hkv, d).transpose(1, 2)
        q = q.reshape(n, hkv, rep * m, d)
        if softcap or sinks is not None:
            scores = q @ keys.transpose(-1, -2)
            scores = (torch.tanh(scores * (scale / softcap)) * softcap if softcap else scores * scale) \
                + self.bias_for(window, rep)
            if sinks is None:
                probs = scores.softmax(-1, dtype=torch.float32)
            else:  # a last column of each head's sink logit (its rows ordered (rep, M) within a KV head), dropped
                column = sinks.view(1, hkv, rep, 1, 1).expand(n, -1, -1, m, 1).reshape(n, hkv, rep * m, 1)
                probs = torch.cat([scores.float(), column], dim=-1).softmax(-1)[..., :-1]
            out = probs.to(q.dtype) @ values
        else:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=self.bias_for(window, rep), scale=scale)
        out = out.view(n, hkv, rep, m, d).permute(0, 3, 1, 2, 4).reshape(n * m, hkv * rep, d)
        return out if self.valid is None else out.index_select(0, self.valid)


class TorchPagedAttention:
    """The torch backend: writes the new tokens' K/V into the pool, then attends with few, dense SDPA calls.

    Sequences that share a task prefix are attended together (`_items`): one row of the batched call holds the
    prefix once and each member's own tokens after it, under a mask that shows every member the prefix and,
    causally, only its own tokens. So a task's prefix K/V is gathered once per item, not once per sequence, and
    the many small per-sequence attentions of a decode step become a few larger ones. K/V are gathered by whole
    blocks (contiguous in the pool). Items of similar size share a call (`_calls`). All metadata is
    built once per step and shared by every layer."""

    def __init__(self, pool: KVPool, seqs: list[SeqSlice], scale: float, alibi_slopes: Tensor | None,
                 num_heads: int, device: torch.device, windows: tuple[int, ...] = (), softcap: float = 0.0,
                 sinks: Tensor | None = None):
        """`windows[layer]`: that layer's sliding window (queries see keys less than that many positions back);
        `softcap` > 0: attention scores become softcap * tanh(score / softcap) (Gemma 2); `sinks[layer]` [Hq]:
        that layer's attention-sink logits (gpt-oss; `CausalLM.attention_sinks`)."""
        self.pool = pool
        self.scale = scale
        self.windows = windows
        self.softcap = softcap
        self.sinks = sinks
        bs = pool.block_size
        slopes = None
        if alibi_slopes is not None:  # by K/V head (ALiBi's models' layers are alike)
            hkv = pool.kv[0].shape[3]
            slopes = alibi_slopes.float().to(device).view(hkv, num_heads // hkv)
        num_rows = sum(s.num_queries for s in seqs)
        self.slot_mapping = new_token_slots(seqs, bs).to(device)
        self.calls = [_PaddedCall(items, bs, num_rows, slopes, pool.kv[0].dtype, device)
                      for items in _calls(_items(seqs, bs), bs)]
        produced = [r for call in self.calls for r in call.rows]
        self.order = None
        if produced != list(range(num_rows)):
            where = [0] * num_rows
            for i, r in enumerate(produced):
                where[r] = i
            self.order = index_tensor(where, device)

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        write_new_kv(self.pool, layer, self.slot_mapping, k, v)
        kv = self.pool.kv[layer]
        if not self.calls:
            return torch.empty_like(q)
        q_padded = torch.cat([q, q.new_zeros(1, *q.shape[1:])])
        window = self.windows[layer] if layer < len(self.windows) else 0
        sinks = None if self.sinks is None else self.sinks[layer]
        parts = [call(kv[0], kv[1], q_padded, self.scale, window, self.softcap, sinks) for call in self.calls]
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
        return out if self.order is None else out.index_select(0, self.order)
