"""Beam search (Engine.beam_search) against HF transformers + PEFT `generate(num_beams=k)`: the same hypotheses in
the same order with the same scores (fp32: 1e-4), with and without a soft prompt, with EOS ending beams, for HF's
three early-stopping rules and length penalties; batched requests equal each alone; bad params refused."""

from __future__ import annotations

import json
import shutil

import peft
import pytest
import torch

from softprompt import BeamSearchParams, Engine, Request, SamplingParams
from softprompt.engine.errors import RequestError, SamplingParamsError, UnknownPromptError
from softprompt.engine.hf_auto import load_hf_causal_lm

IDS = [5, 17, 99, 200, 31, 44, 8, 9, 77]
SETTINGS = [(4, 1.0, False), (3, 0.5, "never"), (3, 2.0, "never"), (2, 1.0, True), (5, -1.0, False)]


def hf_beams(model, ids: list[int], k: int, length_penalty: float, early_stopping, max_new_tokens: int = 10):
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False, num_beams=k, num_return_sequences=k,
                             length_penalty=length_penalty, early_stopping=early_stopping, pad_token_id=3,
                             output_scores=True, return_dict_in_generate=True)
    tokens = [seq[len(ids):].tolist() for seq in out.sequences]
    return tokens, out.sequences_scores.tolist()


def strip_padding(tokens: list[int], eos: set[int]) -> list[int]:
    """HF pads shorter hypotheses to the longest (with pad 3 after EOS): cut after the first EOS."""
    for i, token in enumerate(tokens):
        if token in eos:
            return tokens[:i + 1]
    return tokens


def assert_same(out, hf, length_penalty: float, eos=frozenset()):
    tokens, scores = hf
    assert [s.token_ids for s in out.sequences] == [strip_padding(t, eos) for t in tokens]
    assert [s.score for s in out.sequences] == pytest.approx(scores, abs=1e-4)
    for s in out.sequences:
        assert s.score == pytest.approx(s.cumulative_logprob / len(s.token_ids) ** length_penalty, abs=1e-5)
        assert len(s.logprobs) == len(s.token_ids) and sum(s.logprobs) == pytest.approx(s.cumulative_logprob)
        assert all(lp <= 0 for lp in s.logprobs)


@pytest.fixture(scope="module")
def tuned(model_dir_for, adapter_for):
    model_dir, adapter = model_dir_for("llama"), adapter_for("llama")
    hf = peft.PeftModel.from_pretrained(load_hf_causal_lm(model_dir).eval(), adapter).eval()
    engine = Engine(model_dir, device="cpu")
    engine.add_prompt("task", adapter)
    return engine, hf


@pytest.mark.parametrize("k, length_penalty, early_stopping", SETTINGS)
def test_beams_match_peft_generate(tuned, k, length_penalty, early_stopping):
    engine, hf = tuned
    [out] = engine.beam_search(Request(prompt="task", input_ids=IDS),
                               BeamSearchParams(k, max_new_tokens=10, length_penalty=length_penalty,
                                                early_stopping=early_stopping))
    assert out.prompt == "task" and out.input_ids == IDS and len(out.sequences) == k
    assert_same(out, hf_beams(hf, IDS, k, length_penalty, early_stopping), length_penalty)
    assert all(s.finish_reason == "length" and len(s.token_ids) == 10 for s in out.sequences)  # no EOS here
    for s in out.sequences:  # each token's log-probability is the model's, given the input and the tokens before
        scored = engine.prompt_logprobs("task", IDS + s.token_ids)[len(IDS):]
        assert s.logprobs == pytest.approx([lp.logprob for lp in scored], abs=1e-4)
    greedy = engine.generate(Request(prompt="task", input_ids=IDS, sampling=SamplingParams(max_new_tokens=10)))[0]
    if k == 4:  # not degenerate: the best beam is not the greedy answer here
        assert out.sequences[0].token_ids != greedy.token_ids


@pytest.fixture(scope="module")
def eos_model(model_dir_for, tmp_path_factory):
    """The tiny Llama (no tokenizer) whose EOS is a token its best beam takes third: beams end early."""
    base = model_dir_for("llama")
    engine = Engine(base, device="cpu")
    [out] = engine.beam_search(Request(input_ids=IDS), BeamSearchParams(3, max_new_tokens=6))
    eos = out.sequences[0].token_ids[2]
    out_dir = tmp_path_factory.mktemp("eos-model")
    for f in base.iterdir():
        if f.suffix in (".json", ".safetensors") and "token" not in f.name:
            shutil.copy(f, out_dir / f.name)
    for name in ("config.json", "generation_config.json"):
        config = json.loads((out_dir / name).read_text())
        config["eos_token_id"] = eos
        (out_dir / name).write_text(json.dumps(config))
    return out_dir, eos


@pytest.mark.parametrize("k, length_penalty, early_stopping", SETTINGS)
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_eos_ends_beams_as_in_hf(eos_model, k, length_penalty, early_stopping, backend):
    model_dir, eos = eos_model
    engine = Engine(model_dir, device="cpu", backend=backend)
    assert engine.eos_token_ids == (eos,)
    [out] = engine.beam_search(Request(input_ids=IDS), BeamSearchParams(k, max_new_tokens=10,
                                                                         length_penalty=length_penalty,
                                                                         early_stopping=early_stopping))
    hf = load_hf_causal_lm(model_dir).eval()
    assert_same(out, hf_beams(hf, IDS, k, length_penalty, early_stopping), length_penalty, {eos})
    if length_penalty <= 1.0:  # (a strong length penalty ranks the longer, unfinished ones first)
        assert any(s.finish_reason == "stop" and s.token_ids[-1] == eos for s in out.sequences)
    [kept_going] = engine.beam_search(Request(input_ids=IDS), BeamSearchParams(k, max_new_tokens=10, ignore_eos=True))
    assert all(len(s.token_ids) == 10 and s.finish_reason == "length" for s in kept_going.sequences)


def test_requests_search_together_as_each_alone(tuned, model_dir_for):
    engine, _ = tuned
    requests = [Request(prompt="task", input_ids=IDS), Request(input_ids=IDS[:4]),
                Request(prompt="task", text="the cat")]
    params = BeamSearchParams(3, max_new_tokens=6)
    together = engine.beam_search(requests, params)
    alone = [engine.beam_search(Request(prompt=r.prompt, input_ids=r.input_ids, text=r.text), params)[0]
             for r in requests]
    assert [[s.token_ids for s in o.sequences] for o in together] == [[s.token_ids for s in o.sequences]
                                                                      for o in alone]
    assert [o.request_id for o in together] == [r.request_id for r in requests]
    text = together[2].sequences[0]
    assert text.text == engine.tokenizer.decode(text.token_ids, skip_special_tokens=True)
    assert not engine.scheduler.has_work()


@pytest.mark.parametrize("params, match", [
    (dict(beam_width=0), "beam_width must be an integer >= 1"),
    (dict(beam_width=2, max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
    (dict(beam_width=2, early_stopping="sometimes"), "early_stopping must be false, true or 'never'"),
    (dict(beam_width=2, length_penalty=float("nan")), "length_penalty must be a finite number"),
])
def test_bad_params_are_refused(params, match):
    with pytest.raises(SamplingParamsError, match=match):
        BeamSearchParams(**params)


def test_bad_requests_are_refused_and_the_engine_goes_on(tuned):
    engine, _ = tuned
    with pytest.raises(SamplingParamsError, match="beam_width 20 \\+ 1 EOS ids needs 21 log-probabilities"):
        engine.beam_search(Request(input_ids=IDS), BeamSearchParams(20))
    with pytest.raises(RequestError, match="give its requests no sampling params"):
        engine.beam_search(Request(input_ids=IDS, sampling=SamplingParams(temperature=1.0)), BeamSearchParams(2))
    with pytest.raises(UnknownPromptError, match="unknown prompt 'nope'"):
        engine.beam_search([Request(input_ids=IDS), Request(prompt="nope", input_ids=IDS)], BeamSearchParams(2))
    assert not engine.scheduler.has_work()
    assert len(engine.beam_search(Request(input_ids=IDS), BeamSearchParams(2, max_new_tokens=3))[0].sequences) == 2
