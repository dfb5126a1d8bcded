"""The loop thread's hand-off of a step's outputs to the HTTP handlers' asyncio queues."""

from __future__ import annotations

import asyncio
import threading

from softprompt import Request
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
