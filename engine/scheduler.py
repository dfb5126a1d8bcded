"""Continuous batching across tasks: admission by KV budget, chunked prefill beside decode, preemption."""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass

from .block_cache import BlockCache
from .errors import SoftPromptError
from .kv_pool import OutOfBlocks
from .prefix_cache import PrefixCache
from .sequence import Sequence, Status

SCHEDULING_POLICIES = ("fcfs", "priority")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256  # running sequences at most
    max_batched_tokens: int = 2048  # new tokens per step at most (longer inputs are prefilled in chunks)
    # with a block cache: a waiting sequence whose next block a running one is computing waits for it
    share_in_flight_blocks: bool = True
    # "fcfs": first come, first served; "priority": by each request's priority (lower first, vLLM's), then arrival
    policy: str = "fcfs"

    def __post_init__(self) -> None:
        if self.policy not in SCHEDULING_POLICIES:
            raise SoftPromptError(f"scheduling_policy must be one of {', '.join(SCHEDULING_POLICIES)}, "
                                  f"got {self.policy!r}")


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    num_tokens: list[int]


class Scheduler:
    """Each step: every running sequence gets its next token(s) (decode first, then prefill chunks), then
    waiting sequences are admitted while the token budget and the KV pool allow, each starting after the cached
    blocks its tokens begin with (with a block cache; one whose next block a running sequence is computing waits
    a step to find it cached). When blocks run out, idle cached blocks and unreferenced
    prefixes are evicted first, then the last running sequence in rank (the newest; with the priority policy the
    least urgent) is preempted (recomputed later). Sequences are served in rank order throughout."""

    def __init__(self, prefix_cache: PrefixCache, config: SchedulerConfig, block_cache: BlockCache | None = None):
        self.prefix_cache = prefix_cache
        self.block_cache = block_cache
        self.pool = prefix_cache.pool
        self.config = config
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def rank(self, seq: Sequence) -> tuple[int, int]:
        """Who goes first (smaller first): arrival, or with the priority policy the request's priority, then arrival.
        Waiting sequences are admitted in this order, and the last in it is preempted first."""
        if self.config.policy == "priority":
            return seq.request.priority, seq.arrival_order
        return 0, seq.arrival_order

    def _enqueue(self, seq: Sequence) -> None:
        """Put a waiting sequence in its place (new ones last, preempted ones back where they came from)."""
        rank = self.rank(seq)
        at = len(self.waiting)
        while at > 0 and self.rank(self.waiting[at - 1]) > rank:
            at -= 1
        self.waiting.insert(at, seq)

    def add(self, seq: Sequence) -> None:
        self._enqueue(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _ensure_blocks(self, seq: Sequence, num_own_tokens: int) -> None:
        need = self.pool.blocks_for(num_own_tokens) - len(seq.blocks)
        if need > 0:
            seq.blocks.extend(self.prefix_cache.allocate(need))

    def release(self, seq: Sequence) -> None:
        """Give back a sequence's own blocks (cached ones stay cached) and its prefix reference."""
        self.pool.free(seq.blocks if self.block_cache is None else self.block_cache.release(seq.blocks))
        seq.blocks = []
        seq.cached_serials = []
        seq.num_computed = 0
        if seq.prefix is not None:
            self.prefix_cache.release(seq.prefix)
            seq.prefix = None

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.release(seq)
        seq.status = Status.WAITING
        self._enqueue(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.release(seq)
        seq.status = Status.FINISHED

    def schedule(self) -> ScheduledBatch:
        budget = self.config.max_batched_tokens
        preemptions_before = self.num_preemptions
        batch: list[Sequence] = []
        counts: list[int] = []
        # running sequences, oldest first; decode (1 token) before prefill chunks (arrival orders are distinct)
        block_size = self.pool.block_size
        running = list(self.running)
        left = [s.remaining_prefill for s in running]
        order = sorted(zip([r > 1 for r in left], [self.rank(s) for s in running], range(len(running))))
        for _, _, i in order:
            seq, remaining = running[i], left[i]
            if budget == 0:
                break
            if seq.status is not Status.RUNNING:  # preempted while making room for an older one
                continue
            n = remaining if remaining < budget else budget
            if seq.num_computed + n > len(seq.blocks) * block_size:  # new blocks (a decode step: 1 in block_size)
                while True:
                    try:
                        self._ensure_blocks(seq, seq.num_computed + n)
                        break
                    except OutOfBlocks:
                        victim = max((s for s in self.running if s not in batch), key=self.rank)
                        self._preempt(victim)
                        if victim is seq:
                            break
                if seq.status is not Status.RUNNING:
                    continue
            batch.append(seq)
            counts.append(n)
            budget -= n
        # admit waiting sequences in arrival order while there is room (not in a step that had to preempt);
        # the prefixes they need are computed together, in one model call
        prefetched = self._prefetch_prefixes(budget) if self.num_preemptions == preemptions_before else []
        in_flight = (self._blocks_in_flight() if self.waiting and self.block_cache is not None
                     and self.config.share_in_flight_blocks else set())
        deferred: list[Sequence] = []
        while (
            self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs
            and self.num_preemptions == preemptions_before and len(deferred) < self.config.max_num_seqs
        ):
            seq = self.waiting[0]
            cached = self.block_cache is not None and seq.params.prompt_logprobs is None  # (those score every row)
            try:
                if seq.prompt is not None and seq.prefix is None:
                    seq.prefix = self.prefix_cache.acquire(seq.prompt)
                if cached:
                    self.block_cache.match(seq)
                    if self.block_cache.next_key(seq, seq.num_tokens - 1) in in_flight:
                        self.release(seq)  # a running sequence is computing its next block: find it next step
                        deferred.append(self.waiting.popleft())
                        continue
                n = min(seq.remaining_prefill, budget)
                self._ensure_blocks(seq, seq.num_computed + n)
            except OutOfBlocks:
                self.release(seq)
                break
            if cached:
                self.block_cache.count_admitted(seq)
            if self.block_cache is not None and self.config.share_in_flight_blocks:
                key = self.block_cache.next_key(seq, seq.num_tokens)
                if key is not None:
                    in_flight.add(key)
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            batch.append(seq)
            counts.append(n)
            budget -= n
        self.waiting.extendleft(reversed(deferred))
        for entry in prefetched:
            self.prefix_cache.release(entry)
        return ScheduledBatch(batch, counts)

    def _blocks_in_flight(self) -> set[tuple]:
        """Block-cache keys of the blocks running sequences are computing (each one's next full block): a waiting
        sequence whose next block is one of them waits a step and finds it cached, instead of computing it too
        (the n samples of one input, a burst of requests with one instruction; SGLang's in-batch prefix caching)."""
        size, cache = self.pool.block_size, self.block_cache
        in_flight: set[tuple] = set()
        for seq in self.running:
            if (len(seq.cached_serials) + 1) * size <= seq.num_tokens:
                in_flight.add(cache.next_key(seq, seq.num_tokens))
        return in_flight

    def _prefetch_prefixes(self, budget: int) -> list:
        """Acquire (computing if needed, all at once) the prefixes of the waiting sequences likely admitted now."""
        prompts = []
        room = self.config.max_num_seqs - len(self.running)
        for seq in itertools.islice(self.waiting, room):
            if budget <= 0:
                break
            if seq.prompt is not None and seq.prefix is None:
                prompts.append(seq.prompt)
            budget -= seq.remaining_prefill
        if not prompts:
            return []
        try:
            return self.prefix_cache.acquire_many(prompts)
        except OutOfBlocks:
            return []
