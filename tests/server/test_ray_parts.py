"""The Ray Serve deployment's parts that need no cluster: the in-process ASGI call, the shared prompt directory,
the routing key, and the `serve run` argument parsing."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
from types import SimpleNamespace

import pytest
from safetensors.torch import save_file

from softprompt import Request, SamplingParams
from softprompt.engine.errors import PromptError, UnknownPromptError
from softprompt.engine.server.app import create_app
from softprompt.engine.server.asgi_call import ForwardedRequest, ResponseHead, call_asgi
from softprompt.engine.server.ray_routing import RoundRobinRouter, TaskAffinityRouter, rendezvous_order
from softprompt.engine.server.ray_serve import RayServeSettings, app_builder, public_name, routed_prompt
from softprompt.engine.server.registry import PromptRegistry
from softprompt.engine.server.shared_prompts import SharedPrompts
from softprompt.testing import build_prompt_tensor

from .support import make_engine


def post(path: str, body: dict) -> ForwardedRequest:
    return ForwardedRequest("POST", path, json.dumps(body).encode(), b"",
                            ((b"content-type", b"application/json"),))


async def collect(app, request: ForwardedRequest, stop_after: int | None = None) -> tuple[ResponseHead, list[bytes]]:
    head, chunks = None, []
    parts = call_asgi(app, request)
    try:
        async for part in parts:
            if isinstance(part, ResponseHead):
                head = part
                chunks.append(part.body)
            else:
                chunks.append(part)
            if stop_after is not None and len(chunks) >= stop_after:
                break
    finally:
        await parts.aclose()
    return head, chunks


@pytest.fixture
def app_and_engines(model_dir_for, adapter_for):
    model, adapter = model_dir_for("llama"), adapter_for("llama", seed=0)
    engine, reference = make_engine(model), make_engine(model)
    registry = PromptRegistry()
    registry.register(engine, "a", adapter)
    reference.add_prompt("a", adapter)
    app = create_app(engine, registry)
    app.state.loop.start()
    yield app, engine, reference
    app.state.loop.stop()
    registry.close()


def test_call_asgi_serves_the_single_process_app(app_and_engines):
    app, engine, reference = app_and_engines
    [want] = reference.generate(Request(prompt="a", input_ids=[5, 6, 7], sampling=SamplingParams(max_new_tokens=6)))

    async def run():
        plain = await collect(app, post("/v1/completions", {"model": "a", "prompt": [5, 6, 7], "max_tokens": 6,
                                                            "temperature": 0, "return_token_ids": True}))
        streamed = await collect(app, post("/v1/completions", {"model": "a", "prompt": [5, 6, 7], "max_tokens": 6,
                                                               "temperature": 0, "stream": True,
                                                               "return_token_ids": True}))
        missing = await collect(app, post("/v1/completions", {"model": "zzz", "prompt": "x"}))
        return plain, streamed, missing

    (head, chunks), (shead, schunks), (mhead, mchunks) = asyncio.run(run())
    assert head.status == 200 and not head.more and len(chunks) == 1
    assert json.loads(head.body)["choices"][0]["token_ids"] == want.token_ids
    assert shead.status == 200 and shead.more and shead.header(b"content-type").startswith(b"text/event-stream")
    events = [line[6:] for line in b"".join(schunks).decode().split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert [t for e in events[:-1] for t in json.loads(e)["choices"][0]["token_ids"]] == want.token_ids
    assert mhead.status == 404 and json.loads(mhead.body)["error"]["code"] == "model_not_found"


def test_closing_the_call_early_aborts_the_request(app_and_engines):
    """A caller that goes away (the ingress cancelled: its client left) frees the request's KV."""
    app, engine, _ = app_and_engines
    body = {"model": "a", "prompt": [5, 6, 7], "max_tokens": 200, "temperature": 0, "stream": True,
            "ignore_eos": True}

    async def run():
        return await collect(app, post("/v1/completions", body), stop_after=2)

    head, chunks = asyncio.run(run())
    assert head.status == 200 and len(chunks) == 2
    loop = app.state.loop
    assert loop.call(lambda e: e.has_unfinished_requests()).result(10) is False
    assert loop.call(lambda e: e.kv_is_idle()).result(10) and app.state.admission.in_flight == 0


def test_shared_prompts_find_sources_and_refuse_what_is_not_a_prompt(tmp_path, adapter_for):
    root = tmp_path / "prompts"
    shutil.copytree(adapter_for("llama", seed=0), root / "sentiment")
    save_file({"p": build_prompt_tensor(64, 3)}, str(root / "summary.safetensors"))
    (root / "notes.txt").write_text("not a prompt")
    pickled = root / "old"
    pickled.mkdir()
    shutil.copy(adapter_for("llama", seed=0) / "adapter_config.json", pickled)
    (pickled / "adapter_model.bin").write_bytes(b"never unpickled")
    outside = tmp_path / "outside"
    shutil.copytree(adapter_for("llama", seed=1), outside)
    os.symlink(outside, root / "escape")
    extra = tmp_path / "extra.safetensors"
    save_file({"p": build_prompt_tensor(64, 2)}, str(extra))
    prompts = SharedPrompts(root, sources={"extra": extra}, texts={"polite": "be polite:"})

    assert prompts.find("sentiment").path == (root / "sentiment").resolve()
    assert prompts.find("sentiment").length == 8
    assert prompts.find("summary").path == (root / "summary.safetensors").resolve()
    assert prompts.find("extra").path == extra.resolve() and prompts.find("polite").text == "be polite:"
    assert prompts.names() == ["extra", "polite", "sentiment", "summary"]
    assert [prompts.find(n).kind for n in prompts.names()] == ["tensor", "text", "peft", "tensor"]
    for name in ("notes", "escape", "../outside", "base", "a/b", "", "missing", "summary.safetensors"):
        with pytest.raises(UnknownPromptError):
            prompts.find(name)
    with pytest.raises(PromptError, match="adapter_model.safetensors"):
        prompts.find("old")

    source = prompts.find("summary")
    before = source.signature()
    save_file({"p": build_prompt_tensor(64, 4)}, str(root / "summary.safetensors"))
    assert source.signature() != before
    (root / "summary.safetensors").unlink()
    with pytest.raises(UnknownPromptError):
        source.signature()


def test_shared_prompts_tell_a_prefix_tuning_adapter_by_its_config(tmp_path, model_dir_for):
    pytest.importorskip("peft")
    from softprompt.testing import build_cartridge_adapter, build_prefix_tuning_adapter

    root = tmp_path / "prompts"
    build_prefix_tuning_adapter(model_dir_for("llama"), root / "kv", num_virtual_tokens=5)
    build_cartridge_adapter(model_dir_for("llama"), root / "cart", num_virtual_tokens=3)
    source = SharedPrompts(root).find("kv")
    assert (source.kind, source.length) == ("prefix", 5)
    assert (SharedPrompts(root).find("cart").kind, SharedPrompts(root).find("cart").length) == ("prefix", 3)


def test_a_start_up_source_names_a_task_of_a_multitask_adapter(tmp_path, model_dir_for):
    pytest.importorskip("peft")
    from softprompt.testing import build_multitask_prompt_tuning_adapter

    mpt = build_multitask_prompt_tuning_adapter(model_dir_for("llama"), tmp_path / "mpt", num_virtual_tokens=4)
    shared = SharedPrompts(sources={"t2": f"{mpt}#2", "plain": mpt})
    source = shared.find("t2")
    assert (source.path, source.task_id, source.kind, source.length) == (mpt.resolve(), 2, "peft", 4)
    assert shared.find("plain").task_id is None
    assert source.signature() == shared.find("plain").signature()


def test_routing_key_is_the_task_of_a_valid_body():
    assert routed_prompt(b'{"model": "sentiment", "prompt": "x"}') == "sentiment"
    assert routed_prompt(b'{"model": "sentiment@3"}') == "sentiment"
    assert routed_prompt(b'{"model": "base"}') == ""
    for body in (b"not json", b"[1, 2]", b'{"model": 5}', b'{"model": "../etc"}', b"\xff\xfe"):
        assert routed_prompt(body) == ""
    assert public_name("sentiment.v12") == "sentiment" and public_name("a.v1.v2") == "a.v1"


def test_serve_run_arguments_are_parsed_and_checked(tmp_path):
    app = app_builder({"model_dir": str(tmp_path), "replicas": "3", "replica_cpus": "0.5",
                       "prompts": '{"a": "x.safetensors"}', "routing": "round-robin"})
    assert app is not None
    with pytest.raises(ValueError, match="unknown argument"):
        app_builder({"model_dir": str(tmp_path), "replica": "3"})
    with pytest.raises(ValueError, match="routing"):
        RayServeSettings(model_dir=str(tmp_path), routing="random")
    s = RayServeSettings(model_dir="rel", prompt_dir="p", prompts={"a": "b"})
    assert os.path.isabs(s.model_dir) and os.path.isabs(s.prompt_dir) and os.path.isabs(s.prompts["a"])


@dataclasses.dataclass(frozen=True)
class _ReplicaId:  # hashable, like Serve's ReplicaID
    unique_id: str


def _replicas(*ids: str) -> list[SimpleNamespace]:
    return [SimpleNamespace(replica_id=_ReplicaId(i)) for i in ids]


def _router(cls, **state):
    router = cls.__new__(cls)  # the routing decision only: no Serve machinery behind it
    router._multiplexed_model_id_to_replica_ids = {}
    router.initialize_state(**state)
    return router


def _pending(task: str):
    return SimpleNamespace(metadata=SimpleNamespace(multiplexed_model_id=task, internal_request_id=task))


def test_task_affinity_router_prefers_holders_then_the_home_and_yields_to_load():
    replicas = _replicas("r0", "r1", "r2")
    router = _router(TaskAffinityRouter, imbalance=4)
    choose = lambda task: asyncio.run(router.choose_replicas(replicas, _pending(task)))  # noqa: E731

    homes = {}
    for task in (f"task{i}" for i in range(12)):
        first, rest = choose(task)
        assert len(first) == 1 and first[0].replica_id.unique_id == rendezvous_order(task, ["r0", "r1", "r2"])[0]
        assert choose(task)[0] == first and sorted(r.replica_id.unique_id for r in rest) == ["r0", "r1", "r2"]
        homes[task] = first[0]
    assert len({h.replica_id.unique_id for h in homes.values()}) > 1  # tasks spread over replicas
    task, home = "task0", homes["task0"]
    others = [r for r in replicas if r is not home]
    router._multiplexed_model_id_to_replica_ids[task] = {others[0].replica_id, others[1].replica_id}
    assert set(map(id, choose(task)[0])) == {id(others[0]), id(others[1])}  # holders first, the home after
    for _ in range(5):  # both holders 5 requests busier than the idle home: past the imbalance of 4
        for r in others:
            router.on_request_routed(_pending(f"x{id(r)}{_}"), r.replica_id, None)
    assert choose(task) == [replicas]  # the least loaded of all
    router.on_request_completed(others[0].replica_id, f"x{id(others[0])}0")
    router.on_request_completed(others[1].replica_id, f"x{id(others[1])}0")
    assert set(map(id, choose(task)[0])) == {id(others[0]), id(others[1])}  # 4 more: affinity again
    assert choose("") == [replicas]  # the bare model: the least loaded


def test_round_robin_router_takes_turns():
    replicas = _replicas("r2", "r0", "r1")
    router = _router(RoundRobinRouter)
    picks = [asyncio.run(router.choose_replicas(replicas, _pending("t")))[0][0].replica_id.unique_id for _ in range(6)]
    assert picks == ["r0", "r1", "r2", "r0", "r1", "r2"]
