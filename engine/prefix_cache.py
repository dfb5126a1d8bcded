"""Per-task prefix K/V: computed once per prompt version, shared read-only, refcounted, evicted LRU."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

from .kv_pool import KVPool, OutOfBlocks
from .prompts import SoftPrompt


@dataclass(eq=False)
class PrefixEntry:
    prompt: SoftPrompt
    blocks: list[int]
    refcount: int = 0
    last_used: int = 0
    stale: bool = False  # the prompt was removed or replaced: drop when the last user lets go

    @property
    def length(self) -> int:
        return self.prompt.length


@dataclass
class PrefixCacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    computations: dict[str, int] = field(default_factory=dict)  # prompt key -> times its K/V was computed


class PrefixCache:
    """Maps `name@version` to the blocks holding that prefix's K/V for every layer."""

    def __init__(self, pool: KVPool, compute: Callable[[SoftPrompt, list[int]], None]):
        self.pool = pool
        self._compute = compute
        self._entries: dict[str, PrefixEntry] = {}
        self._clock = itertools.count(1)
        self.stats = PrefixCacheStats()

    def __contains__(self, prompt: SoftPrompt) -> bool:
        return prompt.key in self._entries

    @property
    def entries(self) -> list[PrefixEntry]:
        return list(self._entries.values())

    def acquire(self, prompt: SoftPrompt) -> PrefixEntry:
        """The prompt's prefix entry with one more reference, computing its K/V on a miss (may raise OutOfBlocks)."""
        entry = self._entries.get(prompt.key)
        if entry is None:
            blocks = self.allocate(self.pool.blocks_for(prompt.length))
            try:
                self._compute(prompt, blocks)
            except BaseException:
                self.pool.free(blocks)
                raise
            entry = PrefixEntry(prompt, blocks)
            self._entries[prompt.key] = entry
            self.stats.misses += 1
            self.stats.computations[prompt.key] = self.stats.computations.get(prompt.key, 0) + 1
        else:
            self.stats.hits += 1
        entry.refcount += 1
        entry.last_used = next(self._clock)
        return entry

    def release(self, entry: PrefixEntry) -> None:
        entry.refcount -= 1
        assert entry.refcount >= 0, "prefix released more often than acquired"
        if entry.refcount == 0 and entry.stale:
            self._drop(entry)

    def precompute(self, prompt: SoftPrompt) -> None:
        self.release(self.acquire(prompt))

    def invalidate(self, name: str, keep_version: str | None = None) -> None:
        """Forget the cached versions of a prompt (after it is removed, or replaced by `keep_version`)."""
        for entry in list(self._entries.values()):
            if entry.prompt.name == name and entry.prompt.version != keep_version:
                entry.stale = True
                if entry.refcount == 0:
                    self._drop(entry)

    def allocate(self, n: int) -> list[int]:
        """Blocks from the pool, evicting unreferenced prefixes (least recently used first) when it is full."""
        while True:
            try:
                return self.pool.allocate(n)
            except OutOfBlocks:
                if not self.evict_one():
                    raise

    def evict_one(self) -> bool:
        idle = [e for e in self._entries.values() if e.refcount == 0]
        if not idle:
            return False
        self._drop(min(idle, key=lambda e: e.last_used))
        self.stats.evictions += 1
        return True

    def _drop(self, entry: PrefixEntry) -> None:
        if self._entries.get(entry.prompt.key) is entry:
            del self._entries[entry.prompt.key]
        self.pool.free(entry.blocks)
        entry.blocks = []
