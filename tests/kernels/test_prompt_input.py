"""fused_prompt_input against its reference and against our models' embedding step + layer 0's input norm.

Tolerances: fp32 1e-5 (only the reduction order differs). fp16 is bit-exact on the residual and within 1 ulp on
the normed input (reduction order before one rounding): atol/rtol 1e-2. bf16 2e-2 / 5e-2: the Triton interpreter
truncates fp32 -> bf16 instead of rounding to nearest, so it can be 1 bf16 ulp off (CUDA rounds like torch).
"""

from __future__ import annotations

import pytest
import torch

from softprompt.engine.loader import load_model
from softprompt.kernels.prompt_input import fused_prompt_input, fused_prompt_input_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-2, 1e-2), torch.bfloat16: (5e-2, 2e-2)}  # (atol, rtol)
STYLES = ("llama", "gpt2", "bloom")
HIDDEN = [64, 80, 256] + ([1024, 2048, 4096] if torch.cuda.is_available() else [])
MAX_POS = 64


def make_batch(layout: str, num_tasks: int = 3, seed: int = 0):
    """A packed batch of sequences [prompt rows of its task ; its tokens], as the engine's prefill/decode sees it.

    layout "mixed": prompts + tokens; "all_prompt": prompt rows only (prefix precompute); "no_prompt": tokens only
    with an empty prompt table (decode / cached prefix). Unused indices are -1 to check they are never read.
    """
    g = torch.Generator().manual_seed(seed)
    prompt_lens = [1, 5, 3, 7][:num_tasks]  # P = 1 and lengths off the power-of-2 grid
    starts = torch.tensor([0] + prompt_lens).cumsum(0).tolist()
    token_lens = [4, 1, 9, 2][:num_tasks]
    ids, rows, flags, pos = [], [], [], []
    for task, (p, n) in enumerate(zip(prompt_lens, token_lens)):
        p_used = 0 if layout == "no_prompt" else p
        n_used = 0 if layout == "all_prompt" else n
        offset = 3 * task if layout == "no_prompt" else 0  # decode-style positions that do not start at 0
        ids += [-1] * p_used + torch.randint(0, 50, (n_used,), generator=g).tolist()
        rows += list(range(starts[task], starts[task] + p_used)) + [-1] * n_used
        flags += [True] * p_used + [False] * n_used
        pos += list(range(offset, offset + p_used + n_used))
    num_rows = 0 if layout == "no_prompt" else starts[num_tasks]
    return (torch.tensor(ids, device=DEVICE), torch.tensor(rows, dtype=torch.int32, device=DEVICE),
            torch.tensor(flags, device=DEVICE), torch.tensor(pos, device=DEVICE), num_rows)


def style_args(style: str, hidden: int, dtype: torch.dtype, positions: torch.Tensor, g: torch.Generator) -> dict:
    def vec(center: float) -> torch.Tensor:
        return (center + 0.2 * torch.randn(hidden, generator=g)).to(DEVICE, dtype)

    return {
        "positions": positions if style == "gpt2" else None,
        "pos_table": torch.randn(MAX_POS, hidden, generator=g).to(DEVICE, dtype) if style == "gpt2" else None,
        "embed_norm": (vec(1.0), vec(0.0), 1e-5) if style == "bloom" else None,
        "input_norm": (vec(1.0), None, 1e-6, "rms") if style == "llama" else (vec(1.0), vec(0.0), 1e-5, "layer"),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("layout", ["mixed", "all_prompt", "no_prompt"])
@pytest.mark.parametrize("style", STYLES)
def test_matches_reference(style, layout, hidden, dtype):
    g = torch.Generator().manual_seed(hidden)
    token_ids, prompt_rows, is_prompt, positions, num_rows = make_batch(layout)
    if layout == "mixed":
        token_ids = token_ids.int()  # both index dtypes are accepted
    token_table = (3 * torch.randn(50, hidden, generator=g)).to(DEVICE, dtype)  # off-centre scale for the norms
    prompt_table = torch.randn(num_rows, hidden, generator=g).to(DEVICE, dtype)
    args = (token_ids, prompt_rows, is_prompt, token_table, prompt_table)
    kwargs = style_args(style, hidden, dtype, positions, g)
    residual, normed = fused_prompt_input(*args, **kwargs)
    ref_residual, ref_normed = fused_prompt_input_reference(*args, **kwargs)
    assert residual.dtype == normed.dtype == dtype and residual.shape == normed.shape == (len(token_ids), hidden)
    atol, rtol = TOL[dtype]
    if style == "llama":  # a pure gather
        torch.testing.assert_close(residual, ref_residual, atol=0, rtol=0)
    torch.testing.assert_close(residual, ref_residual, atol=atol, rtol=rtol)
    torch.testing.assert_close(normed, ref_normed, atol=atol, rtol=rtol)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="full-size batch only on CUDA")
@pytest.mark.parametrize("style", STYLES)
def test_large_batch_cuda(style):
    g = torch.Generator().manual_seed(0)
    t, hidden, vocab, rows = 8192, 4096, 32000, 400
    is_prompt = torch.rand(t, generator=g) < 0.1
    token_ids = torch.randint(0, vocab, (t,), generator=g)
    prompt_rows = torch.randint(0, rows, (t,), generator=g)
    positions = torch.randint(0, MAX_POS, (t,), generator=g)
    args = [x.to(DEVICE) for x in (token_ids, prompt_rows, is_prompt)] + [
        torch.randn(vocab, hidden, generator=g).to(DEVICE, torch.bfloat16),
        torch.randn(rows, hidden, generator=g).to(DEVICE, torch.bfloat16)]
    kwargs = style_args(style, hidden, torch.bfloat16, positions.to(DEVICE), g)
    for got, want in zip(fused_prompt_input(*args, **kwargs), fused_prompt_input_reference(*args, **kwargs)):
        torch.testing.assert_close(got, want, atol=5e-2, rtol=2e-2)


def test_rejects_bad_inputs():
    ids = torch.zeros(3, dtype=torch.long, device=DEVICE)
    table = torch.randn(8, 64, device=DEVICE)
    norm = (torch.ones(64, device=DEVICE), None, 1e-6, "rms")
    with pytest.raises(ValueError, match="bool"):
        fused_prompt_input(ids, ids, ids, table, table, None, None, None, norm)
    flags = torch.zeros(3, dtype=torch.bool, device=DEVICE)
    with pytest.raises(ValueError, match="dtypes differ"):
        fused_prompt_input(ids, ids, flags, table, table.half(), None, None, None, norm)
    with pytest.raises(ValueError, match="kind"):
        fused_prompt_input(ids, ids, flags, table, table, None, None, None, (norm[0], None, 1e-6, "batch"))
    with pytest.raises(ValueError, match="go together"):
        fused_prompt_input(ids, ids, flags, table, table, ids, None, None, norm)


def model_style_args(model, positions: torch.Tensor) -> dict:
    """The launcher's architecture arguments read off one of our models."""
    family = type(model).__name__
    if family.startswith("Llama"):
        ln = model.model.layers[0].input_layernorm
        return {"positions": None, "pos_table": None, "embed_norm": None,
                "input_norm": (ln.weight, None, ln.eps, "rms")}
    if family.startswith("GPT2"):
        ln = model.transformer.h[0].ln_1
        return {"positions": positions, "pos_table": model.transformer.wpe.weight, "embed_norm": None,
                "input_norm": (ln.weight, ln.bias, ln.eps, "layer")}
    emb, ln = model.transformer.word_embeddings_layernorm, model.transformer.h[0].input_layernorm
    return {"positions": None, "pos_table": None, "embed_norm": (emb.weight, emb.bias, emb.eps),
            "input_norm": (ln.weight, ln.bias, ln.eps, "layer")}


def model_embedding_step(model, embeds: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What our model's forward computes before layer 0's attention: (residual h, normed input)."""
    family = type(model).__name__
    if family.startswith("Llama"):
        return embeds, model.model.layers[0].input_layernorm(embeds)
    if family.startswith("GPT2"):
        h = embeds + model.transformer.wpe(positions)
        return h, model.transformer.h[0].ln_1(h)
    h = model.transformer.word_embeddings_layernorm(embeds)
    return h, model.transformer.h[0].input_layernorm(h)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("arch", STYLES)
def test_matches_model_embedding_step(arch, dtype, model_dir_for):
    """[prompt rows ; token rows] through the kernel == our model's embedding step and layer 0's input norm."""
    model = load_model(model_dir_for(arch), DEVICE, "float32" if dtype == torch.float32 else "float16")
    hidden = model.config.hidden_size
    g = torch.Generator().manual_seed(1)
    prompt_table = torch.randn(8, hidden, generator=g).to(DEVICE, dtype)  # task 0: rows 0..4, task 1: rows 5..7
    ids = torch.randint(0, model.config.vocab_size, (11,), generator=g).to(DEVICE)
    rows = torch.arange(5, 8, device=DEVICE)  # task 1's prompt, then its tokens
    n_p, n_t = len(rows), len(ids)
    positions = torch.arange(n_p + n_t, device=DEVICE)
    embeds = torch.cat([prompt_table[rows], model.embed_tokens(ids)])
    with torch.no_grad():
        want_residual, want_normed = model_embedding_step(model, embeds, positions)
        residual, normed = fused_prompt_input(
            torch.cat([ids.new_full((n_p,), -1), ids]), torch.cat([rows, rows.new_full((n_t,), -1)]),
            positions < n_p, model.word_embeddings.weight, prompt_table, **model_style_args(model, positions))
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(residual, want_residual, atol=atol, rtol=rtol)
    torch.testing.assert_close(normed, want_normed, atol=atol, rtol=rtol)
