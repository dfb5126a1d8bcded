"""ScreenedGreedyHead: the int8-screened greedy argmax equals the float32 argmax exactly, near-ties included, and
the screen's error bound holds."""

from __future__ import annotations

import pytest
import torch

from softprompt import Engine, Request, SamplingParams
from softprompt.engine.greedy_head import CHUNK, SAFETY, ScreenedGreedyHead, _quantize_rows

needs_int8 = pytest.mark.skipif(
    not ScreenedGreedyHead.applies(torch.zeros(1, 1), None),
    reason="this CPU's torch has no int8 GEMM: the engine uses fp32 logits for every row here")


def fp32_argmax(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return (hidden @ weight.t()).argmax(dim=-1)


@needs_int8
@pytest.mark.parametrize("vocab,hidden_size,scale", [(512, 64, 1.0), (32000, 256, 0.125), (5003, 96, 30.0)])
def test_random_rows_give_the_fp32_argmax(vocab, hidden_size, scale):
    gen = torch.Generator().manual_seed(vocab)
    weight = torch.randn(vocab, hidden_size, generator=gen) * scale
    weight[::7] *= 4  # rows of different norms
    hidden = torch.randn(97, hidden_size, generator=gen) * torch.logspace(-2, 2, 97)[:, None]
    head = ScreenedGreedyHead(weight)
    assert torch.equal(head(hidden), fp32_argmax(hidden, weight))


@needs_int8
@pytest.mark.parametrize("outliers", [False, True])
def test_the_screen_error_bound_holds(outliers):
    """Every screened logit is within its chunk's bound of the fp32 logit (what makes the screen exact), and the
    bound is tight enough that the screen skips most of the vocabulary."""
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(3000, 80, generator=gen) * 0.02
    if outliers:  # a few rows and columns far larger than the rest, as in trained embeddings
        weight[::97] *= 40
        weight[:, 3] *= 25
    hidden = torch.randn(33, 80, generator=gen) * torch.logspace(-3, 2, 33)[:, None]
    hidden[4] = 0
    head = ScreenedGreedyHead(weight)
    q, h_scale = _quantize_rows(hidden)
    acc = (q.double() @ head.screen.double()).view(33, -1, CHUNK)  # the exact int32 sums
    screened = acc * (h_scale.double()[:, None] * head.scale.double()[None])[..., None]
    fp32 = (hidden @ weight[head.token_of].t()).view(33, -1, CHUNK)
    h_error = (hidden - q * h_scale[:, None]).norm(dim=1) + head.hidden_slack * h_scale
    bound = hidden.norm(dim=1)[:, None] * head.weight_error + h_error[:, None] * head.dequantized_norm
    assert ((screened - fp32).abs() <= bound[..., None]).all()
    chunk_best = screened.amax(dim=-1)
    kept = chunk_best + SAFETY * bound >= (chunk_best - SAFETY * bound).amax(dim=1, keepdim=True)
    assert kept[hidden.norm(dim=1) > 1].float().mean() < 0.25
    assert torch.equal(head(hidden), fp32_argmax(hidden, weight))


@needs_int8
def test_near_ties_below_bf16_resolution_and_exact_ties():
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(1000, 64, generator=gen)
    hidden = torch.randn(8, 64, generator=gen)
    for row in range(8):
        h = hidden[row]
        a, b = 10 * row + 3, 10 * row + 7
        weight[a] = 6 * h / h.norm()  # the row's clear winner...
        weight[b] = weight[a] + (1e-4 if row % 2 else -1e-4) * h / h.norm() ** 2  # ...within 1e-4 (screen: ~1e-2)
    weight[200] = weight[3]  # an exact tie with row 0's winner (a lower id than 3 would win; 3 < 200 stays)
    weight[1] = weight[13]  # an exact tie with row 1's runner-up, at a lower id
    head = ScreenedGreedyHead(weight)
    got, want = head(hidden), fp32_argmax(hidden, weight)
    assert torch.equal(got, want)
    assert got[1].item() == 17 and got[0].item() == 3  # b wins by 1e-4 in odd rows, a in even rows


@needs_int8
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 1e30])
def test_non_finite_rows_fall_back_to_fp32(value):
    weight = torch.randn(300, 32, generator=torch.Generator().manual_seed(2))
    hidden = torch.randn(3, 32, generator=torch.Generator().manual_seed(3))
    hidden[1, 5] = value  # 1e30: finite, but its norm overflows fp32
    head = ScreenedGreedyHead(weight)
    head.screen = None  # the fallback must not touch the screen
    got = head(hidden)
    assert torch.equal(got, fp32_argmax(hidden, weight)) and int(got.max()) < 300


def test_applies_only_to_fp32_heads_without_bias():
    w = torch.zeros(4, 4)
    assert not ScreenedGreedyHead.applies(w, torch.zeros(4))
    assert not ScreenedGreedyHead.applies(w.to(torch.bfloat16), None)


@needs_int8
def test_engine_greedy_tokens_equal_with_and_without_the_screen(model_dir_for, adapter_for):
    engine = Engine(model_dir_for("llama"), device="cpu", kv_cache_bytes=4 << 20)
    engine.add_prompt("a", adapter_for("llama", seed=0))
    assert engine.runner.greedy_head is not None
    model = engine.runner.model
    if model.lm_head_module.weight is not model.word_embeddings.weight:  # an untied head is held row-major for the
        assert model.lm_head_module.weight.stride(1) == 1  # screen's rescoring (not [in, out] as other projections)
    requests = [Request(prompt="a" if i % 2 else None, input_ids=[5 + i, 9, 33 + i],
                        sampling=SamplingParams(max_new_tokens=12, ignore_eos=True,
                                                logprobs=2 if i == 3 else None, temperature=0.8 if i == 5 else 0,
                                                seed=7))
                for i in range(8)]
    screened = engine.generate(requests)
    engine.runner.greedy_head = None
    plain = engine.generate(requests)
    assert [o.token_ids for o in screened] == [o.token_ids for o in plain]
    for got, want in zip(screened[3].logprobs, plain[3].logprobs):  # fp32 logits of fewer rows: same to 1e-5
        assert got.token_id == want.token_id and got.logprob == pytest.approx(want.logprob, abs=1e-5)
        assert got.top.keys() == want.top.keys()
