"""Bad input gets a clear ValueError naming the problem, and never disturbs other requests."""

from __future__ import annotations

import pytest
import torch

from softprompt import Engine, Request, SamplingParams
from softprompt.engine.errors import RequestError, SamplingParamsError, SoftPromptError, UnknownPromptError

from .runtime_helpers import assert_no_leaks, make_requests, register_tasks


@pytest.fixture(scope="module")
def engine(model_dir_for):
    e = Engine(model_dir_for("llama"), device="cpu", dtype="float32", backend="torch")
    register_tasks([e], 3)
    return e


BAD_REQUESTS = [
    (dict(prompt="nope", input_ids=[5]), UnknownPromptError, "unknown prompt 'nope'"),
    (dict(prompt="task0", input_ids=[]), RequestError, "empty"),
    (dict(prompt="task0", text=""), RequestError, "empty"),
    (dict(prompt="task0"), RequestError, "exactly one"),
    (dict(prompt="task0", input_ids=[5], text="x"), RequestError, "exactly one"),
    (dict(prompt="task0", input_ids=[5, 512]), RequestError, "token id 512 is out of range"),
    (dict(prompt="task0", input_ids=[-1]), RequestError, "out of range"),
    (dict(prompt="task0", input_ids=["a"]), RequestError, "list of integers"),
    (dict(prompt="task0", input_ids=[5] * 300), RequestError, "no room"),
    (dict(prompt="task0", input_ids=[5], sampling={"temperature": 1}), RequestError, "SamplingParams"),
]


@pytest.mark.parametrize("kwargs, error, message", BAD_REQUESTS)
def test_bad_requests_rejected_while_others_run(engine, kwargs, error, message):
    good = make_requests(["task0", "task1", None], 3, seed=20, max_new_tokens=6)
    expected = [o.token_ids for o in engine.generate([Request(**g) for g in good])]
    ids = [engine.add_request(Request(**g)) for g in good]
    engine.step()  # the good ones are mid-flight
    with pytest.raises(error, match=message) as info:
        engine.add_request(Request(**kwargs))
    assert isinstance(info.value, ValueError)
    with pytest.raises(error):  # generate validates everything before queueing anything
        engine.generate([Request(**good[0]), Request(**kwargs)])
    outs = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            outs[o.request_id] = o
    assert [outs[i].token_ids for i in ids] == expected
    assert_no_leaks(engine)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-2), "top_k"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=2.5), "max_new_tokens"),
        (dict(seed="x"), "seed"),
        (dict(logprobs=21), "logprobs"),
        (dict(stop=[""]), "stop"),
        (dict(stop_token_ids=[-3]), "stop_token_ids"),
        (dict(include_stop_str_in_output=1), "include_stop_str_in_output must be true or false"),
        (dict(skip_special_tokens="no"), "skip_special_tokens must be true or false"),
    ],
)
def test_bad_sampling_params(kwargs, message):
    with pytest.raises(SamplingParamsError, match=message):
        SamplingParams(**kwargs)


def test_too_long_for_pool(model_dir_for):
    e = Engine(model_dir_for("gpt2"), device="cpu", dtype="float32", backend="torch", kv_cache_bytes=4 * 16384)
    with pytest.raises(RequestError, match="KV blocks"):
        e.add_request(Request(input_ids=[5] * 100, sampling=SamplingParams(max_new_tokens=60)))
    assert not e.has_unfinished_requests()


def test_prompt_too_big_for_pool_rejected(model_dir_for):
    from softprompt.engine.errors import PromptError

    e = Engine(model_dir_for("gpt2"), device="cpu", dtype="float32", backend="torch", kv_cache_bytes=4 * 16384)
    e.add_prompt("small", torch.randn(3, 64), precompute=True)
    with pytest.raises(PromptError, match="does not fit the KV pool"):
        e.add_prompt("small", torch.randn(60, 64), replace=True)
    assert e.prompts.get("small").length == 3  # the old version is still registered
    with pytest.raises(PromptError, match="does not fit"):
        e.add_prompt("big", torch.randn(60, 64))
    assert "big" not in e.prompts


def test_output_capped_at_max_positions(engine):
    p = engine.prompts.get("task0").length
    n = engine.config.max_positions - p - 3
    out = engine.generate([Request(prompt="task0", input_ids=[7] * n,
                                   sampling=SamplingParams(max_new_tokens=50, ignore_eos=True))])[0]
    assert len(out.token_ids) == 3 and out.finish_reason == "length"


def test_duplicate_request_id(engine):
    engine.add_request(Request(input_ids=[5], request_id="dup"))
    with pytest.raises(RequestError, match="already in use"):
        engine.add_request(Request(input_ids=[6], request_id="dup"))
    engine.abort("dup")
    assert_no_leaks(engine)


def test_remove_prompt_lets_running_requests_finish(model_dir_for):
    d = model_dir_for("bloom")
    e = Engine(d, device="cpu", dtype="float32", backend="torch")
    ref = Engine(d, device="cpu", dtype="float32", backend="reference")
    rows = torch.randn(7, 64)
    e.add_prompt("gone", rows), ref.add_prompt("gone", rows)
    spec = make_requests(["gone"], 1, seed=21, max_new_tokens=8)[0]
    rid = e.add_request(Request(**spec))
    e.step()
    e.remove_prompt("gone")
    with pytest.raises(UnknownPromptError):
        e.add_request(Request(**spec))
    outs = {}
    while e.has_unfinished_requests():
        for o in e.step():
            outs[o.request_id] = o
    assert outs[rid].token_ids == ref.generate([Request(**spec)])[0].token_ids
    assert_no_leaks(e)
    assert not e.prefix_cache.entries  # the removed prompt's prefix was dropped when its last user finished


def test_unknown_backend(model_dir_for):
    with pytest.raises(SoftPromptError, match="backend"):
        Engine(model_dir_for("llama"), backend="vllm")


def test_pool_sized_by_bytes_or_fraction(model_dir_for):
    from softprompt.engine.kv_pool import KVPool, available_memory_bytes

    d = model_dir_for("llama")
    by_bytes = Engine(d, device="cpu", backend="torch", kv_cache_bytes=10 * 8192)
    assert by_bytes.pool.num_blocks == 10 * 8192 // KVPool.bytes_per_block(by_bytes.config, 16, torch.float32)
    by_fraction = Engine(d, device="cpu", backend="torch", kv_cache_fraction=0.0001)
    per_block = KVPool.bytes_per_block(by_fraction.config, 16, torch.float32)
    expected = available_memory_bytes(torch.device("cpu")) * 0.0001 / per_block
    assert 0.5 * expected <= by_fraction.pool.num_blocks <= 2 * expected
    with pytest.raises(SoftPromptError, match="kv_cache_fraction"):
        Engine(d, device="cpu", backend="torch", kv_cache_fraction=1.5)
