"""Ray Serve on one machine: a local Ray cluster, 2 CPU engine replicas behind the OpenAI-compatible ingress.

Outputs must equal the single-process engine's, a task's prefix K/V must be computed once (affinity), prompts
load on demand from the shared directory, and a replica killed mid-load must lose no accepted request.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import ray
from ray import serve

import softprompt
from softprompt import Engine, Request, SamplingParams
from softprompt.engine.server.ray_serve import RayServeSettings, build_app

from .support import free_port

TASKS = tuple(f"t{i}" for i in range(10))  # all on one replica by chance: 2 in 1024
TEXT = {"polite": "answer politely:"}
KV_BYTES = 4 << 20
API_KEY = "ray-key"  # --api-key: the ingress and the replicas check it


class Cluster:
    def __init__(self, url: str, prompt_dir: Path, reference: Engine):
        self.url = url
        self.prompt_dir = prompt_dir
        self.reference = reference

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120, trust_env=False,
                            headers={"Authorization": f"Bearer {API_KEY}"})

    def complete(self, model: str, ids: list[int], max_tokens: int = 8, **extra) -> httpx.Response:
        with self.http() as http:
            return http.post("/v1/completions", json={"model": model, "prompt": ids, "max_tokens": max_tokens,
                                                      "temperature": 0, "return_token_ids": True, **extra})

    def expected(self, model: str, ids: list[int], max_tokens: int = 8, **sampling) -> list[int]:
        [out] = self.reference.generate(Request(prompt=None if model == "base" else model, input_ids=ids,
                                                sampling=SamplingParams(max_new_tokens=max_tokens, **sampling)))
        return out.token_ids

    def health(self) -> dict:
        with self.http() as http:
            return http.get("/health").json()

    def settled_reports(self, requests: int, timeout: float = 30) -> dict:
        """The board once the replicas have reported `requests` requests in all and nothing runs."""
        deadline = time.monotonic() + timeout
        while True:
            reports = self.health()["replicas"]
            live = {k: r for k, r in reports.items() if k in self.replica_ids()}
            seen = sum(sum(r["requests"].values()) for r in live.values())
            if seen >= requests and all(r["running"] == r["waiting"] == 0 for r in live.values()):
                return live
            assert time.monotonic() < deadline, f"replicas did not report {requests} requests: {reports}"
            time.sleep(0.3)

    @staticmethod
    def replica_actors() -> dict[str, str]:
        """Live engine replicas: id -> actor name (SERVE_REPLICA::app#deployment#id)."""
        return {a["name"].rsplit("#", 1)[-1]: a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                if "#SoftPromptReplica#" in a["name"]}

    def replica_ids(self) -> set[str]:
        return set(self.replica_actors())


@pytest.fixture(scope="module")
def cluster(model_dir_for, adapter_for, tmp_path_factory):
    model = model_dir_for("llama")
    prompt_dir = tmp_path_factory.mktemp("shared-prompts")
    reference = Engine(model, device="cpu", kv_cache_bytes=KV_BYTES)
    for i, task in enumerate(TASKS):
        adapter = adapter_for("llama", seed=i, num_virtual_tokens=4 + i)
        shutil.copytree(adapter, prompt_dir / task)
        reference.add_prompt(task, adapter)
    for name, text in TEXT.items():
        reference.add_prompt(name, text=text)
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    settings = RayServeSettings(model_dir=str(model), prompt_dir=str(prompt_dir), text_prompts=TEXT, replicas=2,
                                kv_cache_bytes=KV_BYTES, max_num_seqs=4, replica_cpus=1, stats_interval_s=0.2,
                                api_key=API_KEY)
    serve.run(build_app(settings), name="softprompt", route_prefix="/")
    try:
        yield Cluster(f"http://127.0.0.1:{port}", prompt_dir, reference)
    finally:
        serve.shutdown()
        ray.shutdown()


def ids_for(i: int) -> list[int]:
    return [5 + i, 9 + 2 * i, 33, 70 + i]


def test_tasks_spread_over_replicas_equal_the_engine_and_compute_each_prefix_once(cluster):
    """A cold burst: every task's first requests arrive together, before any replica holds the task. Each task
    still goes to one replica (its rendezvous home), so its prefix K/V is computed once in all."""
    jobs = [(task, i, j) for j in range(4) for i, task in enumerate(TASKS)] + [("base", 0, j) for j in range(3)]
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda job: cluster.complete(job[0], ids_for(job[1] + job[2])), jobs))
    served_by: dict[str, set[str]] = {}
    for (task, i, j), r in zip(jobs, responses):
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["token_ids"] == cluster.expected(task, ids_for(i + j))
        served_by.setdefault(task, set()).add(r.headers["x-softprompt-replica"])
    assert len(set().union(*served_by.values())) == 2, served_by  # both replicas served
    reports = cluster.settled_reports(len(jobs))
    for task in TASKS:  # affinity: every request of a task went to the one replica computing its prefix
        assert len(served_by[task]) == 1, (task, served_by)
        assert sum(r["prefix_computations"].get(task, 0) for r in reports.values()) == 1, (task, reports)
    for r in reports.values():  # nothing leaked: every block is free or held by an idle cached prefix or block
        assert r["kv_blocks_free"] + r["kv_blocks_prefixes"] + r["kv_blocks_cached"] == r["kv_blocks_total"]


def test_streaming_chat_and_text_prompts_through_the_ingress(cluster):
    from openai import OpenAI

    client = OpenAI(base_url=f"{cluster.url}/v1", api_key=API_KEY, max_retries=0, timeout=120,
                    http_client=httpx.Client(trust_env=False))
    kw = dict(model="t1", prompt=[5, 9, 33, 70], max_tokens=10, temperature=0.7, top_p=0.9, seed=11)
    chunks = list(client.completions.create(stream=True, extra_body={"return_token_ids": True,
                                                                     "ignore_eos": True}, **kw))
    ids = [t for c in chunks if c.choices for t in c.choices[0].model_extra["token_ids"]]
    assert ids == cluster.expected("t1", [5, 9, 33, 70], 10, temperature=0.7, top_p=0.9, seed=11, ignore_eos=True)
    assert len(chunks) > 3
    got = client.completions.create(model="polite", prompt=[7, 8, 9], max_tokens=6, temperature=0,
                                    extra_body={"return_token_ids": True})
    assert got.choices[0].model_extra["token_ids"] == cluster.expected("polite", [7, 8, 9], 6)
    chat = client.chat.completions.create(model="t2", messages=[{"role": "user", "content": "the cat sat"}],
                                          max_tokens=5, temperature=0)
    want = cluster.reference.tokenizer.hf.apply_chat_template([{"role": "user", "content": "the cat sat"}],
                                                              add_generation_prompt=True, tokenize=False)
    [out] = cluster.reference.generate(Request(prompt="t2", input_ids=cluster.reference.tokenizer.hf(
        want, add_special_tokens=False)["input_ids"], sampling=SamplingParams(max_new_tokens=5)))
    assert chat.choices[0].message.content == out.text
    answer = client.responses.create(model="t2", input="the cat sat", max_output_tokens=5, temperature=0)
    assert answer.output_text == out.text  # the Responses API: the same chat, through the ingress
    with httpx.Client(trust_env=False, timeout=120) as http:
        message = http.post(f"{cluster.url}/v1/messages", headers={"x-api-key": API_KEY}, json={
            "model": "t2", "max_tokens": 5, "temperature": 0, "messages": [{"role": "user", "content": "the cat sat"}]})
    assert message.json()["content"][0]["text"] == out.text  # and Anthropic's Messages API
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"base", "polite", *TASKS}
    assert client.models.retrieve("t2").model_dump() == models["t2"].model_dump()
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_bad_requests_get_the_single_process_errors(cluster):
    with cluster.http() as http:
        r = http.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
        r = http.post("/v1/completions", json={"model": "nope", "prompt": "x"})
        assert r.status_code == 404 and "nope" in r.json()["error"]["message"]
        r = http.post("/v1/completions", json={"model": "../t0", "prompt": "x"})
        assert r.status_code == 404
        r = http.post("/v1/completions", json={"model": "t0", "prompt": [5], "temperature": -1})
        assert r.status_code in (400, 422) and "temperature" in r.text
        r = http.post("/v1/completions", json={"model": "t0", "prompt": [5], "suffix": "x"})
        assert r.status_code == 400 and "suffix" in r.json()["error"]["message"]
        r = http.post("/v1/completions", content=b"x" * (9 << 20), headers={"content-type": "application/json"})
        assert r.status_code == 413
        r = http.post("/v1/messages", json={"model": "nope", "max_tokens": 2,
                                            "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 404 and r.json()["type"] == "error"  # Anthropic's shape, from the replica
        assert r.json()["error"]["type"] == "not_found_error"
        r = http.post("/invocations", json={"model": "t0", "prompt": [5, 6], "max_tokens": 2})  # SageMaker's
        assert r.status_code == 200 and r.json()["object"] == "text_completion"
    with httpx.Client(base_url=cluster.url, timeout=120, trust_env=False) as anonymous:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = anonymous.post("/v1/completions", json={"model": "t0", "prompt": [5]}, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert anonymous.get("/v1/models", headers=headers).status_code == 401
            assert anonymous.get("/v1/models/t0", headers=headers).status_code == 401
        assert anonymous.get("/health").status_code == 200 and anonymous.get("/ping").status_code == 200
        assert anonymous.post("/invocations", json={"model": "t0", "prompt": [5]}).status_code == 401
        r = anonymous.post("/v1/messages", json={"model": "t0", "max_tokens": 2, "messages": []})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error" and r.json()["type"]
        assert anonymous.get("/version").json()["version"] == softprompt.__version__
    assert cluster.complete("t0", [5, 6]).status_code == 200  # still serving


def test_prompts_load_reload_and_vanish_with_the_shared_directory(cluster, adapter_for):
    late = cluster.prompt_dir / "late"
    assert cluster.complete("late", [5, 6, 7]).status_code == 404
    shutil.copytree(adapter_for("llama", seed=20, num_virtual_tokens=6), late)
    r = cluster.complete("late", [5, 6, 7])
    cluster.reference.add_prompt("late", adapter_for("llama", seed=20, num_virtual_tokens=6))
    assert r.status_code == 200 and r.json()["choices"][0]["token_ids"] == cluster.expected("late", [5, 6, 7])
    # new content under the same name: the replica that holds it reloads it
    other = adapter_for("llama", seed=21, num_virtual_tokens=6)
    shutil.copy(other / "adapter_model.safetensors", late / "adapter_model.safetensors.tmp")
    (late / "adapter_model.safetensors.tmp").replace(late / "adapter_model.safetensors")
    cluster.reference.add_prompt("late", other, replace=True)
    r = cluster.complete("late", [5, 6, 7])
    assert r.status_code == 200 and r.json()["choices"][0]["token_ids"] == cluster.expected("late", [5, 6, 7])
    shutil.rmtree(late)
    r = cluster.complete("late", [5, 6, 7])
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_a_replica_killed_mid_load_loses_no_request(cluster):
    """Non-streaming requests on the killed replica are retried elsewhere; streams that already had tokens end
    with an error event after correct tokens; nothing is answered wrongly; Serve brings the replica back."""
    jobs = [(TASKS[k % len(TASKS)], k) for k in range(16)]
    plain_tokens, stream_tokens = 100, 230  # long enough to be still running when the replica dies
    results: dict[int, httpx.Response] = {}
    streams: dict[int, tuple[str, list[int], bool]] = {}
    started = threading.Barrier(3)
    replica_of: dict[int, str] = {}  # stream -> the replica serving it

    def plain(job):
        task, k = job
        results[k] = cluster.complete(task, ids_for(k), max_tokens=plain_tokens, ignore_eos=True)

    def stream(k: int) -> None:
        task = TASKS[k]
        body = {"model": task, "prompt": ids_for(k), "max_tokens": stream_tokens, "temperature": 0, "stream": True,
                "return_token_ids": True, "ignore_eos": True}
        tokens, errored = [], False
        with cluster.http() as http, http.stream("POST", "/v1/completions", json=body) as r:
            replica = replica_of[k] = r.headers["x-softprompt-replica"]
            first = True
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    errored = True
                    continue
                tokens.extend(event["choices"][0]["token_ids"])
                if first:
                    first = False
                    started.wait(60)
        streams[k] = (replica, tokens, errored)

    threads = [threading.Thread(target=stream, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    started.wait(60)  # both streams have tokens: now load the replicas and kill the one serving stream 0
    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(plain, job) for job in jobs]
        # kill only once the victim runs a plain request besides its streams (its task t0 lives there): on a
        # busy machine the ingress may take a while to route the burst
        victim = replica_of[0]
        streams_on_victim = sum(replica == victim for replica in replica_of.values())
        deadline = time.monotonic() + 60
        while True:
            report = cluster.health()["replicas"].get(victim, {})
            if report.get("running", 0) + report.get("waiting", 0) > streams_on_victim:
                break
            assert time.monotonic() < deadline, f"no plain request reached the victim: {report}"
            time.sleep(0.05)
        ray.kill(ray.get_actor(Cluster.replica_actors()[victim], namespace="serve"), no_restart=True)
        for f in futures:
            f.result()
    for t in threads:
        t.join(120)

    for task, k in jobs:
        r = results[k]
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["token_ids"] == cluster.expected(task, ids_for(k), plain_tokens, ignore_eos=True)
    assert cluster.health()["retries"] >= 1  # some requests were on the killed replica
    for k, (replica, tokens, errored) in streams.items():
        want = cluster.expected(TASKS[k], ids_for(k), stream_tokens, ignore_eos=True)
        if replica == victim:
            assert errored and tokens == want[:len(tokens)] and len(tokens) < len(want)
        else:
            assert not errored and tokens == want

    deadline = time.monotonic() + 120  # Serve replaces the dead replica
    while True:
        state = serve.status().applications["softprompt"].deployments["SoftPromptReplica"]
        running = state.replica_states.get("RUNNING", 0)
        if running == 2 and victim not in cluster.replica_ids():
            break
        assert time.monotonic() < deadline, f"the replica was not replaced: {state}"
        time.sleep(0.5)
    with ThreadPoolExecutor(4) as pool:  # and the replacement answers correctly
        responses = list(pool.map(lambda k: cluster.complete(TASKS[k], ids_for(k)), range(len(TASKS))))
    for k, r in enumerate(responses):
        assert r.status_code == 200 and r.json()["choices"][0]["token_ids"] == cluster.expected(TASKS[k], ids_for(k))
