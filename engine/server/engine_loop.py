"""The one thread that drives the Engine: every engine call happens here, HTTP handlers talk to it by queues.

Handlers (on the asyncio event loop) put commands on a thread-safe queue; the loop thread runs them between
engine steps and pushes each step's RequestOutputs back to the handlers' asyncio queues, with one
call_soon_threadsafe per step and event loop (one per output cost the loop thread over twice as much at 256
streams: `python -m benchmarks.server_handoff`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from ..api import Engine
from ..request import Request, RequestOutput

log = logging.getLogger("softprompt.server")


class EngineFailure(RuntimeError):
    """engine.step() raised: the requests in the batch were aborted."""


class ServerStopping(RuntimeError):
    """The loop stopped before the request finished."""


@dataclass(frozen=True)
class LoopSnapshot:
    """Engine state read on the loop thread after each iteration (for /metrics and /health)."""

    running: int = 0
    waiting: int = 0
    kv_blocks_total: int = 0
    kv_blocks_free: int = 0
    prefix_hits: int = 0
    prefix_misses: int = 0
    prefix_evictions: int = 0
    block_cache_queried_tokens: int = 0
    block_cache_hit_tokens: int = 0
    block_cache_blocks: int = 0
    preemptions: int = 0
    steps: int = 0


class RequestStream:
    """The outputs of one HTTP call's engine requests (n choices), handed from the loop thread to asyncio."""

    def __init__(self, requests: list[Request], task: str):
        self.requests = requests
        self.task = task  # the public prompt name, for metrics
        self.index = {r.request_id: i for i, r in enumerate(requests)}
        self._aloop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._unfinished = set(self.index)

    @property
    def request_ids(self) -> list[str]:
        return list(self.index)

    @property
    def unfinished(self) -> set[str]:
        return set(self._unfinished)

    def put(self, kind: str, value: Any) -> None:
        """Called on the loop thread."""
        deliver([(self, kind, value)])

    async def accepted(self) -> None:
        """Wait until the loop queued the requests; raises the engine's error if it refused them."""
        kind, value = await self._queue.get()
        if kind == "error":
            raise value
        assert kind == "accepted", kind

    async def outputs(self, disconnected: Callable[[], Any] | None = None,
                      poll_s: float = 0.5) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(choice index, cumulative output) until every request finished. Stops early (returns) when
        `disconnected()` (an async callable) says the client has gone. Outputs are cumulative, so when several of
        one request wait (the handler fell behind the engine), only the newest is yielded: a slow client gets
        fewer, larger chunks instead of a growing backlog."""
        next_check = time.monotonic() + poll_s
        while self._unfinished:
            if disconnected is None:
                item = await self._queue.get()
            else:
                if time.monotonic() >= next_check:
                    if await disconnected():
                        return
                    next_check = time.monotonic() + poll_s
                item = await _get_within(self._queue, poll_s)
                if item is None:
                    continue
            newest: dict[str, RequestOutput] = {}
            error = None
            while True:
                kind, value = item
                if kind == "error":
                    error = value
                    break
                newest[value.request_id] = value  # (a dict keeps the order requests first came in)
                if self._queue.empty():
                    break
                item = self._queue.get_nowait()
            for out in newest.values():
                if out.finished:
                    self._unfinished.discard(out.request_id)
                yield self.index[out.request_id], out
            if error is not None:
                raise error


async def _get_within(q: asyncio.Queue, timeout: float) -> Any:
    """The next item, or None after `timeout` s. Not asyncio.wait_for: before Python 3.12 it can swallow a
    cancellation that races with the item's arrival, and the caller would go on streaming."""
    getter = asyncio.ensure_future(q.get())
    try:
        done, _ = await asyncio.wait({getter}, timeout=timeout)
    except BaseException:
        getter.cancel()
        raise
    if not done:
        getter.cancel()  # an item put meanwhile stays in the queue for the next call
        return None
    return getter.result()


async def compile_constraints(engine: Engine, requests: list[Request]) -> None:
    """Compile the requests' structured-output constraints (engine/structured.py) on a worker thread before they
    are submitted: the engine thread then finds them in the cache and keeps stepping the other requests meanwhile.
    A constraint that does not compile is left for the engine thread to refuse, as it refuses any bad request."""
    if engine.tokenizer is None:
        return
    wanted = {r.sampling for r in requests if isinstance(r, Request) and getattr(r.sampling, "structured", None)}
    for params in wanted:
        try:
            await asyncio.to_thread(engine.structured_outputs.compile_for, params)
        except ValueError:
            pass


def deliver(items: list[tuple[RequestStream, str, Any]]) -> None:
    """Put (kind, value) on each stream's queue, in order, waking each event loop once (called on the loop thread)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, tuple[str, Any]]]] = {}
    for stream, kind, value in items:
        by_loop.setdefault(stream._aloop, []).append((stream._queue, (kind, value)))
    for aloop, puts in by_loop.items():
        try:
            aloop.call_soon_threadsafe(_put_all, puts)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass


def _put_all(puts: list[tuple[asyncio.Queue, tuple[str, Any]]]) -> None:
    for q, item in puts:
        q.put_nowait(item)


class EngineLoop:
    """Owns the engine: a background thread runs commands and engine.step() while there is work."""

    def __init__(self, engine: Engine, on_output: Callable[[RequestStream, RequestOutput, float], None] | None = None,
                 on_abort: Callable[[RequestStream, str], None] | None = None, idle_wait_s: float = 0.05):
        self.engine = engine
        self._on_output = on_output
        self._on_abort = on_abort
        self._idle_wait_s = idle_wait_s
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # guards _closed: no command is queued after the loop's last drain
        self._closed = False
        self.snapshot = LoopSnapshot(kv_blocks_total=engine.pool.num_blocks, kv_blocks_free=engine.pool.num_free)
        self.failures = 0
        self._steps = 0

    # ---- lifecycle -----------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the engine loop is already started")
        self._thread = threading.Thread(target=self._run, name="softprompt-engine-loop", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        if self._thread is None:
            return
        self._stopping.set()
        self._put(None)  # wake the loop
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping.is_set()

    # ---- what handlers call (from any thread) ---------------------------------------------------------
    def submit(self, requests: list[Request], task: str) -> RequestStream:
        """Queue requests, all or none (call from the event loop; then await stream.accepted())."""
        stream = RequestStream(requests, task)
        if not self._put(("add", stream)):
            stream.put("error", ServerStopping("the engine loop is not running"))
        return stream

    def abort(self, request_ids: list[str], deliver_final: bool = False) -> None:
        """Abort requests between steps. `deliver_final`: their streams get the final output (finish_reason
        "abort"), for a caller still reading them; a client that has gone needs none."""
        if request_ids:
            self._put(("abort", list(request_ids), deliver_final))

    def call(self, fn: Callable[[Engine], Any]) -> concurrent.futures.Future:
        """Run fn(engine) on the loop thread, between steps."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        if not self._put(("call", fn, future)):
            future.set_exception(ServerStopping("the engine loop is not running"))
        return future

    def _put(self, command: tuple | None) -> bool:
        with self._lock:
            if self._closed or self._thread is None:
                return False
            self._commands.put(command)
            return True

    async def run(self, fn: Callable[[Engine], Any]) -> Any:
        return await asyncio.wrap_future(self.call(fn))

    # ---- the loop thread -----------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._iteration()
            except Exception as exc:  # a bug here must not silently leave every client waiting forever
                log.exception("engine loop iteration failed")
                self.failures += 1
                self._fail_all(EngineFailure(f"the engine loop failed: {exc}"))
        self._shutdown()

    def _iteration(self) -> None:
        """Run every queued command, then one engine step if there is work."""
        busy = self.engine.has_unfinished_requests()
        try:
            command = self._commands.get_nowait() if busy else self._commands.get(timeout=self._idle_wait_s)
            while True:
                if command is not None:
                    self._execute(command)
                command = self._commands.get_nowait()
        except queue.Empty:
            pass
        if self._stopping.is_set():
            return
        if self.engine.has_unfinished_requests():
            self._step()
        self._take_snapshot()

    def _execute(self, command: tuple) -> None:
        kind = command[0]
        if kind == "add":
            self._add(command[1])
        elif kind == "abort":
            for request_id in command[1]:
                self._abort(request_id, deliver_final=command[2])
        elif kind == "call":
            _, fn, future = command
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(self.engine))
                except BaseException as exc:  # handed to the caller
                    future.set_exception(exc)

    def _add(self, stream: RequestStream) -> None:
        added: list[str] = []
        try:
            for request in stream.requests:  # validate every one before queueing any
                self.engine.prepare(request)
            for request in stream.requests:
                added.append(self.engine.add_request(request))
                self._streams[request.request_id] = stream
        except Exception as exc:
            for request_id in added:
                self._abort(request_id)
            stream.put("error", exc)
            return
        stream.put("accepted", None)

    def _abort(self, request_id: str, deliver_final: bool = False) -> None:
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            final = self.engine.abort(request_id)
            if self._on_abort is not None:
                self._on_abort(stream, request_id)
            if deliver_final and final is not None:
                stream.put("output", final)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as exc:
            log.exception("engine step failed; aborting the running requests")
            self.failures += 1
            self._fail_all(EngineFailure(f"the engine failed while running this request: {exc}"))
            return
        self._steps += 1
        now = time.perf_counter()
        delivered = []
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            if out.finished:
                del self._streams[out.request_id]
            if self._on_output is not None:
                try:
                    self._on_output(stream, out, now)
                except Exception:  # metrics must never break serving
                    log.exception("metrics callback failed")
            delivered.append((stream, "output", out))
        deliver(delivered)

    def _fail_all(self, exc: BaseException) -> None:
        for request_id, stream in list(self._streams.items()):
            try:
                self._abort(request_id)
            except Exception:
                log.exception("abort of %s failed", request_id)
                self._streams.pop(request_id, None)
            stream.put("error", exc)

    def _take_snapshot(self) -> None:
        e = self.engine
        stats, cache = e.prefix_cache.stats, e.block_cache
        self.snapshot = LoopSnapshot(
            running=len(e.scheduler.running), waiting=len(e.scheduler.waiting),
            kv_blocks_total=e.pool.num_blocks, kv_blocks_free=e.pool.num_free,
            prefix_hits=stats.hits, prefix_misses=stats.misses, prefix_evictions=stats.evictions,
            block_cache_queried_tokens=0 if cache is None else cache.stats.queried_tokens,
            block_cache_hit_tokens=0 if cache is None else cache.stats.hit_tokens,
            block_cache_blocks=0 if cache is None else cache.num_cached,
            preemptions=e.scheduler.num_preemptions, steps=self._steps,
        )

    def _shutdown(self) -> None:
        self._fail_all(ServerStopping("the server is shutting down"))
        with self._lock:
            self._closed = True
        while True:  # answer the commands nobody will run
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            if command is None:
                continue
            if command[0] == "add":
                command[1].put("error", ServerStopping("the server is shutting down"))
            elif command[0] == "call":
                command[2].set_exception(ServerStopping("the server is shutting down"))
        self._take_snapshot()
