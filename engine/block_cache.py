"""Request-token prefix caching (vLLM's automatic prefix caching): the K/V of a full block of own tokens is kept
after its request lets go, and a later request of the same task whose tokens begin the same way reuses it.

A cached block is named by its tokens and the block before it (exact keys, no hash to collide): the first block of
a sequence by its task prefix (`SoftPrompt.key`, or none), each later one by the cache entry of the block before.
Blocks are shared read-only and refcounted; an idle one (no request holds it) stays cached until the pool needs
its room, least recently used first, a request's later blocks before its earlier ones.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass

from .kv_pool import KVPool
from .sequence import Sequence


@dataclass(eq=False)
class CachedBlock:
    block: int  # the pool block holding the K/V
    key: tuple  # (the entry before's serial, or the task prefix key; the block's tokens)
    serial: int  # this entry's name as the parent of the next block's entry (block ids are reused, serials never)
    refcount: int = 0


@dataclass
class BlockCacheStats:
    queried_tokens: int = 0  # tokens of admitted requests that could have been found
    hit_tokens: int = 0  # of those, the ones whose K/V were found (not computed)
    evictions: int = 0


class BlockCache:
    def __init__(self, pool: KVPool):
        self.pool = pool
        self._by_key: dict[tuple, CachedBlock] = {}
        self._by_block: dict[int, CachedBlock] = {}
        self._idle: OrderedDict[int, CachedBlock] = OrderedDict()  # block id -> entry; least recently used first
        self._serials = itertools.count(1)
        self.stats = BlockCacheStats()

    @property
    def num_cached(self) -> int:
        return len(self._by_block)

    @property
    def num_idle(self) -> int:
        return len(self._idle)

    def _root(self, seq: Sequence) -> str:
        return "" if seq.prompt is None else seq.prompt.key

    def match(self, seq: Sequence) -> None:
        """Give a sequence about to be admitted (no blocks yet) the cached blocks its tokens begin with, held, and
        count them computed. One token is always left to compute (its row gives the next token's logits)."""
        size = self.pool.block_size
        tokens = seq.tokens
        parent: object = self._root(seq)
        for i in range((len(tokens) - 1) // size):
            entry = self._by_key.get((parent, tuple(tokens[i * size:(i + 1) * size])))
            if entry is None:
                break
            if entry.refcount == 0:
                del self._idle[entry.block]
            entry.refcount += 1
            seq.blocks.append(entry.block)
            seq.cached_serials.append(entry.serial)
            parent = entry.serial
        seq.num_computed = len(seq.blocks) * size

    def next_key(self, seq: Sequence, num_tokens: int) -> tuple | None:
        """The key of the sequence's first block not yet cached, if its first `num_tokens` tokens fill it."""
        size, cached = self.pool.block_size, len(seq.cached_serials)
        if (cached + 1) * size > num_tokens:
            return None
        parent = seq.cached_serials[-1] if seq.cached_serials else self._root(seq)
        return parent, tuple(seq.token_slice(cached * size, size))

    def count_admitted(self, seq: Sequence) -> None:
        self.stats.queried_tokens += seq.num_tokens
        self.stats.hit_tokens += seq.num_computed
        if seq.num_cached_tokens is None:  # its first admission (not a return after preemption)
            seq.num_cached_tokens = seq.num_computed

    def register(self, seq: Sequence) -> None:
        """Cache the sequence's blocks that its computed tokens fill and that are not cached yet. Where the same
        tokens are cached already (another request computed them at the same time), the sequence keeps its own
        block private and the chain goes on from the cached entry."""
        size = self.pool.block_size
        first, full = len(seq.cached_serials), seq.num_computed // size
        tokens = seq.token_slice(first * size, (full - first) * size)
        for i in range(first, full):
            parent = seq.cached_serials[-1] if seq.cached_serials else self._root(seq)
            key = (parent, tuple(tokens[(i - first) * size:(i - first + 1) * size]))
            entry = self._by_key.get(key)
            if entry is None:
                entry = CachedBlock(seq.blocks[i], key, next(self._serials), refcount=1)
                self._by_key[key] = self._by_block[entry.block] = entry
            seq.cached_serials.append(entry.serial)

    def release(self, blocks: list[int]) -> list[int]:
        """A sequence lets go of its blocks: the cached ones become idle when no one else holds them (its last
        block first in line for eviction); returns the others, for the pool to free."""
        private = []
        for block in reversed(blocks):
            entry = self._by_block.get(block)
            if entry is None:
                private.append(block)
                continue
            entry.refcount -= 1
            assert entry.refcount >= 0, "cached block released more often than held"
            if entry.refcount == 0:
                self._idle[block] = entry
        private.reverse()
        return private

    def evict_one(self) -> bool:
        """Free the least recently used idle block; False if none is idle."""
        if not self._idle:
            return False
        block, entry = self._idle.popitem(last=False)
        del self._by_block[block], self._by_key[entry.key]
        self.pool.free([block])
        self.stats.evictions += 1
        return True

    def clear(self) -> None:
        """Free every idle block (the held ones stay until their requests let go)."""
        while self.evict_one():
            pass
