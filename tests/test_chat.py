"""Chat requests in Python (`Request(messages=...)`, as vLLM's `LLM.chat`) and `softprompt generate --chat`."""

from __future__ import annotations

import json

import pytest

from softprompt import Engine, Request, SamplingParams
from softprompt.engine.cli import main
from softprompt.engine.errors import RequestError

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat sat"}]


@pytest.fixture(scope="module")
def engine(model_dir_for, adapter_for):
    e = Engine(model_dir_for("llama"), device="cpu")
    e.add_prompt("t", adapter_for("llama"))
    return e


def rendered(engine: Engine, messages: list[dict], **options) -> list[int]:
    text = engine.tokenizer.hf.apply_chat_template(messages, tokenize=False, **options)
    return engine.tokenizer.encode(text, add_special_tokens=False)


def test_messages_are_rendered_by_the_chat_template_and_generate_like_their_ids(engine):
    ids = rendered(engine, MESSAGES, add_generation_prompt=True)
    assert engine.prepare(Request(prompt="t", messages=MESSAGES)).input_ids == ids
    params = SamplingParams(max_new_tokens=6)
    chat, plain = engine.generate([Request(prompt="t", messages=MESSAGES, sampling=params),
                                   Request(prompt="t", input_ids=ids, sampling=params)])
    assert chat.token_ids == plain.token_ids and chat.text == plain.text
    cont = [*MESSAGES, {"role": "assistant", "content": "it sat"}]
    options = {"add_generation_prompt": False, "continue_final_message": True}
    assert engine.prepare(Request(messages=cont, chat_template_kwargs=options)).input_ids == rendered(
        engine, cont, **options)


def test_bad_chat_requests_are_refused_by_name(engine, model_dir_for):
    for request, match in [
        (Request(messages=MESSAGES, text="x"), "exactly one of input ids, text or messages"),
        (Request(text="x", chat_template_kwargs={"a": 1}), "chat_template_kwargs and tools apply to chat messages"),
        (Request(messages=[]), "non-empty list"),
        (Request(messages=[{"content": "no role"}]), "non-empty list"),
        (Request(messages=MESSAGES, chat_template_kwargs={"add_generation_prompt": True,
                                                           "continue_final_message": True}),
         "cannot apply the chat template"),
    ]:
        with pytest.raises(RequestError, match=match):
            engine.prepare(request)
    bare = Engine(model_dir_for("llama"), device="cpu")
    bare.tokenizer.hf.chat_template = None
    with pytest.raises(RequestError, match="no chat template"):
        bare.prepare(Request(messages=MESSAGES))


def test_generate_command_chat(engine, model_dir_for, adapter_for, capsys):
    d = model_dir_for("llama")
    base = ["generate", str(d), "--prompt", f"t={adapter_for('llama')}", "--task", "t", "--max-new-tokens", "5",
            "--json", "--device", "cpu"]
    assert main([*base, "--chat", "the cat sat", "--system", "be brief"]) == 0
    got = json.loads(capsys.readouterr().out)
    [want] = engine.generate(Request(prompt="t", messages=MESSAGES, sampling=SamplingParams(max_new_tokens=5)))
    assert got["token_ids"] == want.token_ids
    assert main([*base, "--text", "x", "--system", "be brief"]) != 0
    assert "--system goes with --chat" in capsys.readouterr().err


def test_a_developer_turn_is_a_system_turn_unless_the_template_names_it(model_dir_for):
    engine = Engine(model_dir_for("llama"), device="cpu")
    engine.tokenizer.hf.chat_template = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
    developer = [{"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi"}]
    system = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert engine.prepare(Request(messages=developer)).input_ids == engine.prepare(Request(messages=system)).input_ids
    engine.tokenizer.hf.chat_template = ("{% for m in messages %}{% if m.role == 'developer' %}(dev) "
                                         "{% endif %}[{{ m.role }}] {{ m.content }}\n{% endfor %}")
    ids = engine.prepare(Request(messages=developer)).input_ids
    assert engine.tokenizer.decode(ids).startswith("(dev) [developer] be brief")  # the template's own reading
