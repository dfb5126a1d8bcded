"""With a reasoning parser, constraints hold on a thinking model's answer, not on its thought (vLLM's structured
outputs with --reasoning-parser): ThoughtGate's reading of the generated tokens, and what the engine generates on
the torch and reference backends (the same tokens), for structured outputs and guided_choice."""

from __future__ import annotations

import re

import pytest

from softprompt import Engine, Request, SamplingParams
from softprompt.engine.errors import SoftPromptError
from softprompt.engine.reasoning import ThoughtGate

START, END = 510, 511  # thinking_model_dir's <think> and </think>
INPUT = "the cat sat on"


def test_the_gate_reads_where_the_answer_starts():
    gate, generated = ThoughtGate(START, END, open_at_start=True), []
    for token, answer in [(5, None), (START, None), (END, []), (6, [6]), (END, [6, END]), (7, [6, END, 7])]:
        generated.append(token)
        assert gate.answer(generated) == answer and not gate.may_open(generated)
    opened, generated = ThoughtGate(START, END, open_at_start=False), []
    assert opened.answer(generated) == [] and opened.may_open(generated)
    for token, answer in [(START, None), (5, None), (END, []), (6, [6])]:
        generated.append(token)
        assert opened.answer(generated) == answer and not opened.may_open(generated)
    plain = ThoughtGate(START, END, open_at_start=False)
    assert plain.answer([6]) == [6] and plain.answer([6, START, END]) == [6, START, END]  # no thought: all answer


@pytest.fixture(scope="module")
def engines(thinking_model_dir):
    """(backend, reasoning parser) -> Engine over the thinking tokenizer."""
    made: dict = {}

    def get(backend: str, parser: str | None) -> Engine:
        if (backend, parser) not in made:
            made[backend, parser] = Engine(thinking_model_dir, backend=backend, reasoning_parser=parser)
        return made[backend, parser]

    yield get
    made.clear()


def run(engine: Engine, *params: SamplingParams, text: str = INPUT) -> list:
    return engine.generate([Request(text=text, sampling=p) for p in params])


def constrained(**kw) -> list[SamplingParams]:
    """The same request held to a regex and to a choice (the regex needs xgrammar)."""
    out = [SamplingParams(max_new_tokens=10, guided_choice=["yes", "no"], **kw)]
    try:
        import xgrammar  # noqa: F401
        out.append(SamplingParams(max_new_tokens=10, guided_regex="yes|no", **kw))
    except ImportError:
        pass
    return out


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_the_constraint_holds_from_the_token_after_the_thought(engines, backend):
    engine = engines(backend, "deepseek_r1")
    outs = run(engine, *constrained(logit_bias={END: 50.0}))  # the thought ends at once
    for out in outs:
        assert out.token_ids[0] == END and re.fullmatch("</think>(yes|no)", out.text), out.text
    assert [o.token_ids for o in outs] == [o.token_ids for o in run(engines("reference", "deepseek_r1"),
                                                                      *constrained(logit_bias={END: 50.0}))]
    # without a reasoning parser the constraint holds from the first token: no thought
    for out in run(engines(backend, None), *constrained(logit_bias={END: 50.0})):
        assert out.text in ("yes", "no")


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_a_thought_that_does_not_end_is_not_constrained(engines, backend):
    engine = engines(backend, "deepseek_r1")
    free = run(engine, SamplingParams(max_new_tokens=10))[0]
    assert END not in free.token_ids and free.finish_reason == "length"
    for out in run(engine, *constrained()):
        assert out.token_ids == free.token_ids and out.finish_reason == "length"


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_qwen3_the_first_token_may_open_a_thought(engines, backend):
    engine = engines(backend, "qwen3")
    for out in run(engine, *constrained(logit_bias={START: -100.0})):  # no <think> first: all answer, constrained
        assert out.text in ("yes", "no")
    # <think> is allowed first (besides what the constraint allows), then the thought is free until </think>
    opening = dict(logit_bias={START: 50.0, END: 40.0}, bad_words_token_ids=((START, START),))
    for out in run(engine, *constrained(**opening)):
        assert out.token_ids[:2] == [START, END] and re.fullmatch("<think></think>(yes|no)", out.text), out.text
    # an input that ends inside an open thought (as Qwen3's thinking-only templates render)
    free = run(engine, SamplingParams(max_new_tokens=10), text=INPUT + " <think>")[0]
    assert END not in free.token_ids
    for out in run(engine, *constrained(), text=INPUT + " <think>"):
        assert out.token_ids == free.token_ids


def test_gated_and_plain_requests_share_a_batch(engines):
    """Gated, constrained-from-the-start (no constraint to gate) and free requests in one batch, on the torch
    backend, give what each gives alone on the reference backend."""
    params = [*constrained(logit_bias={END: 50.0}), *constrained(), SamplingParams(max_new_tokens=6),
              SamplingParams(max_new_tokens=6, temperature=0.8, seed=3)]
    batched = run(engines("torch", "deepseek_r1"), *params)
    alone = [run(engines("reference", "deepseek_r1"), p)[0] for p in params]
    assert [o.token_ids for o in batched] == [o.token_ids for o in alone]


def test_a_reasoning_parser_needs_single_token_markers(engines, model_dir_for):
    engine = engines("torch", None)
    with pytest.raises(SoftPromptError, match="unknown reasoning parser 'granite'"):
        engine.set_reasoning_parser("granite")
    with pytest.raises(SoftPromptError, match="'<think>' and '</think>' are not single tokens"):
        Engine(model_dir_for("llama"), reasoning_parser="qwen3")
    engine.set_reasoning_parser("qwen3")
    engine.set_reasoning_parser(None)  # back to constraints from the first token
    assert run(engine, *constrained(logit_bias={END: 50.0}))[0].text in ("yes", "no")


def test_other_markers_gate_alike(tmp_path):
    """seed_oss's <seed:think> / </seed:think>: the same gate, by the parser's own markers."""
    from softprompt.testing import build_tiny_checkpoint, build_tokenizer

    build_tiny_checkpoint("llama", tmp_path, with_tokenizer=False)
    build_tokenizer(tmp_path, 510, added_tokens=("<seed:think>", "</seed:think>"))
    engine = Engine(tmp_path, reasoning_parser="seed_oss")
    for out in run(engine, *constrained(logit_bias={END: 50.0})):
        assert out.token_ids[0] == END and re.fullmatch("</seed:think>(yes|no)", out.text), out.text
    with pytest.raises(SoftPromptError, match="'<think>' and '</think>' are not single tokens"):
        engine.set_reasoning_parser("qwen3")
