"""Priority scheduling (vLLM's `--scheduling-policy priority`): waiting requests are admitted by priority (lower
first), then arrival; the least urgent running request is the one preempted; outputs stay equal to the
reference whatever the order; first come, first served refuses a priority rather than ignore it."""

from __future__ import annotations

import pytest
import torch

from softprompt import Engine, Request, SamplingParams
from softprompt.engine.errors import RequestError, SoftPromptError
from softprompt.engine.kv_pool import KVPool

from .runtime_helpers import assert_no_leaks


def finish_order(engine: Engine, requests: list[Request], outputs: dict | None = None) -> list[str]:
    """The request ids in the order they finish (their final outputs into `outputs`)."""
    for r in requests:
        engine.add_request(r)
    order = []
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                order.append(o.request_id)
                if outputs is not None:
                    outputs[o.request_id] = o.token_ids
    return order


def test_waiting_requests_go_by_priority_then_arrival(model_dir_for):
    d = model_dir_for("llama")
    params = SamplingParams(max_new_tokens=3)
    requests = lambda: [Request(input_ids=[5 + i, 6], sampling=params, request_id=f"p{p}-{i}", priority=p)  # noqa
                        for i, p in enumerate([5, 0, 3, 0, -2])]
    one_at_a_time = dict(device="cpu", max_num_seqs=1)
    assert finish_order(Engine(d, scheduling_policy="priority", **one_at_a_time), requests()) == [
        "p-2-4", "p0-1", "p0-3", "p3-2", "p5-0"]
    fcfs = Engine(d, **one_at_a_time)
    assert finish_order(fcfs, [Request(input_ids=[5 + i, 6], sampling=params, request_id=f"r{i}")
                               for i in range(3)]) == ["r0", "r1", "r2"]
    with pytest.raises(RequestError, match="priority needs Engine\\(scheduling_policy='priority'\\)"):
        fcfs.add_request(Request(input_ids=[5], priority=1))
    with pytest.raises(RequestError, match="priority must be an integer"):
        Engine(d, device="cpu", scheduling_policy="priority").add_request(Request(input_ids=[5], priority=1.5))
    with pytest.raises(SoftPromptError, match="scheduling_policy must be one of fcfs, priority"):
        Engine(d, device="cpu", scheduling_policy="lifo")
    assert not fcfs.has_unfinished_requests()  # the refused request left nothing behind


def test_the_least_urgent_running_request_is_preempted(model_dir_for):
    d = model_dir_for("llama")
    ref = Engine(d, device="cpu", backend="reference")
    bpb = KVPool.bytes_per_block(ref.config, 4, torch.float32)
    eng = Engine(d, device="cpu", backend="torch", block_size=4, kv_cache_bytes=14 * bpb,
                 scheduling_policy="priority", enable_prefix_caching=False)
    # four requests that fit at first and outgrow the pool together; the least urgent arrives first, the most
    # urgent last (first come, first served would preempt the newest)
    requests = [Request(input_ids=list(range(5 + i, 13 + i)), request_id=f"r{i}", priority=p,
                        sampling=SamplingParams(max_new_tokens=12, ignore_eos=True))
                for i, p in enumerate([2, 1, 1, 0])]
    preempted = []
    original = eng.scheduler._preempt
    eng.scheduler._preempt = lambda seq: (preempted.append(seq.request.request_id), original(seq))[1]
    got: dict[str, list[int]] = {}
    order = finish_order(eng, requests, got)
    assert preempted[0] == "r0" and "r3" not in preempted  # the least urgent goes first, the most urgent never
    assert order[0] == "r3"
    want = {o.request_id: o.token_ids for o in ref.generate(
        [Request(input_ids=r.input_ids, request_id=r.request_id, sampling=r.sampling) for r in requests])}
    assert got == want  # recomputed after preemption, in another order: the same tokens
    assert_no_leaks(eng)
