"""AsyncEngine: concurrent asyncio callers share one continuous batch and get the tokens the reference path gives."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest

from softprompt import AsyncEngine, BeamSearchParams, Engine, Request, SamplingParams
from softprompt.engine.async_engine import EngineStopped
from softprompt.engine.errors import PromptError, RequestError, SamplingParamsError, UnknownPromptError

from .runtime_helpers import assert_no_leaks, make_requests, register_tasks, run


def _engines(model_dir_for, **kwargs) -> tuple[Engine, Engine, list[str | None]]:
    d = model_dir_for("llama")
    ref = Engine(d, device="cpu", dtype="float32", backend="reference")
    eng = Engine(d, device="cpu", dtype="float32", backend="torch", **kwargs)
    return ref, eng, register_tasks([ref, eng], 4) + [None]


def test_concurrent_generate_calls_share_a_batch_and_match_the_reference(model_dir_for):
    ref, eng, names = _engines(model_dir_for)
    specs = make_requests(names, 10, seed=2, max_new_tokens=6)
    want = run(ref, specs)
    step, batch_sizes = eng.step, []

    def counting_step():
        outputs = step()
        batch_sizes.append(len(outputs))
        return outputs

    eng.step = counting_step

    async def main():
        async with AsyncEngine(eng) as engine:
            async def one(spec):
                outs = [out async for out in engine.generate(Request(**spec))]
                # cumulative outputs, growing; only the last is finished
                assert all(not o.finished for o in outs[:-1]) and outs[-1].finished
                assert all(a.token_ids == b.token_ids[:len(a.token_ids)] for a, b in zip(outs, outs[1:]))
                return outs[-1].token_ids

            got = await asyncio.gather(*(one(s) for s in specs))
            batch = await engine.generate_all([Request(**s) for s in specs])
            return got, [o.token_ids for o in batch]

    got, batch = asyncio.run(main())
    assert got == want and batch == want
    assert max(batch_sizes) > 5  # the callers' requests ran together
    assert_no_leaks(eng)


def test_a_refused_request_raises_and_the_others_run_on(model_dir_for):
    ref, eng, names = _engines(model_dir_for)
    spec = make_requests(["task0"], 1, seed=3, max_new_tokens=5)[0]

    async def main():
        async with AsyncEngine(eng) as engine:
            good = asyncio.create_task(engine.generate_all([Request(**spec)]))
            with pytest.raises(UnknownPromptError, match="unknown prompt 'nope'"):
                async for _ in engine.generate(Request(prompt="nope", input_ids=[5, 6])):
                    pass
            with pytest.raises(RequestError):
                async for _ in engine.generate(Request(input_ids=[5] * 10_000)):
                    pass
            with pytest.raises(PromptError):  # one bad request of several: none is admitted
                await engine.generate_all([Request(**spec), Request(prompt="nope", input_ids=[1])])
            return (await good)[0].token_ids

    assert asyncio.run(main()) == run(ref, [spec])[0]
    assert_no_leaks(eng)


def test_leaving_a_stream_early_or_aborting_frees_the_request(model_dir_for):
    _, eng, _ = _engines(model_dir_for)
    params = SamplingParams(max_new_tokens=200, ignore_eos=True)
    abort, aborted = eng.abort, []

    def recording_abort(request_id):
        aborted.append(request_id)
        return abort(request_id)

    eng.abort = recording_abort

    async def aborted_soon(request_id):
        for _ in range(200):
            if request_id in aborted:
                return True
            await asyncio.sleep(0.01)
        return False

    async def main():
        async with AsyncEngine(eng) as engine:
            first = Request(prompt="task1", input_ids=[5, 6, 7], sampling=params)
            async for out in engine.generate(first):
                if len(out.token_ids) >= 2:
                    break  # the generator is closed once dropped: the request is aborted
            assert await aborted_soon(first.request_id)
            request = Request(prompt="task2", input_ids=[8, 9], sampling=params)
            outs = []
            async for out in engine.generate(request):
                outs.append(out)
                if len(outs) == 2:
                    await engine.abort(request.request_id)
            assert outs[-1].finished and outs[-1].finish_reason == "abort" and len(outs[-1].token_ids) < 200

            async def consume(request):
                async for _ in engine.generate(request):
                    pass

            for delay in (0.2, 0.05, 0.11, 0.03, 0.17):  # cancellations land at different points of the stream
                third = Request(prompt="task0", input_ids=[4], sampling=params)
                task = asyncio.create_task(consume(third))
                await asyncio.sleep(delay)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                assert await aborted_soon(third.request_id)
            for _ in range(100):  # the abort is queued to the engine thread
                if not await engine.run(lambda e: e.has_unfinished_requests()):
                    break
                await asyncio.sleep(0.02)
            await engine.run(assert_no_leaks)

    asyncio.run(asyncio.wait_for(main(), timeout=120))  # a stream that never ends fails instead of hanging


def test_prompts_change_between_steps_and_shutdown_ends_streams(model_dir_for):
    ref, eng, _ = _engines(model_dir_for)
    ref.add_prompt("late", text="a late prompt")
    spec = {"prompt": "late", "input_ids": [5, 6], "sampling": SamplingParams(max_new_tokens=4, ignore_eos=True)}

    async def main():
        engine = AsyncEngine(eng)
        long = asyncio.create_task(engine.generate_all(
            [Request(prompt="task0", input_ids=[5], sampling=SamplingParams(max_new_tokens=10_000, ignore_eos=True))]))
        prompt = await engine.add_prompt("late", text="a late prompt")
        assert prompt.length > 0 and "late" in await engine.run(lambda e: e.prompts.names())
        [out] = await engine.generate_all([Request(**spec)])
        await engine.remove_prompt("late")
        with pytest.raises(UnknownPromptError):
            await engine.remove_prompt("late")
        engine.shutdown()
        assert not engine.running
        with pytest.raises(EngineStopped):
            await long
        with pytest.raises(EngineStopped):
            await engine.generate_all([Request(**spec)])
        return out.token_ids

    assert asyncio.run(main()) == run(ref, [spec])[0]
    with pytest.raises(TypeError, match="built Engine"):
        AsyncEngine(eng, device="cpu")


def test_structured_outputs_compile_off_the_engine_thread(model_dir_for):
    """A JSON-schema request through AsyncEngine: compiled on a worker thread before it is submitted (the engine
    thread only finds it cached), its tokens those of Engine.generate; a bad regex is refused by name."""
    ref, eng, _ = _engines(model_dir_for)
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    request = Request(text="the cat", sampling=SamplingParams(max_new_tokens=30, guided_json=schema,
                                                              disable_any_whitespace=True))
    cache = eng.structured_outputs
    compile_, threads = cache.compile, []

    def recording(*args):
        threads.append(threading.current_thread().name)
        return compile_(*args)

    cache.compile = recording

    async def main():
        async with AsyncEngine(eng) as engine:
            [out] = await engine.generate_all([request])
            with pytest.raises(RequestError, match="invalid guided_regex"):
                await engine.generate_all([Request(text="x", sampling=SamplingParams(guided_regex="[a-"))])
            return out

    out = asyncio.run(main())
    assert out.token_ids == ref.generate([request])[0].token_ids and set(json.loads(out.text)) == {"ok"}
    assert threads[0] != "softprompt-engine-loop" and "softprompt-engine-loop" in threads
    assert_no_leaks(eng)


def test_beam_search_beside_other_requests(model_dir_for):
    ref, eng, names = _engines(model_dir_for)
    specs = make_requests(names, 4, seed=5, max_new_tokens=8)
    searched = [Request(prompt=names[0], input_ids=[5, 6, 7, 8]), Request(input_ids=[9, 10, 11])]
    params = BeamSearchParams(3, max_new_tokens=5, length_penalty=0.7)
    want = ref.beam_search(searched, params)

    async def main():
        async with AsyncEngine(eng) as engine:
            others = asyncio.create_task(engine.generate_all([Request(**s) for s in specs]))
            beams = await engine.beam_search(searched, params)
            with pytest.raises(SamplingParamsError, match="beam_width 20"):
                await engine.beam_search(searched, BeamSearchParams(20))
            return beams, [o.token_ids for o in await others]

    beams, others = asyncio.run(main())
    assert [[s.token_ids for s in o.sequences] for o in beams] == [[s.token_ids for s in o.sequences] for o in want]
    assert [s.score for o in beams for s in o.sequences] == pytest.approx(
        [s.score for o in want for s in o.sequences], abs=1e-5)
    assert others == run(ref, specs)
    assert_no_leaks(eng)
