"""vLLM's use_beam_search on /v1/completions and /v1/chat/completions: n is the beam width and the n choices are
Engine.beam_search's hypotheses, best first (prompts batched, tasks' soft prompts, other requests served beside);
what would change the search is refused by name."""

from __future__ import annotations

import threading

import pytest

from softprompt import BeamSearchParams, Request, SamplingParams


def expected(served, requests: list[Request], params: BeamSearchParams):
    return served.reference.beam_search(requests, params)


def test_completions_beams_are_engine_beam_search(served):
    http = served.server.client()
    body = {"model": "a", "prompt": [[5, 6, 7, 8], [9, 10]], "max_tokens": 6, "n": 3, "use_beam_search": True,
            "return_token_ids": True, "length_penalty": 0.5}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    want = expected(served, [Request(prompt="a", input_ids=[5, 6, 7, 8]), Request(prompt="a", input_ids=[9, 10])],
                    BeamSearchParams(3, max_new_tokens=6, length_penalty=0.5))
    assert [c["token_ids"] for c in choices] == [s.token_ids for out in want for s in out.sequences]
    assert [c["text"] for c in choices] == [s.text for out in want for s in out.sequences]
    assert [c["index"] for c in choices] == list(range(6)) and {c["finish_reason"] for c in choices} == {"length"}
    usage = r.json()["usage"]
    assert usage["prompt_tokens"] == 6 and usage["completion_tokens"] == 36
    served.server.assert_pool_empty()


def test_chat_beams_while_other_requests_run(served):
    client = served.server.openai()
    messages = [{"role": "user", "content": "the cat"}]
    results = {}

    def other():  # a plain streamed request served beside the search's steps
        results["other"] = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="b", messages=messages, max_tokens=20, temperature=0, stream=True))

    thread = threading.Thread(target=other)
    thread.start()
    got = client.chat.completions.create(model="polite", messages=messages, max_tokens=5, n=2,
                                         extra_body={"use_beam_search": True, "early_stopping": "never"})
    thread.join()
    want = expected(served, [Request(prompt="polite", messages=messages)],
                    BeamSearchParams(2, max_new_tokens=5, early_stopping="never"))[0]
    assert [c.message.content for c in got.choices] == [s.text for s in want.sequences]
    plain = served.expected([Request(prompt="b", messages=messages,
                                     sampling=SamplingParams(max_new_tokens=20))])[0]
    assert results["other"] == plain.text
    served.server.assert_pool_empty()


@pytest.mark.parametrize("extra, param", [
    ({"stream": True}, "use_beam_search"),
    ({"logprobs": 2}, "logprobs"),
    ({"echo": True}, "echo"),
    ({"stop": ["x"]}, "stop"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"guided_choice": ["a", "b"]}, "guided_choice"),
    ({"early_stopping": "sometimes"}, "early_stopping"),
])
def test_what_would_change_the_search_is_refused(served, extra, param):
    r = served.server.client().post("/v1/completions", json={"model": "a", "prompt": [5, 6], "max_tokens": 3, "n": 2,
                                                             "use_beam_search": True, **extra})
    assert r.status_code in (400, 422), r.text
    assert param in r.text
    served.server.assert_pool_empty()


def test_too_wide_a_beam_is_refused(served):
    r = served.server.client().post("/v1/completions", json={"model": "a", "prompt": [5, 6], "max_tokens": 3,
                                                             "n": 20, "use_beam_search": True})
    assert r.status_code == 400 and "log-probabilities a step" in r.json()["error"]["message"]
