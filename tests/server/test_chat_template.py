"""vLLM's chat template options: chat_template_kwargs (the template's own variables), add_generation_prompt and
continue_final_message, on chat completions and /tokenize; what cannot be honoured is refused by name."""

from __future__ import annotations

import pytest

from softprompt import Request, SamplingParams
from softprompt.engine.server.registry import PromptRegistry

from .support import RunningServer, make_engine

TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% if enable_thinking %} think:{% endif %}{% endif %}")
MESSAGES = [{"role": "user", "content": "the cat?"}, {"role": "assistant", "content": "the cat sat"}]


@pytest.fixture(scope="module")
def server(model_dir_for):
    engine, reference = make_engine(model_dir_for("llama")), make_engine(model_dir_for("llama"))
    for e in (engine, reference):
        e.tokenizer.hf.chat_template = TEMPLATE
    running = RunningServer(engine, PromptRegistry())
    running.reference = reference
    yield running
    running.stop()


def _ids(reference, **options) -> list[int]:
    hf = reference.tokenizer.hf
    return hf(hf.apply_chat_template(MESSAGES, tokenize=False, **options), add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("options", [
    {"chat_template_kwargs": {"enable_thinking": True}},
    {"add_generation_prompt": False, "continue_final_message": True},
    {"add_generation_prompt": False},
    {},
], ids=["template-variable", "continue-final-message", "no-generation-prompt", "defaults"])
def test_options_reach_the_template(server, options):
    http = server.client()
    want_ids = _ids(server.reference, **{"add_generation_prompt": True, **options.get("chat_template_kwargs", {}),
                                         **{k: v for k, v in options.items() if k != "chat_template_kwargs"}})
    tokenized = http.post("/tokenize", json={"model": "base", "messages": MESSAGES, **options}).json()
    assert tokenized["tokens"] == want_ids
    got = http.post("/v1/chat/completions", json={"model": "base", "messages": MESSAGES, "max_tokens": 4,
                                                  "temperature": 0, "return_token_ids": True, **options}).json()
    [want] = server.reference.generate([Request(input_ids=want_ids, sampling=SamplingParams(max_new_tokens=4))])
    assert got["choices"][0]["prompt_token_ids"] == want_ids and got["choices"][0]["token_ids"] == want.token_ids


def test_the_options_change_the_ids(server):
    text = server.reference.tokenizer.hf.decode(_ids(server.reference, add_generation_prompt=True,
                                                     enable_thinking=True))
    assert text.endswith("assistant: think:")
    continued = server.reference.tokenizer.hf.decode(_ids(server.reference, continue_final_message=True))
    assert continued.endswith("the cat sat")  # no newline, no new turn: the answer goes on


@pytest.mark.parametrize("extra, param", [
    ({"continue_final_message": True}, "continue_final_message"),  # with the default add_generation_prompt
    ({"chat_template": "{{ messages }}"}, "chat_template"),
    ({"chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs"),
])
def test_what_cannot_be_honoured_is_refused(server, extra, param):
    http = server.client()
    for path, body in (("/v1/chat/completions", {"max_tokens": 2}), ("/tokenize", {})):
        r = http.post(path, json={"model": "base", "messages": MESSAGES, **body, **extra})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (path, r.text)


def test_text_parts_are_joined_by_newlines_as_vllm_joins_them(server):
    parts = [{"role": "user", "content": [{"type": "text", "text": "the cat?"}, {"type": "text", "text": "or a dog?"}]}]
    joined = [{"role": "user", "content": "the cat?\nor a dog?"}]
    http = server.client()
    got = http.post("/tokenize", json={"model": "base", "messages": parts}).json()["tokens"]
    hf = server.reference.tokenizer.hf
    assert got == hf(hf.apply_chat_template(joined, tokenize=False, add_generation_prompt=True),
                     add_special_tokens=False)["input_ids"]
