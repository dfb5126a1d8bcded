"""Loop-thread time to hand one engine step's outputs to the HTTP handlers' asyncio queues: one
call_soon_threadsafe per output against one per step (engine/server/engine_loop.py `deliver`), while the event
loop drains the queues as the handlers do.

    python -m benchmarks.server_handoff [--streams 256] [--steps 50]
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time

from softprompt import Request
from softprompt.engine.server.engine_loop import RequestStream, deliver

from .environment import device_name


def _per_output(items: list) -> None:
    for stream, kind, value in items:
        stream._aloop.call_soon_threadsafe(stream._queue.put_nowait, (kind, value))  # what put() did


def measure(num_streams: int, steps: int) -> dict[str, float]:
    """Mean loop-thread seconds per step of each way."""
    async def main() -> dict[str, float]:
        streams = [RequestStream([Request(input_ids=[1])], "t") for _ in range(num_streams)]
        times: dict[str, float] = {}

        def produce() -> None:
            for name, fn in (("per output", _per_output), ("one per step", deliver)):
                start = time.perf_counter()
                for step in range(steps):
                    fn([(s, "output", step) for s in streams])
                times[name] = (time.perf_counter() - start) / steps

        thread = threading.Thread(target=produce)
        thread.start()
        for _ in range(2 * steps):
            for s in streams:
                await s._queue.get()
        thread.join()
        return times

    return asyncio.run(main())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.server_handoff", description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=256)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args(argv)
    times = measure(args.streams, args.steps)
    print(f"loop-thread time per step, {args.streams} streams ({device_name('cpu')}, same run):")
    for name, t in times.items():
        print(f"  {name:<14} {t * 1e3:.3f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
