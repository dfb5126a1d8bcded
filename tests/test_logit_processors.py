"""Logit processors (vLLM's and OpenAI's sampling options): logit_bias, min_tokens, repetition_penalty,
frequency/presence penalties and min_p. Checked against HF transformers' own processors and generate, by hand
formulas, and the engine's batched path against the reference path."""

from __future__ import annotations

import pytest
import torch

from softprompt import Engine, Request, SamplingParams
from softprompt.engine.errors import RequestError, SamplingParamsError
from softprompt.engine.sampling import _filtered_probs, process_logits, sample_next

from .runtime_helpers import assert_no_leaks, register_tasks


def process(logits, params, inputs, generated, eos=()):
    return process_logits(logits[None], [params], [(inputs, generated)], eos)[0]


def test_repetition_penalty_is_hfs():
    from transformers import RepetitionPenaltyLogitsProcessor

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(100, generator=g) * 3
    inputs, generated = [3, 7, 7, 50], [7, 99, 0]
    want = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([inputs + generated]), logits[None].clone())[0]
    got = process(logits, SamplingParams(repetition_penalty=1.7), inputs, generated)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_frequency_presence_penalties_and_logit_bias_by_hand():
    logits = torch.zeros(10)
    params = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25, logit_bias={2: 3.0, 9: -100})
    got = process(logits, params, [4, 4, 4], [1, 1, 5])
    want = torch.zeros(10)
    want[1] -= 2 * 0.5 + 0.25  # generated twice
    want[5] -= 0.5 + 0.25
    want[2] += 3.0
    want[9] -= 100  # the input's 4 is not penalised: OpenAI's penalties count generated tokens
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert torch.equal(logits, torch.zeros(10))  # the caller's row is left alone


def test_min_tokens_bans_eos_and_stop_ids_until_reached():
    logits = torch.zeros(10)
    params = SamplingParams(min_tokens=2, stop_token_ids=[3], max_new_tokens=4)
    early = process(logits, params, [1], [5], eos=(2,))
    assert early[2] == float("-inf") and early[3] == float("-inf") and torch.isfinite(early[[0, 1, 4]]).all()
    assert torch.isfinite(process(logits, params, [1], [5, 6], eos=(2,))).all()
    ignoring = process(logits, SamplingParams(min_tokens=2, ignore_eos=True), [1], [], eos=(2,))
    assert torch.isfinite(ignoring[2])  # EOS is not a stop for this request anyway


def test_min_p_keeps_what_hfs_min_p_keeps():
    from transformers import MinPLogitsWarper

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(200, generator=g) * 2
    kept_hf = torch.isfinite(MinPLogitsWarper(0.1)(None, logits[None].clone())[0])
    probs = _filtered_probs(logits, SamplingParams(temperature=1.0, min_p=0.1))
    assert torch.equal(probs > 0, kept_hf) and 1 < int(kept_hf.sum()) < 200


def test_a_batch_is_processed_as_each_row_alone():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 60, generator=g)
    params = [SamplingParams(repetition_penalty=1.3, frequency_penalty=0.4, logit_bias={3: 2.0}),
              SamplingParams(presence_penalty=-1.0, min_tokens=2, stop_token_ids=[9]),
              SamplingParams(repetition_penalty=0.7, logit_bias={3: -1.0, 59: 5.0}),
              SamplingParams(frequency_penalty=2.0, presence_penalty=2.0),
              SamplingParams(min_tokens=1)]
    histories = [([1, 2, 3], [3, 3, 4]), ([5], [9]), ([1, 1], []), ([0], [0, 0, 7, 0]), ([2], [4])]
    batch = process_logits(logits, params, histories, (8,))
    for row in range(5):
        assert torch.equal(batch[row], process(logits[row], params[row], *histories[row], eos=(8,)))
    assert torch.equal(batch[4], logits[4])  # min_tokens reached: nothing applies
    assert batch[1, 9] == batch[1, 8] == float("-inf")


def test_sample_next_needs_histories_for_processing_rows():
    with pytest.raises(ValueError, match="histories"):
        sample_next(torch.zeros(1, 5), [SamplingParams(repetition_penalty=1.2)], [None])


@pytest.mark.parametrize("bad, message", [
    (dict(presence_penalty=2.5), "presence_penalty must be a number in \\[-2, 2\\]"),
    (dict(frequency_penalty=float("nan")), "frequency_penalty"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be a finite number > 0"),
    (dict(min_p=-0.1), "min_p"),
    (dict(min_tokens=-1), "min_tokens must be an integer >= 0"),
    (dict(min_tokens=9, max_new_tokens=8), "min_tokens \\(9\\) must not exceed max_new_tokens \\(8\\)"),
    (dict(logit_bias={1: 101}), "logit_bias values must be numbers in \\[-100, 100\\]"),
    (dict(logit_bias={"1": 1.0}), "logit_bias keys must be non-negative token ids"),
    (dict(logit_bias=[3]), "logit_bias must map token ids to biases"),
    (dict(allowed_token_ids=[]), "allowed_token_ids must be a non-empty list of non-negative token ids"),
    (dict(allowed_token_ids=[3, -1]), "allowed_token_ids"),
    (dict(allowed_token_ids=[True]), "allowed_token_ids"),
    (dict(allowed_token_ids="12"), "allowed_token_ids"),
    (dict(allowed_token_ids=5), "allowed_token_ids"),
    (dict(bad_words=["ok", " "]), "bad_words must be a list of at most 128 strings with text"),
    (dict(bad_words=[3]), "bad_words"),
    (dict(bad_words_token_ids=[[]]), "bad_words_token_ids must be a list of at most 256 non-empty lists"),
    (dict(bad_words_token_ids=[[1, True]]), "bad_words_token_ids"),
])
def test_bad_params_are_named(bad, message):
    with pytest.raises(SamplingParamsError, match=message):
        SamplingParams(**bad)


@pytest.fixture(scope="module")
def engine(model_dir_for):
    return Engine(model_dir_for("llama"), device="cpu", dtype="float32")


def test_greedy_repetition_penalty_equals_hf_generate(engine, model_dir_for):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir_for("llama"), dtype=torch.float32).eval()
    ids = [5, 6, 7, 8, 5, 6]
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          do_sample=False, repetition_penalty=1.5, max_new_tokens=10, min_new_tokens=10)
    want = out[0, len(ids):].tolist()
    got = engine.generate([Request(input_ids=ids, sampling=SamplingParams(max_new_tokens=10, min_tokens=10,
                                                                         repetition_penalty=1.5))])[0]
    assert got.token_ids == want
    plain = engine.generate([Request(input_ids=ids, sampling=SamplingParams(max_new_tokens=10, ignore_eos=True))])
    assert plain[0].token_ids != want  # the penalty changed the greedy path


def test_allowed_token_ids_equal_hf_generate_with_prefix_allowed_tokens_fn(engine, model_dir_for):
    """vLLM's allowed_token_ids; HF's nearest is prefix_allowed_tokens_fn (every other token masked out)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir_for("llama"), dtype=torch.float32).eval()
    ids, allowed = [5, 6, 7, 8], [40, 41, 300, 301, 2]
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, 4, dtype=torch.long), do_sample=False,
                          max_new_tokens=8, prefix_allowed_tokens_fn=lambda batch, prefix: allowed, pad_token_id=0)
    want = out[0, 4:].tolist()
    got = engine.generate([Request(input_ids=ids, sampling=SamplingParams(max_new_tokens=8,
                                                                         allowed_token_ids=allowed))])[0]
    assert got.token_ids == want and set(want) <= set(allowed)
    plain = engine.generate([Request(input_ids=ids, sampling=SamplingParams(max_new_tokens=8))])[0]
    assert not set(plain.token_ids) <= set(allowed)  # the mask changed the greedy path
    sampled = engine.generate([Request(input_ids=ids, sampling=SamplingParams(
        max_new_tokens=16, temperature=1.5, seed=3, allowed_token_ids=allowed, logit_bias={300: -100},
        ignore_eos=True))])[0]
    assert set(sampled.token_ids) <= set(allowed) - {300} and len(set(sampled.token_ids)) > 1
    with pytest.raises(RequestError, match="allowed_token_ids token id 99999 is out of range"):
        engine.generate([Request(input_ids=ids, sampling=SamplingParams(allowed_token_ids=[5, 99999]))])


def test_min_tokens_and_a_bias_towards_eos_equal_hf_generate(engine, model_dir_for):
    """HF: min_new_tokens + sequence_bias on EOS; here: min_tokens + logit_bias. EOS comes right after."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir_for("llama"), dtype=torch.float32).eval()
    eos = engine.eos_token_ids[0]
    ids = [9, 10, 11]
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, 3, dtype=torch.long), do_sample=False,
                          max_new_tokens=12, min_new_tokens=4, sequence_bias={(eos,): 30.0}, eos_token_id=eos)
    want = out[0, 3:].tolist()
    got = engine.generate([Request(input_ids=ids, sampling=SamplingParams(max_new_tokens=12, min_tokens=4,
                                                                         logit_bias={eos: 30.0}))])[0]
    assert got.token_ids == want and len(want) == 5 and want[-1] == eos and got.finish_reason == "stop"


def test_min_tokens_holds_off_stop_strings_and_stop_ids(engine):
    free = engine.generate([Request(text="the cat", sampling=SamplingParams(max_new_tokens=8, ignore_eos=True))])[0]
    first = free.token_ids[0]
    stopped = engine.generate([Request(text="the cat", sampling=SamplingParams(max_new_tokens=8, ignore_eos=True,
                                                                               stop_token_ids=[first]))])[0]
    assert stopped.token_ids == [first]
    held = engine.generate([Request(text="the cat", sampling=SamplingParams(
        max_new_tokens=8, ignore_eos=True, stop_token_ids=[first], min_tokens=3, stop=[free.text[:1] or "x"]))])[0]
    assert len(held.token_ids) >= 3 and first not in held.token_ids[:3]


def test_a_processed_greedy_row_skips_the_int8_screen(engine):
    """The screen gives the raw argmax: a biased greedy row must take the full-logits path."""
    assert engine.runner.greedy_head is not None
    out = engine.generate([Request(input_ids=[5, 6], sampling=SamplingParams(max_new_tokens=4, ignore_eos=True,
                                                                            logit_bias={123: 100}))])[0]
    assert out.token_ids == [123] * 4


def test_engine_batches_equal_the_reference_path(model_dir_for):
    d = model_dir_for("llama")
    ref = Engine(d, device="cpu", dtype="float32", backend="reference")
    eng = Engine(d, device="cpu", dtype="float32", max_batched_tokens=40)
    names = register_tasks([ref, eng], 3) + [None]
    variants = [dict(), dict(repetition_penalty=1.4), dict(frequency_penalty=1.5, presence_penalty=0.5),
                dict(logit_bias={7: 4.0, 8: -50}), dict(min_tokens=5), dict(temperature=0.9, seed=3, min_p=0.1,
                repetition_penalty=0.8), dict(temperature=1.2, seed=4, frequency_penalty=-1.0, top_k=20),
                dict(temperature=0.7, seed=5), dict(allowed_token_ids=[7, 8, 9, 400]),
                dict(temperature=1.1, seed=6, allowed_token_ids=list(range(100, 140)), min_tokens=2),
                dict(bad_words_token_ids=[[7], [8, 9]], temperature=0.8, seed=7)]
    g = torch.Generator().manual_seed(2)
    requests = [Request(prompt=names[i % len(names)], input_ids=torch.randint(4, 500, (int(n),), generator=g).tolist(),
                        sampling=SamplingParams(max_new_tokens=7, **variants[i % len(variants)]))
                for i, n in enumerate(torch.randint(1, 30, (24,), generator=g))]
    want = [o.token_ids for o in ref.generate(requests)]
    assert [o.token_ids for o in eng.generate(requests)] == want
    assert [eng.generate([r])[0].token_ids for r in requests[:8]] == want[:8]
    assert_no_leaks(eng)


def test_logit_bias_outside_the_vocabulary_is_a_request_error(engine):
    with pytest.raises(RequestError, match="logit_bias token id 512 is out of range"):
        engine.add_request(Request(input_ids=[1], sampling=SamplingParams(logit_bias={512: 1.0})))
    assert not engine.has_unfinished_requests()


def test_min_tokens_is_capped_with_max_new_tokens_where_the_model_runs_out_of_positions(engine):
    room = engine.config.max_positions - 250
    prepared = engine.prepare(Request(input_ids=[5] * 250, sampling=SamplingParams(max_new_tokens=20,
                                                                                  min_tokens=20)))
    assert prepared.params.max_new_tokens == room == prepared.params.min_tokens


def test_bad_words_ban_a_words_last_token_after_its_first_ones():
    logits = torch.zeros(3, 16)
    words = ((5,), (7, 8), (1, 2, 3))
    params = SamplingParams(bad_words_token_ids=words)
    out = process_logits(logits, [params] * 3, [([9], []), ([9], [4, 7]), ([1, 2], [0, 1, 2])], ())
    banned = [set(torch.nonzero(row == float("-inf")).flatten().tolist()) for row in out]
    # vLLM's rule: only generated tokens count (the input's 1, 2 do not make 3 a bad word's end in row 0)
    assert banned == [{5}, {5, 8}, {5, 3}]


def test_bad_words_are_encoded_as_vllm_does_and_equal_hf_generate(engine, model_dir_for):
    """Each word alone and after a space; greedy equals HF generate with the same bad_words_ids where no word
    starts in the input (HF also matches a word's first tokens against the input; vLLM and the engine do not)."""
    from transformers import AutoModelForCausalLM

    from softprompt.engine.api import bad_words_token_ids

    tok = engine.tokenizer
    cat, space_cat = tok.encode("cat", add_special_tokens=False), tok.encode(" cat", add_special_tokens=False)
    assert bad_words_token_ids(tok, ("cat",)) == tuple(
        {tuple(cat): 0, **({tuple(space_cat): 0} if len(space_cat) == len(cat) and space_cat[0] != cat[0] else {})})
    ids = [5, 6, 7, 8]
    free = engine.generate([Request(input_ids=ids, sampling=SamplingParams(max_new_tokens=10,
                                                                          ignore_eos=True))])[0].token_ids
    words = [[free[2]], [free[5], free[6]]]
    assert all(w[0] != ids[-1] for w in words)
    hf = AutoModelForCausalLM.from_pretrained(model_dir_for("llama"), dtype=torch.float32).eval()
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, 4, dtype=torch.long), do_sample=False,
                          max_new_tokens=10, min_new_tokens=10, bad_words_ids=words, pad_token_id=0)
    want = out[0, 4:].tolist()
    got = engine.generate([Request(input_ids=ids, sampling=SamplingParams(
        max_new_tokens=10, ignore_eos=True, bad_words_token_ids=words))])[0].token_ids
    assert got == want and got != free and free[2] not in got
    # a generated token that is a whole word, as encoded alone or after a space: banned by its text
    token, word = next((t, tok.decode([t]).strip()) for t in free if tok.decode([t]).strip() and [t] in (
        tok.encode(tok.decode([t]).strip(), add_special_tokens=False),
        tok.encode(" " + tok.decode([t]).strip(), add_special_tokens=False)))
    banned = engine.generate([Request(input_ids=ids, sampling=SamplingParams(
        max_new_tokens=10, ignore_eos=True, bad_words=[word]))])[0]
    assert token not in banned.token_ids and banned.token_ids != free
    with pytest.raises(RequestError, match="bad word token id 99999 is out of range"):
        engine.generate([Request(input_ids=ids, sampling=SamplingParams(bad_words_token_ids=[[99999]]))])
