"""Structured outputs through xgrammar (guided_json, guided_regex, guided_grammar, JSON mode): the output follows
its constraint at the byte level whatever tokens spell it; greedy equals HF generate with xgrammar's own logits
processor; the engine's batches (chunked, mixed with other requests) equal the reference path; bad constraints are
refused by name and leave the engine serving."""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch
import xgrammar  # the test extras install it: these tests must run, not skip

from softprompt import Engine, Request, SamplingParams
from softprompt.engine.errors import RequestError, SamplingParamsError
from softprompt.engine.structured import GrammarGuide, StructuredOutputs
from softprompt.testing import build_prompt_tensor

from .runtime_helpers import assert_no_leaks

SCHEMA = {"type": "object", "properties": {"label": {"enum": ["pos", "neg"]}, "sure": {"type": "boolean"}},
          "required": ["label", "sure"]}
REGEX = r"[0-9]{3}-(yes|no)"
GRAMMAR = 'root ::= "(" word ")" | "[" [0-9] "]"\nword ::= [a-z] [a-z]? [a-z]?'  # EBNF (GBNF)
GRAMMAR_AS_REGEX = r"\([a-z]{1,3}\)|\[[0-9]\]"


@pytest.fixture(scope="module")
def engines(model_dir_for):
    d = model_dir_for("llama")
    eng = Engine(d, device="cpu", dtype="float32", max_batched_tokens=24, block_size=4)
    ref = Engine(d, device="cpu", dtype="float32", backend="reference")
    for e in (eng, ref):
        e.add_prompt("a", build_prompt_tensor(64, 5, seed=1))
    return eng, ref


def allowed_tokens(guide: GrammarGuide, vocab: int) -> set[int]:
    bitmask = xgrammar.allocate_token_bitmask(1, vocab)
    guide.fill(bitmask, 0)
    logits = torch.zeros(1, vocab)
    xgrammar.apply_token_bitmask_inplace(logits, bitmask)
    return set(torch.nonzero(logits[0] == 0).flatten().tolist())


def test_any_tokens_that_spell_the_text_are_allowed(engines):
    """Tokenization-agnostic, unlike guided_choice: every token whose text begins the literal may come next (" ",
    " t", " th", " the" here), and after " th" only tokens that go on with "e mat"; found by brute force over the
    vocabulary."""
    eng, _ = engines
    tok, vocab = eng.tokenizer, eng.config.vocab_size
    target = " the mat"
    texts = {t: tok.decode([t]) for t in range(vocab)}
    guide = GrammarGuide(eng.structured_outputs.compile("regex", target))
    want = {t for t, text in texts.items() if text and target.startswith(text)}
    assert allowed_tokens(guide, vocab) == want and len(want) >= 3
    guide.follow([next(t for t, text in texts.items() if text == " th")])
    rest = target[3:]
    assert allowed_tokens(guide, vocab) == {t for t, text in texts.items() if text and rest.startswith(text)}


def test_outputs_follow_their_constraint(engines):
    eng, _ = engines
    kinds = [dict(guided_regex=REGEX), dict(guided_grammar=GRAMMAR),
             dict(guided_json=SCHEMA, disable_any_whitespace=True), dict(guided_json=json.dumps(SCHEMA))]
    requests = [Request(prompt="a", text=f"item {i}", sampling=SamplingParams(
        max_new_tokens=48, temperature=1.0, seed=i, **kind)) for kind in kinds for i in range(6)]
    outs = eng.generate(requests)
    for out in outs[:6]:
        assert out.finish_reason == "stop" and re.fullmatch(REGEX, out.text)
    for out in outs[6:12]:
        assert out.finish_reason == "stop" and re.fullmatch(GRAMMAR_AS_REGEX, out.text)
    for out in outs[12:18]:
        value = json.loads(out.text)
        assert out.finish_reason == "stop" and value["label"] in ("pos", "neg") and isinstance(value["sure"], bool)
        assert set(value) == {"label", "sure"} and out.text == json.dumps(value)  # compact: ", " and ": " only
    for out in outs[18:]:  # any whitespace: may run out of tokens inside it, but never leaves the schema's path
        if out.finish_reason == "stop":
            assert set(json.loads(out.text)) == {"label", "sure"}
        else:
            assert out.text.lstrip().startswith("{")
    assert len({o.text for o in outs[:6]}) > 1  # sampled: the constraint leaves choices open
    free = eng.generate([Request(prompt="a", text="item 0", sampling=SamplingParams(max_new_tokens=8))])[0]
    assert not re.fullmatch(REGEX, free.text)  # the constraint changed the output
    assert_no_leaks(eng)


def test_json_mode_gives_json(engines):
    eng, _ = engines
    requests = [Request(prompt="a", text=f"x {i}", sampling=SamplingParams(
        max_new_tokens=48, temperature=1.0, seed=i, guided_json_object=True, disable_any_whitespace=True))
        for i in range(6)]
    stopped = [o for o in eng.generate(requests) if o.finish_reason == "stop"]
    assert stopped
    for out in stopped:
        json.loads(out.text)


def test_batches_equal_the_reference(engines):
    """Chunked prefill (24-token steps), guided and free requests in one batch, greedy and seeded."""
    eng, ref = engines
    requests = [
        Request(prompt="a", text="one two three four five six seven eight nine ten eleven twelve", sampling=
                SamplingParams(max_new_tokens=30, guided_json=SCHEMA)),
        Request(prompt=None, text="the cat", sampling=SamplingParams(max_new_tokens=12, guided_regex=REGEX,
                                                                     temperature=0.8, seed=5, logprobs=2)),
        Request(prompt="a", text="the dog", sampling=SamplingParams(max_new_tokens=10, temperature=0.7, seed=2)),
        Request(prompt="a", text="a b c", sampling=SamplingParams(max_new_tokens=16, guided_grammar=GRAMMAR,
                                                                  repetition_penalty=1.3, logit_bias={300: 3.0})),
        Request(prompt="a", text="x", sampling=SamplingParams(max_new_tokens=40, guided_json_object=True,
                                                              disable_any_whitespace=True, temperature=1.0, seed=9)),
    ]
    got, want = eng.generate(requests), ref.generate(requests)
    assert [(o.token_ids, o.finish_reason) for o in got] == [(o.token_ids, o.finish_reason) for o in want]
    assert [o.logprobs[0].logprob for o in got[1:2]] == pytest.approx([o.logprobs[0].logprob for o in want[1:2]],
                                                                      abs=1e-4)
    assert_no_leaks(eng)


@pytest.mark.parametrize("kind", [dict(guided_regex=REGEX), dict(guided_json=SCHEMA, disable_any_whitespace=True),
                                  dict(guided_json=SCHEMA)])
def test_greedy_equals_hf_generate_with_xgrammars_logits_processor(kind, engines, model_dir_for):
    from transformers import AutoModelForCausalLM
    from xgrammar.contrib.hf import LogitsProcessor

    eng, _ = engines
    params = SamplingParams(max_new_tokens=24, **kind)
    hf = AutoModelForCausalLM.from_pretrained(model_dir_for("llama"), dtype=torch.float32).eval()
    eos = list(eng.eos_token_ids)
    for prompt in ([5, 6, 7], [40, 41, 42, 43], [300, 9]):
        compiled = eng.structured_outputs.compile(*params.structured, not params.disable_any_whitespace)
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              do_sample=False, max_new_tokens=24, logits_processor=[LogitsProcessor(compiled)],
                              eos_token_id=eos, pad_token_id=0)
        want = out[0, len(prompt):].tolist()
        [got] = eng.generate([Request(input_ids=prompt, sampling=params)])
        assert got.token_ids == want


def test_bad_constraints_are_refused_by_name_and_the_engine_keeps_serving(engines):
    eng, ref = engines
    for kind, spec in [("guided_regex", "[a-"), ("guided_json", '{"type": "nonsense"}'),
                       ("guided_grammar", "root ::= undefined_rule")]:
        with pytest.raises(RequestError, match=kind):
            eng.add_request(Request(prompt="a", text="hi", sampling=SamplingParams(**{kind: spec})))
    with pytest.raises(SamplingParamsError, match="guided_json is not valid JSON"):
        SamplingParams(guided_json="{not json")
    with pytest.raises(SamplingParamsError, match="at most one of guided_json, guided_regex"):
        SamplingParams(guided_json=SCHEMA, guided_regex=REGEX)
    with pytest.raises(SamplingParamsError, match="at most one of guided_choice, guided_json_object"):
        SamplingParams(guided_choice=["a"], guided_json_object=True)
    for other in (dict(min_tokens=2), dict(ignore_eos=True), dict(allowed_token_ids=[5])):
        with pytest.raises(SamplingParamsError, match="cannot be combined with"):
            SamplingParams(guided_regex=REGEX, **other)
    with pytest.raises(SamplingParamsError, match="guided_regex must be a non-empty string"):
        SamplingParams(guided_regex="")
    ok = Request(prompt="a", text="hi", sampling=SamplingParams(max_new_tokens=8, guided_regex=REGEX))
    assert [o.token_ids for o in eng.generate([ok])] == [o.token_ids for o in ref.generate([ok])]
    assert_no_leaks(eng)


def test_without_a_tokenizer_or_without_xgrammar_the_request_is_refused(engines, model_dir_for, monkeypatch):
    from softprompt.testing import build_tiny_checkpoint

    eng, _ = engines
    bare = Engine(build_tiny_checkpoint("llama", model_dir_for("llama").parent / "bare-structured",
                                        with_tokenizer=False), device="cpu", dtype="float32")
    with pytest.raises(RequestError, match="needs a tokenizer"):
        bare.add_request(Request(input_ids=[5, 6], sampling=SamplingParams(guided_regex=REGEX)))
    monkeypatch.setitem(sys.modules, "xgrammar", None)  # as if not installed
    fresh = StructuredOutputs(eng.tokenizer.hf, eng.config.vocab_size, eng.eos_token_ids)
    with pytest.raises(RequestError, match=r"pip install 'softprompt-engine\[structured\]'"):
        fresh.compile("regex", REGEX)


def test_a_preempted_request_keeps_its_grammar_state(engines, model_dir_for):
    """Preemption recomputes a request's K/V from its tokens; its grammar state follows the tokens it generated
    and is not reset: the outputs still equal the reference path's."""
    from .test_soak import tight_engine

    d = model_dir_for("llama")
    _, ref = engines
    eng = Engine(d, device="cpu", dtype="float32", **tight_engine(d, blocks=24))
    eng.add_prompt("a", build_prompt_tensor(64, 5, seed=1))
    kinds = [dict(guided_json=SCHEMA), dict(guided_regex=REGEX), dict(guided_grammar=GRAMMAR), {}]
    requests = [Request(prompt="a", input_ids=list(range(10 + i, 30 + i)), sampling=SamplingParams(
        max_new_tokens=24, temperature=1.0, seed=i, **kinds[i % 4])) for i in range(12)]
    got, want = eng.generate(requests), ref.generate(requests)
    assert eng.scheduler.num_preemptions > 0
    assert [(o.token_ids, o.finish_reason) for o in got] == [(o.token_ids, o.finish_reason) for o in want]
    assert_no_leaks(eng)


def test_constraints_that_leave_no_token_end_the_request_and_the_engine_keeps_serving(engines):
    """bad_words banning the only token a grammar (or a choice) allows: the row gets EOS, greedy or sampled, and
    the other requests of the batch go on as they would alone."""
    eng, ref = engines
    tok = eng.tokenizer
    only = tok.encode("x", add_special_tokens=False)
    assert len(only) == 1
    requests = [Request(prompt="a", text="hi", sampling=SamplingParams(
        max_new_tokens=6, guided_regex="x+", bad_words_token_ids=[only], **sampled)) for sampled in
        ({}, {"temperature": 1.0, "seed": 1})]
    requests.append(Request(prompt="a", text="hi", sampling=SamplingParams(
        max_new_tokens=6, guided_choice=["x"], bad_words_token_ids=[only], temperature=1.0, seed=2)))
    requests.append(Request(prompt="a", text="hi", sampling=SamplingParams(
        max_new_tokens=6, allowed_token_ids=[eng.eos_token_ids[0]], min_tokens=2)))
    free = Request(prompt="a", text="the cat", sampling=SamplingParams(max_new_tokens=6, temperature=1.0, seed=3))
    got = eng.generate([*requests, free])
    for out in got[:3]:
        assert out.token_ids == [eng.eos_token_ids[0]] and out.finish_reason == "stop" and out.text == ""
    assert len(got[3].token_ids) >= 2  # EOS may not end it yet: its unprocessed distribution picks
    assert got[4].token_ids == ref.generate([free])[0].token_ids
    assert_no_leaks(eng)
