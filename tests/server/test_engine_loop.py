"""The loop thread's hand-off of a step's outputs to the HTTP handlers' asyncio queues."""

from __future__ import annotations

import asyncio
import threading

from softprompt import Request
from softprompt.engine.request import RequestOutput
from softprompt.engine.server.engine_loop import RequestStream, deliver


def test_a_steps_outputs_wake_the_event_loop_once_and_keep_each_streams_order():
    async def main():
        aloop = asyncio.get_running_loop()
        streams = [RequestStream([Request(input_ids=[1])], "t") for _ in range(3)]
        wakeups = []
        real = aloop.call_soon_threadsafe
        aloop.call_soon_threadsafe = lambda *a: wakeups.append(1) or real(*a)
        items = [(streams[i % 3], "output", i) for i in range(30)]
        thread = threading.Thread(target=deliver, args=(items,))  # as the loop thread does, from another thread
        thread.start()
        thread.join()
        got = [[(await s._queue.get())[1] for _ in range(10)] for s in streams]
        del aloop.call_soon_threadsafe
        return wakeups, got

    wakeups, got = asyncio.run(main())
    assert wakeups == [1]
    assert got == [list(range(i, 30, 3)) for i in range(3)]


def test_delivering_to_a_closed_event_loop_is_a_no_op():
    async def make():
        return RequestStream([Request(input_ids=[1])], "t")

    aloop = asyncio.new_event_loop()
    stream = aloop.run_until_complete(make())
    aloop.close()
    deliver([(stream, "output", 1)])  # nobody is listening: no error


def _output(request_id: str, tokens: list[int], finished: bool = False) -> RequestOutput:
    return RequestOutput(request_id, None, None, [1], tokens, None, "length" if finished else None)


def test_a_handler_that_fell_behind_gets_each_requests_newest_output_only():
    async def main():
        a, b = Request(input_ids=[1]), Request(input_ids=[1])
        stream = RequestStream([a, b], "t")
        deliver([(stream, "output", _output(a.request_id, [5]))])
        deliver([(stream, "output", _output(b.request_id, [7])), (stream, "output", _output(a.request_id, [5, 6]))])
        deliver([(stream, "output", _output(b.request_id, [7, 8], finished=True))])
        await asyncio.sleep(0)  # the three hand-offs land before the handler reads
        first = []
        async for index, out in stream.outputs():
            first.append((index, out.token_ids, out.finished))
            if len(first) == 2:
                break
        deliver([(stream, "output", _output(a.request_id, [5, 6, 9], finished=True))])
        rest = [(index, out.token_ids) async for index, out in stream.outputs()]
        return first, rest

    first, rest = asyncio.run(main())
    assert first == [(0, [5, 6], False), (1, [7, 8], True)]
    assert rest == [(0, [5, 6, 9])]


def test_an_error_after_outputs_is_raised_once_they_are_yielded():
    async def main():
        a = Request(input_ids=[1])
        stream = RequestStream([a], "t")
        deliver([(stream, "output", _output(a.request_id, [5])), (stream, "error", RuntimeError("engine failed"))])
        await asyncio.sleep(0)
        seen = []
        try:
            async for _, out in stream.outputs():
                seen.append(out.token_ids)
        except RuntimeError as exc:
            return seen, str(exc)

    assert asyncio.run(main()) == ([[5]], "engine failed")
