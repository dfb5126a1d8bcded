"""A bounded load test: 64 concurrent streaming clients for a fixed number of requests, on loopback."""

from __future__ import annotations

import asyncio
import json
import random

import httpx

from softprompt import Request, SamplingParams



CLIENTS = 64
REQUESTS = 192
TASKS = ("a", "b", "polite", "base")


def make_jobs(seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    jobs = []
    for i in range(REQUESTS):
        body = {"model": TASKS[i % len(TASKS)], "max_tokens": rng.randint(1, 8), "ignore_eos": True,
                "stream": True, "return_token_ids": True}
        if i % 3 == 0:
            body["prompt"] = [rng.randrange(4, 512) for _ in range(rng.randint(1, 24))]
        else:
            body["prompt"] = " ".join(rng.choice(("the", "cat", "a", "red", "bird", "sat", "king")) for _ in
                                      range(rng.randint(1, 8)))
        if i % 2:
            body.update(temperature=0.9, top_p=0.95, seed=1000 + i)
        else:
            body["temperature"] = 0
        jobs.append(body)
    return jobs


def as_request(body: dict) -> Request:
    source = {"text": body["prompt"]} if isinstance(body["prompt"], str) else {"input_ids": body["prompt"]}
    return Request(prompt=None if body["model"] == "base" else body["model"], **source,
                   sampling=SamplingParams(max_new_tokens=body["max_tokens"], temperature=body["temperature"],
                                           top_p=body.get("top_p", 1.0), seed=body.get("seed"), ignore_eos=True))


async def stream_one(client: httpx.AsyncClient, body: dict) -> tuple[list[int], str, str | None, bool]:
    ids, text, finish, done = [], "", None, False
    async with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            choice = json.loads(line[6:])["choices"][0]
            ids += choice["token_ids"]
            text += choice["text"]
            finish = choice["finish_reason"] or finish
    return ids, text, finish, done


async def run_clients(url: str, jobs: list[dict]) -> list:
    queue: asyncio.Queue = asyncio.Queue()
    for i, job in enumerate(jobs):
        queue.put_nowait((i, job))
    results: list = [None] * len(jobs)
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
    async with httpx.AsyncClient(base_url=url, timeout=120.0, limits=limits, trust_env=False) as client:
        async def worker():
            while not queue.empty():
                i, job = queue.get_nowait()
                results[i] = await stream_one(client, job)

        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(CLIENTS))), timeout=240)
    return results


def test_64_streaming_clients_none_lost_none_wrong_pool_empty(served):
    jobs = make_jobs()
    results = asyncio.run(run_clients(served.server.url, jobs))
    want = served.expected([as_request(j) for j in jobs])
    assert all(r is not None and r[3] for r in results)  # none lost: every stream ended with [DONE]
    wrong = [i for i, (r, w) in enumerate(zip(results, want)) if (r[0], r[1], r[2]) != (w.token_ids, w.text, "length")]
    assert not wrong, f"{len(wrong)} wrong, e.g. request {wrong[0]}"
    served.server.assert_pool_empty()
    health = served.server.client().get("/health").json()
    assert health["in_flight"] == 0 and health["running"] == 0 and health["waiting"] == 0
