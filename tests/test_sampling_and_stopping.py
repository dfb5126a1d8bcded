"""Sampling filters, stop conditions and text I/O through the engine."""

from __future__ import annotations

import pytest
import torch

from softprompt import Engine, Request, SamplingParams
from softprompt.engine.errors import RequestError, SamplingParamsError
from softprompt.engine.sampling import _filtered_probs, _top_p, draw, filtered_probs, sample_next


def test_top_k_and_top_p_filters():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    probs = _filtered_probs(logits, SamplingParams(temperature=1.0, top_k=2))
    assert (probs[2:] == 0).all() and torch.isclose(probs.sum(), torch.tensor(1.0))
    full = torch.softmax(logits, -1)
    probs = _filtered_probs(logits, SamplingParams(temperature=1.0, top_p=full[0].item() + 1e-3))
    assert (probs[:2] > 0).all() and (probs[2:] == 0).all()
    probs = _filtered_probs(logits, SamplingParams(temperature=1.0, top_p=0.01))
    assert probs[0] == 1.0


def test_draw_follows_the_distribution_and_never_picks_a_zero():
    """The sampler's one-uniform CDF inversion: frequencies within 4 standard deviations of the probabilities over
    20000 draws, zero-probability tokens never drawn (also at the ends of the vocabulary), seeded draws repeat."""
    probs = torch.zeros(1000)
    probs[[1, 17, 500, 998]] = torch.tensor([0.5, 0.25, 0.15, 0.1])
    gen = torch.Generator().manual_seed(0)
    n = 20000
    counts = torch.bincount(torch.tensor([draw(probs, gen) for _ in range(n)]), minlength=1000).double()
    assert counts.sum() == n and counts[probs == 0].sum() == 0
    expected = probs.double() * n
    assert ((counts - expected).abs() <= 4 * (expected * (1 - probs.double())).sqrt()).all()
    edge = torch.tensor([0.0, 1.0, 0.0])
    assert {draw(edge, gen) for _ in range(100)} == {1}
    weights = torch.tensor([2.0, 0.0, 6.0])  # unnormalised weights are fine
    assert {draw(weights, gen) for _ in range(200)} == {0, 2}
    a, b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert [draw(probs, a) for _ in range(50)] == [draw(probs, b) for _ in range(50)]


def test_top_p_among_candidates_equals_sorting_the_whole_vocabulary():
    """top_p looks for the nucleus among each row's 256 likeliest tokens and sorts the whole row only where they
    hold less than top_p: peaked and flat rows, in one batch, equal the whole sort exactly."""
    torch.manual_seed(1)
    logits = torch.cat([torch.randn(3, 5000) * 6, torch.randn(3, 5000) * 0.1])  # peaked rows, then flat ones
    probs = torch.softmax(logits, dim=-1)
    top_p = torch.tensor([[0.5], [0.9], [0.99], [0.5], [0.9], [0.99]])
    fast, whole = _top_p(probs, top_p), _top_p(probs, top_p, candidates=5000)
    assert torch.equal(fast, whole)
    kept = (whole > 0).sum(dim=-1)
    assert (kept[:3] < 256).all() and (kept[3:] > 256).all()  # both paths were taken


def test_a_batch_samples_each_row_as_it_would_alone():
    """filtered_probs and the draws run batched over a step's sampled rows; each row's probabilities are exactly
    those it gets alone, and seeded rows draw the same tokens in any batch (greedy rows mixed in)."""
    torch.manual_seed(0)
    logits = torch.randn(16, 700) * 4
    params = [SamplingParams(temperature=[0.0, 0.6, 1.0, 1.5][i % 4], seed=i, top_k=[0, 3, 40, 0][i % 4],
                             top_p=[1.0, 1.0, 0.8, 0.5][i % 4] if i % 3 else 1.0, min_p=0.1 if i % 5 == 2 else 0.0)
              for i in range(16)]
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    batch = filtered_probs(logits[sampled], [params[i] for i in sampled])
    for j, i in enumerate(sampled):
        assert torch.equal(batch[j], _filtered_probs(logits[i], params[i]))

    def gens():
        return [None if p.greedy else torch.Generator().manual_seed(p.seed) for p in params]

    together = [sample_next(logits, params, g)[0] for g in [gens()] for _ in range(5)]
    alone_gens = gens()
    alone = [[sample_next(logits[i:i + 1], [params[i]], [alone_gens[i]])[0][0] for i in range(16)] for _ in range(5)]
    assert together == alone


def test_seeded_sampling_reproducible_and_greedy_is_argmax():
    logits = torch.randn(3, 50)
    params = [SamplingParams(temperature=1.0, seed=s) for s in (1, 1, 2)]
    gens = [torch.Generator().manual_seed(p.seed) for p in params]
    a, _ = sample_next(logits[[0, 0, 0]], params, gens)
    assert a[0] == a[1]
    greedy, lps = sample_next(logits, [SamplingParams(logprobs=2)] * 3, [None] * 3)
    assert greedy == logits.argmax(-1).tolist()
    assert all(len(lp.top) == 2 and lp.token_id in lp.top for lp in lps)


@pytest.fixture(scope="module")
def engine(model_dir_for):
    return Engine(model_dir_for("llama"), device="cpu", dtype="float32", backend="torch")


def test_stop_token_ids_and_eos(engine):
    free = engine.generate([Request(input_ids=[5, 6, 7], sampling=SamplingParams(max_new_tokens=8, ignore_eos=True))])
    tokens = free[0].token_ids
    stop_at = tokens[3]
    out = engine.generate([Request(input_ids=[5, 6, 7],
                                   sampling=SamplingParams(max_new_tokens=8, stop_token_ids=[stop_at]))])[0]
    assert out.token_ids == tokens[: tokens.index(stop_at) + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_at
    # EOS ends generation unless ignore_eos; make the model's EOS be the greedy next token by registering it
    eos = engine.eos_token_ids[0]
    e_out = engine.generate([Request(input_ids=[5, 6, 7], sampling=SamplingParams(max_new_tokens=8,
                                                                                  stop_token_ids=[eos]))])[0]
    assert e_out.finish_reason in ("stop", "length")


def test_stop_strings_cut_text(engine):
    base = engine.generate([Request(text="the cat", sampling=SamplingParams(max_new_tokens=12, ignore_eos=True))])[0]
    assert base.text and base.finish_reason == "length"
    stop = base.text[len(base.text) // 2: len(base.text) // 2 + 2]
    if not stop.strip():
        pytest.skip("generated text has no usable stop substring")
    out = engine.generate([Request(text="the cat", sampling=SamplingParams(max_new_tokens=12, stop=[stop],
                                                                          ignore_eos=True))])[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert stop not in out.text and base.text.startswith(out.text)


def test_text_input_equals_token_ids(engine):
    ids = engine.tokenizer.encode("the dog ran")
    a = engine.generate([Request(text="the dog ran", sampling=SamplingParams(max_new_tokens=5))])[0]
    b = engine.generate([Request(input_ids=ids, sampling=SamplingParams(max_new_tokens=5))])[0]
    assert a.token_ids == b.token_ids and a.input_ids == ids
    assert a.text == engine.tokenizer.decode(a.token_ids)
    assert a.timing.ttft is not None and a.timing.latency >= a.timing.ttft


def test_truncate_prompt_tokens_keeps_the_inputs_end(engine):
    """vLLM's truncate_prompt_tokens: the last k input tokens, as if only they were sent; -1 keeps all that fit
    the model's positions (with one new token), where the whole input would be refused."""
    ids = [(7 * i) % 400 + 4 for i in range(40)]
    cut = engine.generate([Request(input_ids=ids, sampling=SamplingParams(max_new_tokens=5,
                                                                          truncate_prompt_tokens=10))])[0]
    tail = engine.generate([Request(input_ids=ids[-10:], sampling=SamplingParams(max_new_tokens=5))])[0]
    assert cut.input_ids == ids[-10:] and cut.token_ids == tail.token_ids
    same = engine.generate([Request(input_ids=ids, sampling=SamplingParams(max_new_tokens=3,
                                                                           truncate_prompt_tokens=99))])[0]
    assert same.input_ids == ids
    positions = engine.config.max_positions
    long = [(3 * i) % 400 + 4 for i in range(positions + 5)]
    with pytest.raises(RequestError, match="leaves no room"):
        engine.generate([Request(input_ids=long, sampling=SamplingParams(max_new_tokens=2))])
    [fit] = engine.generate([Request(input_ids=long, sampling=SamplingParams(max_new_tokens=2,
                                                                             truncate_prompt_tokens=-1))])
    assert fit.input_ids == long[-(positions - 1):] and len(fit.token_ids) == 1  # capped: the last position
    for bad in (0, -2, 1.5, True):
        with pytest.raises(SamplingParamsError, match="truncate_prompt_tokens"):
            SamplingParams(truncate_prompt_tokens=bad)
