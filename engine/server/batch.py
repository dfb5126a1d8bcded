"""`softprompt run-batch MODEL_DIR -i requests.jsonl -o results.jsonl`: a file of OpenAI batch requests run
offline, as vLLM's `run-batch` and OpenAI's Batch API take them, through the very app `softprompt serve` runs.

Each input line is `{"custom_id": ..., "method": "POST", "url": "/v1/completions" | "/v1/chat/completions" |
"/v1/responses", "body": {...}}` (`model` names the task, as on the server). All lines share the engine's
continuous batch; each output line, in input order, is `{"id", "custom_id", "response": {"status_code",
"request_id", "body"}, "error"}`: the HTTP answer the server would give (a 400 with its error body for a bad
request), or `error` set and `response` null where the line itself is not a request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid
from pathlib import Path
from typing import Any

from ..errors import SoftPromptError
from .cli import add_serve_arguments

BATCH_URLS = ("/v1/completions", "/v1/chat/completions", "/v1/responses")


def add_run_batch_arguments(p: argparse.ArgumentParser) -> None:
    add_serve_arguments(p)
    p.add_argument("-i", "--input-file", required=True, help="the requests, one JSON object per line")
    p.add_argument("-o", "--output-file", required=True, help="where the results go, one JSON object per line")


class BadLine(ValueError):
    pass


def parse_line(line: str) -> dict[str, Any]:
    """One input line as a request, or BadLine naming what is wrong with it."""
    try:
        item = json.loads(line)
    except ValueError as exc:
        raise BadLine(f"the line is not JSON: {exc}") from None
    if not isinstance(item, dict):
        raise BadLine("the line must be a JSON object with custom_id, method, url and body")
    if not isinstance(item.get("custom_id"), str):
        raise BadLine("custom_id must be a string")
    if item.get("method", "POST") != "POST":
        raise BadLine(f"method must be POST, got {item.get('method')!r}")
    if item.get("url") not in BATCH_URLS:
        raise BadLine(f"url must be one of {', '.join(BATCH_URLS)}, got {item.get('url')!r}")
    if not isinstance(item.get("body"), dict):
        raise BadLine("body must be a JSON object")
    if item["body"].get("stream"):
        raise BadLine("a batch request cannot stream (stream must be false)")
    return item


def _result(custom_id: str | None, status: int | None = None, body: Any = None, error: str | None = None) -> dict:
    request_id = f"batch_req_{uuid.uuid4().hex}"
    response = None if status is None else {"status_code": status, "request_id": request_id, "body": body}
    return {"id": request_id, "custom_id": custom_id, "response": response,
            "error": None if error is None else {"code": "invalid_request", "message": error}}


async def run_lines(app, lines: list[str], concurrency: int, retry_s: float = 0.05, progress=None) -> list[dict]:
    """Every line's result, in order; at most `concurrency` requests in the app at once (a 429 is retried)."""
    from .asgi_call import ForwardedRequest, call_asgi

    gate = asyncio.Semaphore(concurrency)
    active = 0  # requests of this batch in the app now

    async def one(line: str) -> dict:
        try:
            item = parse_line(line)
        except BadLine as exc:
            try:
                custom_id = json.loads(line).get("custom_id")
            except (ValueError, AttributeError):
                custom_id = None
            return _result(custom_id if isinstance(custom_id, str) else None, error=str(exc))
        custom_id = item["custom_id"]
        request = ForwardedRequest("POST", item["url"], json.dumps(item["body"]).encode(),
                                   headers=((b"content-type", b"application/json"),))
        nonlocal active
        async with gate:
            active += 1
            try:
                while True:
                    head, chunks = None, []
                    async for part in call_asgi(app, request):
                        if head is None:
                            head = part
                            chunks.append(part.body)
                        else:
                            chunks.append(part)
                    # a full queue: wait for room, as a client would, while others hold it (alone, it never will)
                    if head.status != 429 or active == 1:
                        break
                    await asyncio.sleep(retry_s)
            finally:
                active -= 1
        if progress is not None:
            progress.update(1)
        body = b"".join(chunks)
        try:
            decoded = json.loads(body) if body else None
        except ValueError:
            decoded = body.decode("utf-8", "replace")
        return _result(custom_id, head.status, decoded)

    return list(await asyncio.gather(*(one(line) for line in lines)))


def _progress(total: int):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="requests", unit="req", file=sys.stderr, disable=None)


def run_run_batch(args: argparse.Namespace) -> int:
    if args.ray:
        raise SoftPromptError("run-batch runs in one process: leave out --ray")
    source = Path(args.input_file)
    try:
        lines = [line for line in source.read_text().splitlines() if line.strip()]
    except OSError as exc:
        raise SoftPromptError(f"cannot read {source}: {exc.strerror}") from None
    try:
        import fastapi  # noqa: F401
    except ImportError:
        raise SoftPromptError("run-batch needs the server extra: pip install 'softprompt-engine[server]'") from None
    from .cli import build_server

    app, registry = build_server(args)
    engine = app.state.loop.engine
    progress = _progress(len(lines))

    async def run() -> list[dict]:
        async with app.router.lifespan_context(app):  # the engine loop runs while the requests do
            return await run_lines(app, lines, engine.scheduler.config.max_num_seqs, progress=progress)

    try:
        results = asyncio.run(run())
    finally:
        registry.close()
        if progress is not None:
            progress.close()
    with open(args.output_file, "w") as out:
        for result in results:
            out.write(json.dumps(result) + "\n")
    failed = sum(1 for r in results if r["response"] is None or r["response"]["status_code"] != 200)
    print(f"{len(results)} requests, {failed} failed -> {args.output_file}", file=sys.stderr)
    return 0
