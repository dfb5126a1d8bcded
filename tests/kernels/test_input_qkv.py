"""fused_input_qkv (layer 0's QKV GEMM with the gather + embedding step + input norm as its prologue) against its
reference, and inside our models' forward.

Tolerances (atol, rtol): the residual as in test_prompt_input.py. The projection: fp32 1e-4 (IEEE fp32 products,
only the summation order differs); fp16 2e-2; bf16 6e-2 (CUDA only): the normed input can be 1 ulp off the
reference's, which the projection carries over H products.
"""

from __future__ import annotations

import pytest
import torch

from softprompt.engine.loader import load_model
from softprompt.engine.models.base import Layer0Input
from softprompt.engine.reference import DenseCausalAttention
from softprompt.kernels.input_qkv import fused_input_qkv, fused_input_qkv_reference
from softprompt.kernels.prompt_input import fused_prompt_input

from .test_prompt_input import DEVICE, STYLES, TOL, make_batch, style_args

# The interpreter's tl.dot multiplies bf16 operands as their raw bits (triton 3.9): bf16 runs on CUDA only.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])
QKV_TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-2, 2e-2), torch.bfloat16: (6e-2, 6e-2)}
HIDDEN = [64, 80] + ([2048, 4096] if torch.cuda.is_available() else [])


def projection(hidden: int, width: int, dtype: torch.dtype, layout: str, bias: bool, g: torch.Generator):
    weight = (torch.randn(width, hidden, generator=g) / hidden ** 0.5).to(DEVICE, dtype)
    if layout == "in_out":  # [in, out] storage, as the CPU keeps fp32 projections
        weight = weight.t().contiguous().t()
    return weight, (torch.randn(width, generator=g).to(DEVICE, dtype) if bias else None)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("layout", ["mixed", "all_prompt", "no_prompt"])
@pytest.mark.parametrize("style", STYLES + ("bloom_post_norm",))
def test_matches_reference(style, layout, hidden, dtype):
    g = torch.Generator().manual_seed(hidden)
    token_ids, prompt_rows, is_prompt, positions, num_rows = make_batch(layout, num_tasks=4)  # > one row tile
    token_table = (3 * torch.randn(50, hidden, generator=g)).to(DEVICE, dtype)
    prompt_table = torch.randn(num_rows, hidden, generator=g).to(DEVICE, dtype)
    kwargs = style_args(style.removesuffix("_post_norm"), hidden, dtype, positions, g)
    width = 3 * hidden - 16 if style == "llama" else 3 * hidden  # GQA-like widths off the tile grid
    weight, bias = projection(hidden, width, dtype, "in_out" if hidden == 80 else "out_in", style != "llama", g)
    args = (token_ids, prompt_rows, is_prompt, token_table, prompt_table)
    post = style == "bloom_post_norm"
    residual, qkv = fused_input_qkv(*args, **kwargs, weight=weight, bias=bias, residual_is_normed=post)
    want_residual, want_qkv = fused_input_qkv_reference(*args, **kwargs, weight=weight, bias=bias,
                                                        residual_is_normed=post)
    assert residual.dtype == qkv.dtype == dtype
    assert residual.shape == (len(token_ids), hidden) and qkv.shape == (len(token_ids), width)
    if style == "llama":  # a pure gather
        torch.testing.assert_close(residual, want_residual, atol=0, rtol=0)
    torch.testing.assert_close(residual, want_residual, atol=TOL[dtype][0], rtol=TOL[dtype][1])
    atol, rtol = QKV_TOL[dtype]
    torch.testing.assert_close(qkv, want_qkv, atol=atol, rtol=rtol)


def test_empty_batch():
    table = torch.randn(8, 64, device=DEVICE)
    ids = torch.zeros(0, dtype=torch.long, device=DEVICE)
    residual, qkv = fused_input_qkv(ids, ids, ids.bool(), table, table[:0], None, None, None,
                                    (torch.ones(64, device=DEVICE), None, 1e-6, "rms"),
                                    torch.randn(96, 64, device=DEVICE), None)
    assert residual.shape == (0, 64) and qkv.shape == (0, 96)


def test_rejects_bad_inputs():
    ids = torch.zeros(3, dtype=torch.long, device=DEVICE)
    flags = torch.zeros(3, dtype=torch.bool, device=DEVICE)
    table = torch.randn(8, 64, device=DEVICE)
    norm = (torch.ones(64, device=DEVICE), None, 1e-6, "rms")
    weight = torch.randn(96, 64, device=DEVICE)
    with pytest.raises(ValueError, match="weight must be"):
        fused_input_qkv(ids, ids, flags, table, table, None, None, None, norm, weight[:, :32], None)
    with pytest.raises(ValueError, match="weight must be"):
        fused_input_qkv(ids, ids, flags, table, table, None, None, None, norm, weight.half(), None)
    with pytest.raises(ValueError, match="bias must be"):
        fused_input_qkv(ids, ids, flags, table, table, None, None, None, norm, weight, torch.zeros(95, device=DEVICE))
    with pytest.raises(ValueError, match="input norm's weight"):
        fused_input_qkv(ids, ids, flags, table, table, None, None, None, (norm[0].half(), None, 1e-6, "rms"),
                        weight, None)
    with pytest.raises(ValueError, match="bool"):
        fused_input_qkv(ids, ids, ids, table, table, None, None, None, norm, weight, None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("variant", ["llama", "qwen2", "gpt2", "bloom", "bloom_post_norm", "phi", "opt",
                                     "gpt_bigcode", "gpt_neo", "stablelm_parallel", "falcon", "cohere",
                                     "nemotron"])
def test_model_forward_with_fused_layer0(variant, dtype, model_dir_for):
    """Our model's forward over [prompt rows ; token rows] == the same forward given layer 0's input by either
    kernel: (residual, qkv) from fused_input_qkv, (residual, normed) from fused_prompt_input."""
    model = load_model(model_dir_for(variant), DEVICE, "float32" if dtype == torch.float32 else "float16")
    c = model.config
    g = torch.Generator().manual_seed(2)
    prompt_table = torch.randn(8, c.hidden_size, generator=g).to(DEVICE, dtype)
    ids = torch.randint(0, c.vocab_size, (11,), generator=g).to(DEVICE)
    rows = torch.arange(5, 8, device=DEVICE)  # task 1's prompt, then its tokens
    n_p, n_t = len(rows), len(ids)
    positions = torch.arange(n_p + n_t, device=DEVICE)
    attention = DenseCausalAttention(positions, c.attention_scale, model.alibi)
    norms = model.layer0_norms()
    args = (torch.cat([ids.new_full((n_p,), -1), ids]), torch.cat([rows, rows.new_full((n_t,), -1)]),
            positions < n_p, model.word_embeddings.weight, prompt_table,
            positions if norms.pos_table is not None else None, norms.pos_table, norms.embed_norm, norms.input_norm)
    with torch.no_grad():
        want = model(torch.cat([prompt_table[rows], model.embed_tokens(ids)]), positions, attention)
        residual, qkv = fused_input_qkv(*args, *norms.qkv, residual_is_normed=norms.residual_is_normed)
        got_qkv = model(None, positions, attention, Layer0Input(residual, qkv=qkv))
        residual, normed = fused_prompt_input(*args)
        got_normed = model(None, positions, attention, Layer0Input(residual, normed=normed))
    atol, rtol = (1e-4, 1e-4) if dtype == torch.float32 else (3e-2, 3e-2)
    torch.testing.assert_close(got_qkv, want, atol=atol, rtol=rtol)
    torch.testing.assert_close(got_normed, want, atol=atol, rtol=rtol)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="full-size batch only on CUDA")
@pytest.mark.parametrize("style", STYLES)
def test_large_batch_cuda(style):
    g = torch.Generator().manual_seed(0)
    t, hidden, vocab, rows = 2048, 2048, 32000, 400
    is_prompt = torch.rand(t, generator=g) < 0.1
    args = [x.to(DEVICE) for x in (torch.randint(0, vocab, (t,), generator=g),
                                   torch.randint(0, rows, (t,), generator=g), is_prompt)] + [
        torch.randn(vocab, hidden, generator=g).to(DEVICE, torch.bfloat16),
        torch.randn(rows, hidden, generator=g).to(DEVICE, torch.bfloat16)]
    kwargs = style_args(style, hidden, torch.bfloat16, torch.randint(0, 64, (t,), generator=g).to(DEVICE), g)
    weight, bias = projection(hidden, 3072, torch.bfloat16, "out_in", style != "llama", g)
    got = fused_input_qkv(*args, **kwargs, weight=weight, bias=bias)
    want = fused_input_qkv_reference(*args, **kwargs, weight=weight, bias=bias)
    torch.testing.assert_close(got[0], want[0], atol=5e-2, rtol=2e-2)
    torch.testing.assert_close(got[1], want[1], atol=6e-2, rtol=6e-2)
