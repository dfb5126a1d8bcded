"""The official openai client against a real server: results equal Engine.generate for the same requests."""

from __future__ import annotations

import json
import math
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

import softprompt
from softprompt import Request, SamplingParams


def sp(**kw) -> SamplingParams:
    return SamplingParams(**kw)


def test_models_list_names_prompts_with_version_and_length(served):
    models = {m.id: m for m in served.server.openai().models.list().data}
    assert set(models) == {"base", "a", "b", "polite"}
    assert models["a"].length == 8 and models["b"].length == 5 and models["base"].length == 0
    assert models["a"].version == 1 and models["a"].kind == "peft" and models["polite"].kind == "text"
    assert models["a"].content_hash == served.reference.prompts.get("a").version


def test_models_retrieve_and_version(served):
    """OpenAI's GET /v1/models/{model} (the client's models.retrieve) for the base model, a prompt and a pinned
    version; an unknown one is a 404 naming it. vLLM's GET /version."""
    client = served.server.openai()
    listed = {m.id: m for m in client.models.list().data}
    for name in ("base", "a", "polite"):
        assert client.models.retrieve(name).model_dump() == listed[name].model_dump()
    pinned = client.models.retrieve("a@1")
    assert pinned.id == "a@1" and pinned.model_extra["version"] == 1
    assert client.models.retrieve(f"a@{listed['a'].content_hash}").model_extra["length"] == 8
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("nope")
    assert "nope" in e.value.message
    http = served.server.client()
    assert http.get("/version").json() == {"version": softprompt.__version__}


def test_completion_greedy_with_logprobs_equals_engine_generate(served):
    client = served.server.openai()
    got = client.completions.create(model="a", prompt="the cat sat on", max_tokens=10, temperature=0, logprobs=3,
                                    extra_body={"return_token_ids": True})
    [want] = served.expected(Request(prompt="a", text="the cat sat on",
                                     sampling=sp(max_new_tokens=10, logprobs=3)))
    choice = got.choices[0]
    assert choice.model_extra["token_ids"] == want.token_ids
    assert choice.text == want.text and choice.finish_reason == want.finish_reason
    assert got.model == "a" and got.object == "text_completion"
    assert got.usage.prompt_tokens == len(want.input_ids) and got.usage.completion_tokens == len(want.token_ids)
    lp = choice.logprobs
    assert len(lp.token_logprobs) == len(want.token_ids)
    for value, top, expected in zip(lp.token_logprobs, lp.top_logprobs, want.logprobs):
        assert math.isclose(value, expected.logprob, abs_tol=1e-4)
        assert len(top) <= 3 and max(top.values()) == pytest.approx(max(expected.top.values()), abs=1e-4)
    assert "".join(lp.tokens) == choice.text  # no special tokens here: the pieces spell the text
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)


def test_streaming_matches_non_streaming_and_engine(served):
    client = served.server.openai()
    kw = dict(model="b", prompt=[5, 9, 33, 70], max_tokens=12, temperature=0.7, top_p=0.9, seed=11)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True},
                                            extra_body={"return_token_ids": True, "ignore_eos": True}, **kw))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    ids = [t for c in chunks if c.choices for t in c.choices[0].model_extra["token_ids"]]
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    usage = chunks[-1].usage
    [want] = served.expected(Request(prompt="b", input_ids=[5, 9, 33, 70], sampling=sp(
        max_new_tokens=12, temperature=0.7, top_p=0.9, seed=11, ignore_eos=True)))
    assert ids == want.token_ids and text == want.text and finish == ["length"]
    assert len(chunks) > 3  # token by token, not one blob
    assert usage.completion_tokens == 12 and usage.prompt_tokens == 4
    whole = client.completions.create(extra_body={"ignore_eos": True}, **kw)
    assert whole.choices[0].text == text
    # vLLM's continuous_usage_stats: each chunk carries the usage so far (on chat too)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True, "return_token_ids": True,
                                                        "stream_options": {"include_usage": True,
                                                                           "continuous_usage_stats": True}}, **kw))
    sent = 0
    for c in chunks[:-1]:
        sent += len(c.choices[0].model_extra["token_ids"])
        assert (c.usage.prompt_tokens, c.usage.completion_tokens, c.usage.total_tokens) == (4, sent, 4 + sent)
    assert chunks[-1].usage.completion_tokens == 12 and not chunks[-1].choices
    chat = list(client.chat.completions.create(
        model="b", messages=[{"role": "user", "content": "hi"}], max_tokens=5, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True, "stream_options": {
            "include_usage": True, "continuous_usage_stats": True}}))
    assert all(c.usage is not None for c in chat) and chat[-2].usage.completion_tokens == 5


def test_streamed_logprobs_and_choices_equal_the_whole_response(served):
    client = served.server.openai()
    kw = dict(model="polite", prompt="the old farmer", max_tokens=8, temperature=0.8, seed=3, n=2, logprobs=2)
    whole = client.completions.create(**kw)
    tokens: dict[int, list] = {0: [], 1: []}
    values: dict[int, list] = {0: [], 1: []}
    for chunk in client.completions.create(stream=True, **kw):
        for c in chunk.choices:
            tokens[c.index] += c.logprobs.tokens
            values[c.index] += c.logprobs.token_logprobs
    for c in whole.choices:
        assert tokens[c.index] == c.logprobs.tokens
        assert values[c.index] == pytest.approx(c.logprobs.token_logprobs, abs=1e-5)
    assert whole.choices[0].text != whole.choices[1].text  # seeds 3 and 4


def test_stream_never_sends_text_that_a_stop_string_later_cuts(served):
    client = served.server.openai()
    [free] = served.expected(Request(prompt="a", text="a small red bird", sampling=sp(max_new_tokens=12)))
    stop = free.text[3:6]  # a stop string that really occurs in the free-running text
    assert len(stop) == 3
    chunks = list(client.completions.create(model="a", prompt="a small red bird", max_tokens=12, temperature=0,
                                            stop=stop, stream=True))
    streamed = "".join(c.choices[0].text for c in chunks)
    [want] = served.expected(Request(prompt="a", text="a small red bird", sampling=sp(max_new_tokens=12, stop=(stop,))))
    assert streamed == want.text == free.text[: free.text.find(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_stop_string_and_special_token_text_options_pass_through(served):
    """vLLM's include_stop_str_in_output, skip_special_tokens, allowed_token_ids and bad_words (extra_body); beam
    search is refused by name."""
    client = served.server.openai()
    [free] = served.expected(Request(prompt="a", text="a small red bird", sampling=sp(max_new_tokens=12)))
    stop = free.text[3:6]
    kw = dict(model="a", prompt="a small red bird", max_tokens=12, temperature=0, stop=stop,
              extra_body={"include_stop_str_in_output": True})
    whole = client.completions.create(**kw).choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw))
    assert whole == streamed == free.text[: free.text.find(stop) + 3]
    bos = {"logit_bias": {"1": 100}, "max_tokens": 3, "temperature": 0}  # <s>, a special token, three times
    assert client.completions.create(model="a", prompt="hi", **bos).choices[0].text == ""
    kept = client.completions.create(model="a", prompt="hi", **bos, extra_body={"skip_special_tokens": False})
    chunks = client.completions.create(model="a", prompt="hi", **bos, stream=True,
                                       extra_body={"skip_special_tokens": False})
    assert kept.choices[0].text == "".join(c.choices[0].text for c in chunks) == "<s><s><s>"
    with pytest.raises(openai.UnprocessableEntityError):  # a schema error, as for every mistyped field
        client.completions.create(model="a", prompt="hi", extra_body={"skip_special_tokens": "no"})
    allowed = [40, 41, 300]
    got = client.completions.create(model="a", prompt="hi", max_tokens=6, temperature=1.0, seed=2,
                                    extra_body={"allowed_token_ids": allowed, "return_token_ids": True})
    [want] = served.expected(Request(prompt="a", text="hi", sampling=sp(max_new_tokens=6, temperature=1.0, seed=2,
                                                                        allowed_token_ids=allowed)))
    assert got.choices[0].model_extra["token_ids"] == want.token_ids and set(want.token_ids) <= set(allowed)
    with pytest.raises(openai.BadRequestError, match="allowed_token_ids"):
        client.completions.create(model="a", prompt="hi", extra_body={"allowed_token_ids": []})
    free = client.completions.create(model="a", prompt="hi", max_tokens=6, temperature=0,
                                     extra_body={"return_token_ids": True}).choices[0].model_extra["token_ids"]
    word = served.reference.tokenizer.decode(free[:1]).strip() or "x"
    got = client.completions.create(model="a", prompt="hi", max_tokens=6, temperature=0,
                                    extra_body={"bad_words": [word], "return_token_ids": True})
    [want] = served.expected(Request(prompt="a", text="hi", sampling=sp(max_new_tokens=6, bad_words=[word])))
    assert got.choices[0].model_extra["token_ids"] == want.token_ids != free
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="a", prompt="hi", stream=True, extra_body={"use_beam_search": True})
    assert e.value.body["param"] == "use_beam_search"  # (beam search: test_beam_search_server.py)


def test_guided_choice(served):
    """vLLM's guided_choice (and structured_outputs' choice) constrain the text."""
    client = served.server.openai()
    choices = [" yes", " no", " maybe so"]
    got = client.completions.create(model="a", prompt="the cat sat on", max_tokens=10, temperature=0,
                                    extra_body={"guided_choice": choices})
    [want] = served.expected(Request(prompt="a", text="the cat sat on",
                                     sampling=sp(max_new_tokens=10, guided_choice=choices)))
    assert got.choices[0].text == want.text and want.text in choices and got.choices[0].finish_reason == "stop"
    chat = client.chat.completions.create(model="a", messages=[{"role": "user", "content": "hi"}], max_tokens=10,
                                          temperature=1.0, seed=4, n=3,
                                          extra_body={"structured_outputs": {"choice": choices}})
    assert all(c.message.content in choices for c in chat.choices)


SCHEMA = {"type": "object", "properties": {"label": {"enum": ["pos", "neg"]}, "sure": {"type": "boolean"}},
          "required": ["label", "sure"]}


def test_structured_outputs_each_way_they_are_asked_for(served):
    """OpenAI's response_format (json_schema, json_object) and vLLM's guided_json / guided_regex / guided_grammar
    and structured_outputs give what Engine.generate gives for the same constraint."""
    client = served.server.openai()
    fmt = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": SCHEMA, "strict": True}}
    chat = client.chat.completions.create(model="a", messages=[{"role": "user", "content": "rate it"}],
                                          max_tokens=40, temperature=0, response_format=fmt,
                                          extra_body={"structured_outputs": {"disable_any_whitespace": True}})
    hf = served.reference.tokenizer.hf
    ids = hf(hf.apply_chat_template([{"role": "user", "content": "rate it"}], add_generation_prompt=True,
                                    tokenize=False), add_special_tokens=False)["input_ids"]
    [want] = served.expected(Request(prompt="a", input_ids=ids, sampling=sp(
        max_new_tokens=40, guided_json=SCHEMA, disable_any_whitespace=True)))
    assert chat.choices[0].message.content == want.text and set(json.loads(want.text)) == {"label", "sure"}
    cases = [({"guided_json": SCHEMA}, dict(guided_json=SCHEMA)),
             ({"guided_regex": "[0-9]{3}"}, dict(guided_regex="[0-9]{3}")),
             ({"structured_outputs": {"regex": "(yes|no)!"}}, dict(guided_regex="(yes|no)!")),
             ({"guided_grammar": 'root ::= "<" [a-c] ">"'}, dict(guided_grammar='root ::= "<" [a-c] ">"')),
             ({"response_format": {"type": "json_object"}, "structured_outputs": {"disable_any_whitespace": True}},
              dict(guided_json_object=True, disable_any_whitespace=True)),
             ({"structured_outputs": {"json": SCHEMA}}, dict(guided_json=SCHEMA))]
    for extra, kind in cases:
        got = client.completions.create(model="a", prompt="the cat sat on", max_tokens=24, temperature=1.0, seed=3,
                                        extra_body=extra)
        [want] = served.expected(Request(prompt="a", text="the cat sat on", sampling=sp(
            max_new_tokens=24, temperature=1.0, seed=3, **kind)))
        assert (got.choices[0].text, got.choices[0].finish_reason) == (want.text, want.finish_reason), extra
    assert re.fullmatch("[0-9]{3}", served.expected(Request(prompt="a", text="the cat sat on", sampling=sp(
        max_new_tokens=24, temperature=1.0, seed=3, guided_regex="[0-9]{3}")))[0].text)


def test_a_new_constraint_is_compiled_off_the_engine_thread(served, monkeypatch):
    """A grammar compile can take a while: the handler does it on a worker thread, and the engine thread (which
    keeps stepping the other requests meanwhile) finds it compiled."""
    cache = served.server.engine.structured_outputs
    compile_, compiled_on = cache.compile, []

    def recording(*args):
        compiled_on.append((threading.current_thread().name, args[:2] not in [k[:2] for k in cache._compiled]))
        return compile_(*args)

    monkeypatch.setattr(cache, "compile", recording)
    got = served.server.openai().completions.create(model="a", prompt="hi", max_tokens=8, temperature=0,
                                                     extra_body={"guided_regex": "[a-c]{1,2}7"})
    assert re.fullmatch("[a-c]{1,2}7", got.choices[0].text)
    fresh = [name for name, new in compiled_on if new]
    assert fresh and "softprompt-engine-loop" not in fresh
    assert any(name == "softprompt-engine-loop" for name, _ in compiled_on)  # prepare looked it up there


def test_vllm_prompt_logprobs(served):
    """vLLM's prompt_logprobs: per prompt token, None for the first, else its logprob and rank and the top N; with
    echo + logprobs in the same request, each shows its own top N; chat puts them beside the choices."""
    client = served.server.openai()
    http = served.server.client()
    body = {"model": "a", "prompt": "the cat sat on the mat", "max_tokens": 2, "temperature": 0,
            "prompt_logprobs": 3, "echo": True, "logprobs": 1}
    got = http.post("/v1/completions", json=body).json()["choices"][0]
    ids = served.reference.tokenizer.encode("the cat sat on the mat")
    want = served.reference.prompt_logprobs("a", ids, top_n=3)
    plp = got["prompt_logprobs"]
    assert len(plp) == len(ids) and plp[0] is None
    for position, (entries, expected) in enumerate(zip(plp[1:], want[1:]), start=1):
        mine = entries[str(ids[position])]
        assert mine["logprob"] == pytest.approx(expected.logprob, abs=1e-4) and mine["rank"] == expected.rank >= 1
        assert mine["decoded_token"] == served.reference.tokenizer.hf.decode([ids[position]])
        ranked = sorted((e for t, e in entries.items() if e["rank"] <= 3), key=lambda e: e["rank"])
        assert [e["logprob"] for e in ranked][:3] == pytest.approx(sorted(expected.top.values(), reverse=True),
                                                                   abs=1e-4)
        assert len(entries) in (3, 4)  # the top 3 and the token itself, unless it is one of them
    echo_tops = got["logprobs"]["top_logprobs"]
    assert echo_tops[0] is None and all(len(t) == 1 for t in echo_tops[1:len(ids)])  # echo: its own top 1
    chat = http.post("/v1/chat/completions", json={"model": "a", "messages": [{"role": "user", "content": "hi"}],
                                                   "max_tokens": 2, "prompt_logprobs": 0}).json()
    assert chat["prompt_logprobs"][0] is None and all(len(e) == 1 for e in chat["prompt_logprobs"][1:])
    plain = client.completions.create(model="a", prompt="hi", max_tokens=2)
    assert "prompt_logprobs" not in plain.choices[0].model_extra
    with pytest.raises(openai.BadRequestError) as e:
        list(client.completions.create(model="a", prompt="hi", max_tokens=2, stream=True,
                                       extra_body={"prompt_logprobs": 1}))
    assert e.value.body["param"] == "prompt_logprobs"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="a", prompt="hi", max_tokens=2, extra_body={"prompt_logprobs": 21})


def test_truncate_prompt_tokens(served):
    """vLLM's truncate_prompt_tokens: the prompt's last k tokens are what is served, counted and echoed."""
    http = served.server.client()
    ids = served.reference.tokenizer.encode("the quick dog sat on the mat")
    got = http.post("/v1/completions", json={"model": "a", "prompt": "the quick dog sat on the mat", "max_tokens": 4,
                                            "temperature": 0, "echo": True, "truncate_prompt_tokens": 3}).json()
    [want] = served.expected(Request(prompt="a", input_ids=ids[-3:], sampling=sp(max_new_tokens=4)))
    echoed = served.reference.tokenizer.decode(ids[-3:])
    assert got["choices"][0]["text"] == echoed + want.text and got["usage"]["prompt_tokens"] == 3
    chat = http.post("/v1/chat/completions", json={"model": "a", "messages": [{"role": "user", "content": "hi"}],
                                                   "max_tokens": 2, "truncate_prompt_tokens": 2}).json()
    assert chat["usage"]["prompt_tokens"] == 2
    bad = http.post("/v1/completions", json={"model": "a", "prompt": "hi", "truncate_prompt_tokens": 0})
    assert bad.status_code == 400 and "truncate_prompt_tokens" in bad.json()["error"]["message"]


def test_bad_structured_outputs_are_refused_by_name(served):
    client = served.server.openai()
    for extra, param in [({"guided_regex": "[a-"}, "guided_regex"), ({"guided_json": "{not json"}, "guided_json"),
                         ({"guided_grammar": "root ::= nothing"}, "guided_grammar"),
                         ({"guided_regex": "a", "guided_json": SCHEMA}, "at most one of"),
                         ({"response_format": {"type": "yaml"}}, "response_format"),
                         ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
                          "response_format"),
                         ({"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs"),
                         ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}},
                           "guided_json": SCHEMA}, "response_format"),
                         ({"structured_outputs": {"choice": 5}}, "structured_outputs"),
                         ({"structured_outputs": {"regex": "a"}, "guided_regex": "b"}, "guided_regex"),
                         ({"guided_regex": "a", "ignore_eos": True}, "ignore_eos"),
                         ({"guided_choice": []}, "guided_choice")]:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="a", prompt="hi", max_tokens=2, extra_body=extra)
        assert param in (e.value.body["param"] or "") + e.value.body["message"], extra
    ok = client.completions.create(model="a", prompt="hi", max_tokens=3, extra_body={"guided_regex": "ab?"})
    assert ok.choices[0].text in ("a", "ab")


def test_n_choices_use_consecutive_seeds_and_several_prompts(served):
    client = served.server.openai()
    got = client.completions.create(model="polite", prompt=["the dog", "my teacher"], n=3, max_tokens=6,
                                    temperature=1.0, seed=100, extra_body={"return_token_ids": True,
                                                                           "ignore_eos": True})
    assert [c.index for c in got.choices] == list(range(6))
    want = served.expected([Request(prompt="polite", text=t, sampling=sp(max_new_tokens=6, temperature=1.0,
                                                                         seed=100 + j, ignore_eos=True))
                            for t in ("the dog", "my teacher") for j in range(3)])
    assert [c.model_extra["token_ids"] for c in got.choices] == [w.token_ids for w in want]
    assert len({tuple(w.token_ids) for w in want}) > 1  # different seeds really differ


def test_penalties_logit_bias_min_p_and_min_tokens_pass_through(served):
    """OpenAI's presence/frequency penalties and logit_bias (string token ids), and vLLM's repetition_penalty,
    min_p and min_tokens (extra_body), reach the engine as SamplingParams."""
    client = served.server.openai()
    got = client.completions.create(model="a", prompt="the cat sat on", max_tokens=8, temperature=0.8, seed=5,
                                    presence_penalty=0.7, frequency_penalty=1.1, logit_bias={"17": 6, "40": -100},
                                    extra_body={"return_token_ids": True, "repetition_penalty": 1.3, "min_p": 0.05,
                                                "min_tokens": 3})
    [want] = served.expected(Request(prompt="a", text="the cat sat on", sampling=sp(
        max_new_tokens=8, temperature=0.8, seed=5, presence_penalty=0.7, frequency_penalty=1.1,
        logit_bias={17: 6, 40: -100}, repetition_penalty=1.3, min_p=0.05, min_tokens=3)))
    assert got.choices[0].model_extra["token_ids"] == want.token_ids and 40 not in want.token_ids
    plain = served.expected(Request(prompt="a", text="the cat sat on", sampling=sp(max_new_tokens=8,
                                                                                   temperature=0.8, seed=5)))
    assert plain[0].token_ids != want.token_ids  # the parameters changed something


def test_several_tasks_at_once_equal_engine_generate(served):
    client = served.server.openai()
    jobs = [(task, text) for task in ("a", "b", "polite", "base")
            for text in ("the cat sat on the", "one bird", "the king built a big")]

    def call(job):
        task, text = job
        r = client.completions.create(model=task, prompt=text, max_tokens=8, temperature=0,
                                      extra_body={"return_token_ids": True, "ignore_eos": True})
        return r.choices[0].model_extra["token_ids"], r.choices[0].text

    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(call, jobs))
    want = served.expected([Request(prompt=None if t == "base" else t, text=x,
                                    sampling=sp(max_new_tokens=8, ignore_eos=True)) for t, x in jobs])
    assert got == [(w.token_ids, w.text) for w in want]
    assert len({tuple(ids) for ids, _ in got}) > len(jobs) // 2  # tasks really differ
    served.server.assert_pool_empty()


def test_chat_completion_equals_engine_on_the_templated_ids(served):
    client = served.server.openai()
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat?"}]
    got = client.chat.completions.create(model="a", messages=messages, max_tokens=7, temperature=0, logprobs=True,
                                         top_logprobs=2, extra_body={"return_token_ids": True})
    hf = served.reference.tokenizer.hf
    ids = hf(hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
             add_special_tokens=False)["input_ids"]
    [want] = served.expected(Request(prompt="a", input_ids=ids, sampling=sp(max_new_tokens=7, logprobs=2)))
    choice = got.choices[0]
    assert choice.model_extra["token_ids"] == want.token_ids and choice.message.content == want.text
    assert choice.message.role == "assistant" and got.usage.prompt_tokens == len(ids)
    assert [round(c.logprob, 4) for c in choice.logprobs.content] == [round(x.logprob, 4) for x in want.logprobs]
    assert all(len(c.top_logprobs) == 2 for c in choice.logprobs.content)
    stream = client.chat.completions.create(model="a", messages=messages, max_tokens=7, temperature=0, stream=True)
    deltas = list(stream)
    assert deltas[0].choices[0].delta.role == "assistant"
    assert "".join(d.choices[0].delta.content or "" for d in deltas) == want.text


def test_tokenize_and_detokenize_as_vllm(served):
    """The ids a request would feed, its room left after the task's prompt, and back to text."""
    http = served.server.client()
    hf = served.reference.tokenizer.hf
    r = http.post("/tokenize", json={"model": "a", "prompt": "the cat sat on", "return_token_strs": True})
    assert r.status_code == 200, r.text
    body = r.json()
    [want] = served.expected(Request(prompt="a", text="the cat sat on", sampling=sp(max_new_tokens=1)))
    assert body["tokens"] == want.input_ids and body["count"] == len(want.input_ids)
    assert body["virtual_tokens"] == 8 and body["max_model_len"] == served.reference.config.max_positions - 8
    assert body["token_strs"] == [hf.decode([i], skip_special_tokens=False) for i in body["tokens"]]
    plain = http.post("/tokenize", json={"prompt": "the cat sat on", "add_special_tokens": False}).json()
    assert plain["tokens"] == hf("the cat sat on", add_special_tokens=False)["input_ids"]
    assert plain["virtual_tokens"] == 0 and "token_strs" not in plain
    messages = [{"role": "user", "content": "the cat?"}]
    chat = http.post("/tokenize", json={"model": "b", "messages": messages}).json()
    assert chat["tokens"] == hf(hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                                add_special_tokens=False)["input_ids"]
    assert chat["virtual_tokens"] == 5
    back = http.post("/detokenize", json={"model": "a", "tokens": plain["tokens"]})
    assert back.status_code == 200 and back.json() == {"prompt": hf.decode(plain["tokens"], skip_special_tokens=True)}
    for path, body, status, words in [
        ("/tokenize", {"model": "nope", "prompt": "x"}, 404, "nope"),
        ("/tokenize", {"prompt": "x", "messages": messages}, 400, "exactly one of prompt or messages"),
        ("/tokenize", {}, 400, "exactly one of prompt or messages"),
        ("/detokenize", {"tokens": [1, 10**9]}, 400, "out of range"),
        ("/detokenize", {"tokens": "abc"}, 422, "tokens"),
    ]:
        r = http.post(path, json=body)
        assert r.status_code == status and words in r.json()["error"]["message"], (path, body, r.text)


def test_errors_are_openai_shaped_and_named(served):
    client = served.server.openai()
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="missing", prompt="x", max_tokens=2)
    assert "missing" in e.value.message and e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="a", prompt=[1, 600], max_tokens=2)
    assert "600" in e.value.message and "vocabulary" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="a", prompt="x", top_p=0, max_tokens=2)
    assert "top_p" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:  # errors come before any stream starts
        client.completions.create(model="a", prompt="", max_tokens=2, stream=True)
    assert "empty" in e.value.message
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.completions.create(model="a", prompt="x", max_tokens="ten")
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="a", prompt="x", presence_penalty=2.5)
    assert "presence_penalty" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="a", prompt="x", logit_bias={"600": 5})
    assert "logit_bias token id 600" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="a", prompt="x", logit_bias={"x": 5})
    assert "logit_bias keys must be token ids" in e.value.message
    http = served.server.client()
    r = http.post("/v1/completions", content=b'{"model": "a", "prompt": ', headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    assert http.get("/v1/nothing").status_code == 404 and "error" in http.get("/v1/nothing").json()
    # still serving
    assert client.completions.create(model="a", prompt="x", max_tokens=2, temperature=0).choices[0].text is not None


def test_health_and_metrics(served):
    http = served.server.client()
    served.server.openai().completions.create(model="b", prompt="the sun", max_tokens=3, temperature=0)
    health = http.get("/health").json()
    assert health["status"] == "ok" and health["kv_blocks_total"] > 0
    text = http.get("/metrics").text
    for name in ("softprompt_requests_total", "softprompt_generation_tokens_total", "softprompt_queue_depth",
                 "softprompt_running_batch_size", "softprompt_prefix_cache_hits_total",
                 "softprompt_prefix_cache_misses_total", "softprompt_prefix_cache_evictions_total",
                 "softprompt_block_cache_queried_tokens_total", "softprompt_block_cache_hit_tokens_total",
                 "softprompt_block_cache_blocks",
                 "softprompt_time_to_first_token_seconds_bucket", "softprompt_inter_token_latency_seconds_bucket",
                 "softprompt_http_requests_total"):
        assert name in text, name
    samples = _samples(text)
    assert samples['softprompt_requests_total{finish_reason="length",task="b"}'] >= 1
    assert samples['softprompt_generation_tokens_total{task="b"}'] >= 3
    assert samples["softprompt_prefix_cache_misses_total"] >= 1


def _samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def test_n_choices_score_their_prompt_once(served, monkeypatch):
    """Unstreamed with n > 1, only each prompt's first choice computes the prompt's logprobs (the others may then
    start from its cached blocks) and every choice shows them: echoed logprobs and prompt_logprobs alike."""
    engine = served.server.engine
    scored: list[str] = []
    real = engine._prompt_logprobs_step

    def spy(seqs, num_tokens, scoring, *rest):
        scored.extend(seqs[i].request_id for i in scoring)
        return real(seqs, num_tokens, scoring, *rest)

    monkeypatch.setattr(engine, "_prompt_logprobs_step", spy)
    prompts = ["the cat sat on the mat and then it ran off to see the dog", "a dog"]
    got = served.server.client().post("/v1/completions", json={
        "model": "a", "prompt": prompts, "n": 3, "max_tokens": 2, "temperature": 1.0, "seed": 5, "echo": True,
        "logprobs": 1, "prompt_logprobs": 2}).json()
    assert len(got["choices"]) == 6
    assert scored and {rid.rsplit("-", 1)[1] for rid in scored} == {"0", "3"}  # each prompt's first choice only
    for i, choice in enumerate(got["choices"]):
        ids = served.reference.tokenizer.encode(prompts[i // 3])
        want = served.reference.prompt_logprobs("a", ids, top_n=2)
        assert choice["logprobs"]["token_logprobs"][:len(ids)] == [
            None if w is None else pytest.approx(w.logprob, abs=1e-4) for w in want]
        assert choice["prompt_logprobs"] == got["choices"][i - i % 3]["prompt_logprobs"]
        assert len(choice["prompt_logprobs"]) == len(ids)


def test_echo_scores_the_prompt_as_lm_eval_harness_asks(served):
    """lm-eval-harness's loglikelihood request: token-id prompts, echo, logprobs=1, max_tokens 0 or 1."""
    client = served.server.openai()
    context, continuation = [1, 40, 41, 42], [43, 44, 45]
    ids = context + continuation
    for max_tokens in (0, 1):
        got = client.completions.create(model="a", prompt=[ids, ids[:5]], echo=True, logprobs=1, max_tokens=max_tokens,
                                        temperature=0)
        assert len(got.choices) == 2
        lp = got.choices[0].logprobs
        assert len(lp.tokens) == len(ids) + max_tokens and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        want = served.reference.score("a", context, [continuation])[0]
        assert math.isclose(sum(lp.token_logprobs[len(context):len(ids)]), want, abs_tol=1e-4)
        assert all(len(top) == 1 for top in lp.top_logprobs[1:])
        for top, value in zip(lp.top_logprobs[1:len(ids)], lp.token_logprobs[1:len(ids)]):
            assert max(top.values()) >= value - 1e-6  # the top-1 token is at least as likely as the prompt's
        assert got.choices[0].text.startswith(served.reference.tokenizer.decode(ids))
        assert len(got.choices[1].logprobs.tokens) == 5 + max_tokens
        assert got.usage.prompt_tokens == len(ids) + 5 and got.usage.completion_tokens == 2 * max_tokens


def test_echo_puts_the_prompt_before_the_completion(served):
    client = served.server.openai()
    plain = client.completions.create(model="b", prompt="the cat sat", max_tokens=5, temperature=0, logprobs=2)
    echoed = client.completions.create(model="b", prompt="the cat sat", max_tokens=5, temperature=0, logprobs=2,
                                       echo=True)
    assert echoed.choices[0].text == "the cat sat" + plain.choices[0].text
    n_prompt = echoed.usage.prompt_tokens
    lp, plain_lp = echoed.choices[0].logprobs, plain.choices[0].logprobs
    assert lp.tokens[n_prompt:] == plain_lp.tokens and lp.token_logprobs[n_prompt:] == plain_lp.token_logprobs
    ids = served.reference.tokenizer.encode("the cat sat")
    want = served.reference.prompt_logprobs("b", ids, 2)
    assert [None if w is None else pytest.approx(w.logprob, abs=1e-4) for w in want] == lp.token_logprobs[:n_prompt]
    assert lp.text_offset == sorted(lp.text_offset)
    no_lp = client.completions.create(model="b", prompt="the cat sat", max_tokens=5, temperature=0, echo=True)
    assert no_lp.choices[0].text == echoed.choices[0].text and no_lp.choices[0].logprobs is None
    for max_tokens in (5, 0):  # streamed: the first chunk of each choice starts with the prompt
        chunks = list(client.completions.create(model="b", prompt="the cat sat", max_tokens=max_tokens,
                                                temperature=0, logprobs=2, echo=True, stream=True))
        streamed = {"text": "", "tokens": [], "token_logprobs": [], "text_offset": []}
        for chunk in chunks:
            choice = chunk.choices[0]
            streamed["text"] += choice.text
            for key in ("tokens", "token_logprobs", "text_offset"):
                streamed[key] += getattr(choice.logprobs, key)
        whole = echoed if max_tokens else client.completions.create(
            model="b", prompt="the cat sat", max_tokens=0, temperature=0, logprobs=2, echo=True)
        assert streamed["text"] == whole.choices[0].text
        for key in ("tokens", "token_logprobs", "text_offset"):
            assert streamed[key] == getattr(whole.choices[0].logprobs, key), key


def test_usage_counts_each_prompt_once_and_its_cached_tokens(served):
    """As OpenAI and vLLM: a prompt's tokens once whatever n is, and `prompt_tokens_details.cached_tokens`: those
    whose K/V the request-block cache held (40 tokens: the two full blocks of 16 before the last token)."""
    client = served.server.openai()
    ids = [300 + (7 * i) % 200 for i in range(40)]
    kw = dict(model="b", prompt=ids, max_tokens=3, temperature=0, n=2, extra_body={"ignore_eos": True})
    first = client.completions.create(**kw).usage
    assert (first.prompt_tokens, first.completion_tokens, first.prompt_tokens_details.cached_tokens) == (40, 6, 0)
    again = client.completions.create(**kw).usage
    assert (again.prompt_tokens, again.prompt_tokens_details.cached_tokens) == (40, 32)
    both = client.completions.create(**{**kw, "prompt": [ids, ids[:20]]}).usage
    assert (both.prompt_tokens, both.completion_tokens, both.prompt_tokens_details.cached_tokens) == (60, 12, 48)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[-1].usage.prompt_tokens == 40 and chunks[-1].usage.completion_tokens == 6


def test_sagemaker_routes(served):
    """/ping is /health; /invocations is a chat completion with messages, a completion with prompt (vLLM's)."""
    http = served.server.client()
    assert http.get("/ping").json()["status"] == "ok" and http.post("/ping").status_code == 200
    chat = {"model": "a", "messages": [{"role": "user", "content": "the cat"}], "max_tokens": 5, "temperature": 0}
    got = http.post("/invocations", json=chat).json()
    assert got["object"] == "chat.completion"
    assert got["choices"][0]["message"] == http.post("/v1/chat/completions", json=chat).json()["choices"][0]["message"]
    completion = {"model": "b", "prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0}
    got = http.post("/invocations", json=completion).json()
    assert got["object"] == "text_completion"
    assert got["choices"][0]["text"] == http.post("/v1/completions", json=completion).json()["choices"][0]["text"]
    r = http.post("/invocations", json={"model": "a"})
    assert r.status_code == 400 and "needs messages" in r.json()["error"]["message"]
    r = http.post("/invocations", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = http.post("/invocations", json={**completion, "max_tokens": "many"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "max_tokens"
    with http.stream("POST", "/invocations", json={**chat, "stream": True}) as s:
        assert s.status_code == 200 and "[DONE]" in s.read().decode()
    served.server.assert_pool_empty()
