"""Request routers for the Ray Serve deployment (Serve's custom request router interface).

- `TaskAffinityRouter` (`--routing affinity`, the default): a task's requests go to a replica that already holds
  it (Serve's multiplexing tells which replicas loaded which model ids) or, while none does, to the task's *home*
  replica, picked by rendezvous hashing of the task over the replica ids. So even a burst of a new task's first
  requests, arriving before any replica has announced it, computes its prefix K/V on one replica, and when a
  replica is replaced only the tasks that lived there move. Load still counts: when the preferred replicas' queue
  is `imbalance` requests longer than the shortest queue, the request goes to the least loaded replica (which
  then computes the prefix once too).
- `RoundRobinRouter` (`--routing round-robin`): each request to the next replica, whatever its task; the
  no-affinity baseline of the benchmark.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import Counter

from ray.serve.request_router import MultiplexMixin, PendingRequest, RequestRouter, RunningReplica


def rendezvous_order(task: str, replica_ids: list[str]) -> list[str]:
    """Replica ids ordered by the highest random weight of (task, replica): the first is the task's home."""
    def weight(replica_id: str) -> int:
        return int.from_bytes(hashlib.blake2b(f"{task}\0{replica_id}".encode(), digest_size=8).digest(), "big")

    return sorted(replica_ids, key=weight, reverse=True)


class TaskAffinityRouter(MultiplexMixin, RequestRouter):
    def initialize_state(self, imbalance: int = 16, **kwargs) -> None:
        self.imbalance = imbalance
        self._in_flight: Counter = Counter()  # replica id -> requests this router sent that have not completed
        self._routed: dict[str, object] = {}  # internal request id -> replica id

    def on_request_routed(self, pending_request: PendingRequest, replica_id, result) -> None:
        self._in_flight[replica_id] += 1
        self._routed[pending_request.metadata.internal_request_id] = replica_id

    def on_request_completed(self, replica_id, internal_request_id: str) -> None:
        if self._routed.pop(internal_request_id, None) is not None:
            self._in_flight[replica_id] -= 1

    def _queue_len(self, replica: RunningReplica) -> int:
        return self._in_flight[replica.replica_id]

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        task = pending_request.metadata.multiplexed_model_id if pending_request is not None else ""
        if not task or len(candidate_replicas) < 2:
            return [candidate_replicas]  # the base router takes the shortest queue among them
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        ordered = [by_id[i] for i in rendezvous_order(task, list(by_id))]
        holders = self._multiplexed_model_id_to_replica_ids.get(task, set())
        preferred = [r for r in ordered if r.replica_id in holders] or ordered[:1]
        shortest = min(self._queue_len(r) for r in candidate_replicas)
        if min(self._queue_len(r) for r in preferred) - shortest > self.imbalance:
            return [candidate_replicas]
        return [preferred, ordered]


class RoundRobinRouter(RequestRouter):
    """Each request to the next replica in replica-id order, whatever its task."""

    def initialize_state(self, **kwargs) -> None:
        self._turn = itertools.count()

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        ordered = sorted(candidate_replicas, key=lambda r: r.replica_id.unique_id)
        return [[ordered[next(self._turn) % len(ordered)]]]
