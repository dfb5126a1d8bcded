"""`AsyncEngine`: the Engine on its own thread, for asyncio code that embeds it (vLLM's AsyncLLMEngine role).

Every engine call runs on one background thread (the HTTP server's `EngineLoop`), between engine steps; coroutines
submit requests and receive each step's outputs through asyncio queues, so any number of concurrent `generate()`
calls share one continuous batch. Needs no server extra.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from .api import Engine
from .beam_search import BeamSearchOutput, BeamSearchParams
from .prompts import SoftPrompt
from .request import Request, RequestOutput
from .server.engine_loop import EngineFailure, EngineLoop, ServerStopping, compile_constraints

__all__ = ["AsyncEngine", "EngineFailure", "EngineStopped"]

T = TypeVar("T")
EngineStopped = ServerStopping  # raised by calls after (or cut off by) shutdown()


class AsyncEngine:
    """Drive an `Engine` from asyncio: `async for out in engine.generate(request)` streams one request while
    others run in the same batch.

    `AsyncEngine("path/to/checkpoint", device=..., ...)` builds the Engine (any `Engine` argument), or wrap one
    already built: `AsyncEngine(engine)`. While the AsyncEngine runs, its thread owns the Engine: touch it only
    through these methods or `run(fn)`. Call `shutdown()` (or use `async with`) when done.
    """

    def __init__(self, engine: Engine | str | Path, **engine_kwargs: Any):
        if isinstance(engine, Engine):
            if engine_kwargs:
                raise TypeError("engine arguments go with a checkpoint path, not with a built Engine")
            self.engine = engine
        else:
            self.engine = Engine(engine, **engine_kwargs)
        self._loop = EngineLoop(self.engine)
        self._loop.start()

    # ---- requests ------------------------------------------------------------------------------------
    async def generate(self, request: Request) -> AsyncIterator[RequestOutput]:
        """The request's cumulative outputs as it runs, the last one finished. A request the engine refuses
        raises its error (a `SoftPromptError`) before any output; the other requests keep running. Outputs are
        cumulative, so a consumer slower than the engine gets fewer, larger steps. Leaving the loop early (break,
        cancellation, an exception) aborts the request and frees its KV blocks."""
        async for _, out in self._stream([request]):
            yield out

    async def generate_all(self, requests: Sequence[Request]) -> list[RequestOutput]:
        """The final outputs of `requests`, in order; all are admitted or, if one is refused, none."""
        final: list[RequestOutput | None] = [None] * len(requests)
        async for index, out in self._stream(list(requests)):
            if out.finished:
                final[index] = out
        return final  # type: ignore[return-value]

    async def beam_search(self, requests: Request | Sequence[Request],
                          params: BeamSearchParams) -> list[BeamSearchOutput]:
        """`Engine.beam_search`, each step's beams in the running batch beside the other requests."""
        requests = [requests] if isinstance(requests, Request) else list(requests)
        search = await self.run(lambda e: e.start_beam_search(requests, params))
        while not search.done:
            search.advance(await self.generate_all(search.step_requests()))
        return await self.run(lambda e: search.results(e.beam_text_decoder(params)))

    async def _stream(self, requests: list[Request]) -> AsyncIterator[tuple[int, RequestOutput]]:
        if not requests:
            return
        task = requests[0].prompt if isinstance(requests[0], Request) and requests[0].prompt else "base"
        await compile_constraints(self.engine, requests)
        stream = self._loop.submit(requests, task)
        try:
            await stream.accepted()  # (cancelled here, the requests may be queued already: the finally aborts them)
            async for index, out in stream.outputs():
                yield index, out
        finally:
            if stream.unfinished:
                self._loop.abort(sorted(stream.unfinished))

    async def abort(self, request_id: str) -> None:
        """Stop a request and free its KV blocks: its `generate()` ends with a last output whose finish_reason
        is "abort". An unknown or finished request is ignored."""
        self._loop.abort([request_id], deliver_final=True)

    # ---- prompts and anything else -------------------------------------------------------------------
    async def add_prompt(self, name: str, source: str | Path | Any = None, **kwargs: Any) -> SoftPrompt:
        """`Engine.add_prompt` on the engine thread, between steps (running requests are not disturbed)."""
        return await self.run(lambda e: e.add_prompt(name, source, **kwargs))

    async def remove_prompt(self, name: str) -> SoftPrompt:
        return await self.run(lambda e: e.remove_prompt(name))

    async def run(self, fn: Callable[[Engine], T]) -> T:
        """`fn(engine)` on the engine thread, between steps; its result or its exception."""
        return await self._loop.run(fn)

    # ---- lifecycle -----------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._loop.alive

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the engine thread. Requests still running end with `EngineStopped`."""
        self._loop.stop(timeout)

    async def __aenter__(self) -> AsyncEngine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.shutdown()
