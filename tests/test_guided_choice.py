"""guided_choice (vLLM's): the output is one of the given texts; greedy equals HF generate constrained to the same
token paths (prefix_allowed_tokens_fn), and the engine's batches equal the reference path."""

from __future__ import annotations

import pytest
import torch

from softprompt import Engine, Request, SamplingParams
from softprompt.engine.errors import RequestError, SamplingParamsError
from softprompt.engine.guided import allowed_next, choice_complete

CHOICES = [" positive", " negative", " neutral", " mixed feelings"]


@pytest.fixture(scope="module")
def engines(model_dir_for):
    d = model_dir_for("llama")
    return (Engine(d, device="cpu", dtype="float32", max_batched_tokens=48),
            Engine(d, device="cpu", dtype="float32", backend="reference"))


def test_the_trie_allows_the_next_tokens_and_eos_where_a_choice_ends():
    choices = ((5, 6), (5, 6, 7), (8,))
    assert sorted(allowed_next(choices, [], (2,))) == [5, 8]
    assert allowed_next(choices, [5], (2,)) == [6]
    assert sorted(allowed_next(choices, [5, 6], (2,))) == [2, 7]  # (5, 6) is whole: EOS may end it
    assert allowed_next(choices, [5, 6], ()) == [7]  # ignore_eos: only the longer choice
    assert [choice_complete(choices, g) for g in ([5], [5, 6], [5, 6, 7], [8])] == [False, False, True, True]


def test_greedy_equals_hf_generate_on_the_same_token_paths(engines, model_dir_for):
    from transformers import AutoModelForCausalLM

    engine, _ = engines
    tok = engine.tokenizer
    paths = [tok.encode(c, add_special_tokens=False) for c in CHOICES]
    assert max(map(len, paths)) > 1  # multi-token choices: the trie branches below its root
    eos = engine.eos_token_ids[0]

    def allowed(batch: int, ids: torch.Tensor) -> list[int]:  # an independent walk over the same paths
        done = ids.tolist()[len(prompt):]
        nexts = {p[len(done)] for p in paths if p[:len(done)] == done and len(p) > len(done)}
        return sorted(nexts | ({eos} if done in paths else set()))

    hf = AutoModelForCausalLM.from_pretrained(model_dir_for("llama"), dtype=torch.float32).eval()
    seen = set()
    for prompt in ([5, 6, 7], [40, 41, 42, 43], [300, 9], [77]):
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              do_sample=False, max_new_tokens=12, prefix_allowed_tokens_fn=allowed,
                              eos_token_id=eos, pad_token_id=0)
        want = out[0, len(prompt):].tolist()
        want = want[:-1] if want[-1] == eos else want
        got = engine.generate([Request(input_ids=prompt, sampling=SamplingParams(max_new_tokens=12,
                                                                                guided_choice=CHOICES))])[0]
        assert got.token_ids == want and got.text in CHOICES and got.finish_reason == "stop"
        seen.add(got.text)
    free = engine.generate([Request(input_ids=[5, 6, 7], sampling=SamplingParams(max_new_tokens=6))])[0]
    assert free.text not in CHOICES  # the constraint changed the output


def test_sampled_outputs_are_choices_and_batches_equal_the_reference(engines):
    engine, reference = engines
    requests = [Request(prompt=None, input_ids=[5 + i, 6, 7], sampling=SamplingParams(
        max_new_tokens=12, temperature=1.5, seed=i, guided_choice=CHOICES)) for i in range(12)]
    requests += [Request(input_ids=[9, 10], sampling=SamplingParams(max_new_tokens=12, guided_choice=CHOICES,
                                                                    logit_bias={300: 5.0}, repetition_penalty=1.2)),
                 Request(input_ids=[9, 10], sampling=SamplingParams(max_new_tokens=5, temperature=0.5, seed=1))]
    got, want = engine.generate(requests), reference.generate(requests)
    assert [(o.token_ids, o.text, o.finish_reason) for o in got] == [(o.token_ids, o.text, o.finish_reason)
                                                                      for o in want]
    texts = [o.text for o in got[:13]]
    assert set(texts) <= set(CHOICES) and len(set(texts)) > 1


def test_a_choice_that_goes_on_to_a_longer_one_may_end_at_eos(engines):
    engine, _ = engines
    eos = engine.eos_token_ids[0]
    choices = [" yes", " yes please"]
    stopped = engine.generate([Request(input_ids=[5, 6], sampling=SamplingParams(
        max_new_tokens=12, guided_choice=choices, logit_bias={eos: 100.0}))])[0]
    assert stopped.text == " yes" and stopped.token_ids[-1] == eos and stopped.stop_reason == eos
    longer = engine.generate([Request(input_ids=[5, 6], sampling=SamplingParams(
        max_new_tokens=12, guided_choice=choices, ignore_eos=True))])[0]
    assert longer.text == " yes please" and longer.finish_reason == "stop"
    short = engine.generate([Request(input_ids=[5, 6], sampling=SamplingParams(
        max_new_tokens=1, guided_choice=[" mixed feelings"]))])[0]
    assert short.finish_reason == "length" and " mixed feelings".startswith(short.text)


def test_choice_token_ids_work_without_a_tokenizer(tmp_path):
    from softprompt.testing import build_tiny_checkpoint

    d = build_tiny_checkpoint("gpt2", tmp_path / "m", with_tokenizer=False)
    engine = Engine(d, device="cpu", dtype="float32")
    out = engine.generate([Request(input_ids=[5, 6], sampling=SamplingParams(
        max_new_tokens=8, choice_token_ids=[[10, 11, 12], [10, 13]]))])[0]
    assert out.token_ids in ([10, 11, 12], [10, 13])
    with pytest.raises(RequestError, match="guided_choice needs a tokenizer"):
        engine.generate([Request(input_ids=[5], sampling=SamplingParams(guided_choice=["a"]))])
    with pytest.raises(RequestError, match="choice token id 99999 is out of range"):
        engine.generate([Request(input_ids=[5], sampling=SamplingParams(choice_token_ids=[[5, 99999]]))])


@pytest.mark.parametrize("bad, message", [
    (dict(guided_choice=[]), "guided_choice must be a list of 1 to 256 non-empty strings"),
    (dict(guided_choice=["a", ""]), "guided_choice"),
    (dict(guided_choice=["a", 3]), "guided_choice"),
    (dict(guided_choice="ab"), "guided_choice"),
    (dict(guided_choice=["x"] * 257), "guided_choice"),
    (dict(choice_token_ids=[[]]), "choice_token_ids must be a list of 1 to 256 non-empty lists of token ids"),
    (dict(choice_token_ids=[[1, -2]]), "choice_token_ids"),
    (dict(choice_token_ids=[5]), "choice_token_ids"),
    (dict(guided_choice=["a"], allowed_token_ids=[3]), "cannot be combined with allowed_token_ids or min_tokens"),
    (dict(guided_choice=["a"], min_tokens=1), "cannot be combined"),
])
def test_bad_choices_are_named(bad, message):
    with pytest.raises(SamplingParamsError, match=message):
        SamplingParams(**bad)
