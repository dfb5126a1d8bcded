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
    fresh: bool = True  # computed but not yet used by a request (its first use is the miss, not a hit)

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

    def __init__(self, pool: KVPool, compute: Callable[[list[tuple[SoftPrompt, list[int]]]], None],
                 reclaim: Callable[[], bool] | None = None):
        self.pool = pool
        self._compute = compute
        self._reclaim = reclaim  # frees one block held by something idle (the block cache), before any prefix
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
            entry = self.acquire_many([prompt])[0]
        else:
            self._hold(entry)
        if entry.fresh:
            entry.fresh = False
        else:
            self.stats.hits += 1
        return entry

    def acquire_many(self, prompts: list[SoftPrompt]) -> list[PrefixEntry]:
        """Acquire several prompts, computing all the missing ones in a single model call (counted as misses;
        hits are counted by `acquire`, once per request). Stops at the first prompt that does not fit in the pool
        (fewer entries are returned than prompts given)."""
        acquired: list[PrefixEntry] = []
        missing: list[tuple[SoftPrompt, list[int]]] = []
        for prompt in dict.fromkeys(prompts):  # distinct, in order
            entry = self._entries.get(prompt.key)
            if entry is not None:
                acquired.append(self._hold(entry))
                continue
            try:
                blocks = self.allocate(self.pool.blocks_for(prompt.length))
            except OutOfBlocks:
                if not acquired and not missing:
                    raise
                break
            missing.append((prompt, blocks))
            # registered now (held), so that allocating the next prompt's blocks cannot evict it
            acquired.append(self._hold(self._register(prompt, blocks)))
        if missing:
            try:
                self._compute(missing)
            except BaseException:
                for entry in acquired[-len(missing):]:
                    entry.refcount = 0
                    self._drop(entry)
                raise
        return acquired

    def _register(self, prompt: SoftPrompt, blocks: list[int]) -> PrefixEntry:
        entry = PrefixEntry(prompt, blocks)
        self._entries[prompt.key] = entry
        self.stats.misses += 1
        self.stats.computations[prompt.key] = self.stats.computations.get(prompt.key, 0) + 1
        return entry

    def _hold(self, entry: PrefixEntry) -> PrefixEntry:
        entry.refcount += 1
        entry.last_used = next(self._clock)
        return entry

    def release(self, entry: PrefixEntry) -> None:
        entry.refcount -= 1
        assert entry.refcount >= 0, "prefix released more often than acquired"
        if entry.refcount == 0 and entry.stale:
            self._drop(entry)

    def precompute(self, prompt: SoftPrompt) -> None:
        if prompt.key not in self._entries:
            self.release(self.acquire_many([prompt])[0])

    def invalidate(self, name: str, keep_version: str | None = None) -> None:
        """Forget the cached versions of a prompt (after it is removed, or replaced by `keep_version`)."""
        for entry in list(self._entries.values()):
            if entry.prompt.name == name and entry.prompt.version != keep_version:
                entry.stale = True
                if entry.refcount == 0:
                    self._drop(entry)

    def allocate(self, n: int) -> list[int]:
        """Blocks from the pool; when it is full, idle cached request blocks are evicted first, then unreferenced
        prefixes (least recently used first)."""
        while True:
            try:
                return self.pool.allocate(n)
            except OutOfBlocks:
                if not (self._reclaim is not None and self._reclaim()) and not self.evict_one():
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
