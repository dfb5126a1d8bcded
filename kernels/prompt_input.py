"""Fused first-layer input: gather soft-prompt / token-embedding rows, embedding step, layer 0's input norm.

Row t of layer 0's input is `prompt_table[prompt_rows[t]]` where `is_prompt[t]` else `token_table[token_ids[t]]`;
the [prompts ; tokens] concatenation is never materialised. One program per row gathers it, applies the family's
embedding step (GPT-2: `+ wpe[position]`; BLOOM: `word_embeddings_layernorm`; Llama: nothing), writes that as the
residual stream, and writes layer 0's input norm of it (RMSNorm or LayerNorm) as the normed input.
Rounding follows the model: every op computes in fp32 and rounds to the tables' dtype where the model's does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _prompt_input_kernel(
    token_ids_ptr, prompt_rows_ptr, is_prompt_ptr, token_table_ptr, prompt_table_ptr, positions_ptr, pos_table_ptr,
    embed_w_ptr, embed_b_ptr, norm_w_ptr, norm_b_ptr, residual_ptr, normed_ptr,
    token_stride, prompt_stride, pos_stride, H, embed_eps, norm_eps,
    HAS_POS: tl.constexpr, HAS_EMBED_NORM: tl.constexpr, RMS: tl.constexpr, HAS_NORM_BIAS: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    # Both gathers are predicated on the row's kind, so only one of them touches memory.
    use_prompt = tl.load(is_prompt_ptr + row).to(tl.int32) != 0
    prompt_len = tl.where(use_prompt, H, 0)  # columns to read from the prompt table, the rest from the token table
    token = tl.load(token_ids_ptr + row).to(tl.int64)
    prompt = tl.load(prompt_rows_ptr + row).to(tl.int64)
    x_tok = tl.load(token_table_ptr + token * token_stride + cols, mask=(cols >= prompt_len) & mask, other=0.0)
    x_pr = tl.load(prompt_table_ptr + prompt * prompt_stride + cols, mask=cols < prompt_len, other=0.0)
    x = tl.where(use_prompt, x_pr, x_tok)
    out_ty = x.dtype
    x = x.to(tl.float32)

    if HAS_POS:
        pos = tl.load(positions_ptr + row).to(tl.int64)
        x += tl.load(pos_table_ptr + pos * pos_stride + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_EMBED_NORM:
        mean = tl.sum(x, axis=0) / H
        xc = tl.where(mask, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / H + embed_eps)
        w = tl.load(embed_w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(embed_b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        x = xc * rstd * w + b
    h = x.to(out_ty)
    tl.store(residual_ptr + row * H + cols, h, mask=mask)

    x = h.to(tl.float32)  # the norm reads the rounded residual, as the model does
    w = tl.load(norm_w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if RMS:
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / H + norm_eps)
        y = (x * rstd).to(out_ty).to(tl.float32) * w  # RMSNorm: cast back before scaling
    else:
        mean = tl.sum(x, axis=0) / H
        xc = tl.where(mask, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / H + norm_eps)
        y = xc * rstd * w
        if HAS_NORM_BIAS:
            y += tl.load(norm_b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(normed_ptr + row * H + cols, y.to(out_ty), mask=mask)


def _num_warps(block: int) -> int:
    return 16 if block >= 8192 else 8 if block >= 2048 else 4


def check_input_args(
    token_ids: Tensor,
    prompt_rows: Tensor,
    is_prompt: Tensor,
    token_table: Tensor,
    prompt_table: Tensor,
    positions: Tensor | None,
    pos_table: Tensor | None,
    embed_norm: tuple[Tensor, Tensor, float] | None,
    input_norm: tuple[Tensor, Tensor | None, float, str],
) -> None:
    """ValueError naming the problem with a first-layer-input kernel's arguments (shared with input_qkv.py)."""
    t = token_ids.shape[0]
    h = token_table.shape[1]
    if not (token_ids.dim() == prompt_rows.dim() == is_prompt.dim() == 1
            and prompt_rows.shape[0] == is_prompt.shape[0] == t):
        raise ValueError("token_ids, prompt_rows and is_prompt must be 1-D of the same length")
    if is_prompt.dtype != torch.bool:
        raise ValueError(f"is_prompt must be bool, got {is_prompt.dtype}")
    if token_table.dim() != 2 or prompt_table.dim() != 2 or prompt_table.shape[1] != h:
        raise ValueError(f"tables must be [*, {h}], got {tuple(token_table.shape)} and {tuple(prompt_table.shape)}")
    if prompt_table.dtype != token_table.dtype:
        raise ValueError(f"table dtypes differ: {token_table.dtype} vs {prompt_table.dtype}")
    if token_table.stride(1) != 1 or prompt_table.stride(1) != 1:
        raise ValueError("tables must have unit stride on the hidden dim")
    if (positions is None) != (pos_table is None):
        raise ValueError("positions and pos_table go together")
    norm_w, norm_b, norm_eps, kind = input_norm
    if kind not in ("rms", "layer"):
        raise ValueError(f"input norm kind must be 'rms' or 'layer', got {kind!r}")
    if kind == "rms" and norm_b is not None:
        raise ValueError("RMSNorm takes no bias")
    if pos_table is not None and (pos_table.dim() != 2 or pos_table.shape[1] != h or pos_table.stride(1) != 1):
        raise ValueError(f"pos_table must be [max_pos, {h}] with unit stride on the hidden dim")
    if positions is not None and positions.shape != (t,):
        raise ValueError(f"positions must be [{t}]")
    vectors = [norm_w, norm_b] + (list(embed_norm[:2]) if embed_norm is not None else [])
    if any(v is not None and v.shape != (h,) for v in vectors):
        raise ValueError(f"norm weights and biases must be [{h}]")


def fused_prompt_input(
    token_ids: Tensor,
    prompt_rows: Tensor,
    is_prompt: Tensor,
    token_table: Tensor,
    prompt_table: Tensor,
    positions: Tensor | None,
    pos_table: Tensor | None,
    embed_norm: tuple[Tensor, Tensor, float] | None,
    input_norm: tuple[Tensor, Tensor | None, float, str],
) -> tuple[Tensor, Tensor]:
    """(residual [T, H], normed [T, H]) of layer 0, in the tables' dtype. Indices are not bounds-checked."""
    check_input_args(token_ids, prompt_rows, is_prompt, token_table, prompt_table, positions, pos_table, embed_norm,
                     input_norm)
    t = token_ids.shape[0]
    h = token_table.shape[1]
    norm_w, norm_b, norm_eps, kind = input_norm

    residual = token_table.new_empty(t, h)
    normed = token_table.new_empty(t, h)
    dummy = token_table  # stands in for absent optional tensors (never read)
    block = triton.next_power_of_2(h)
    _prompt_input_kernel[(t,)](
        token_ids.contiguous(), prompt_rows.contiguous(), is_prompt.contiguous(), token_table,
        prompt_table if prompt_table.shape[0] else dummy,
        positions.contiguous() if positions is not None else dummy, pos_table if pos_table is not None else dummy,
        embed_norm[0].contiguous() if embed_norm else dummy, embed_norm[1].contiguous() if embed_norm else dummy,
        norm_w.contiguous(), norm_b.contiguous() if norm_b is not None else dummy, residual, normed,
        token_table.stride(0), prompt_table.stride(0), pos_table.stride(0) if pos_table is not None else 0, h,
        float(embed_norm[2]) if embed_norm else 0.0, float(norm_eps),
        HAS_POS=pos_table is not None, HAS_EMBED_NORM=embed_norm is not None, RMS=kind == "rms",
        HAS_NORM_BIAS=norm_b is not None, BLOCK_H=block, num_warps=_num_warps(block),
    )
    return residual, normed


def fused_prompt_input_reference(
    token_ids: Tensor,
    prompt_rows: Tensor,
    is_prompt: Tensor,
    token_table: Tensor,
    prompt_table: Tensor,
    positions: Tensor | None,
    pos_table: Tensor | None,
    embed_norm: tuple[Tensor, Tensor, float] | None,
    input_norm: tuple[Tensor, Tensor | None, float, str],
) -> tuple[Tensor, Tensor]:
    """Plain-PyTorch `fused_prompt_input`, with the model's op order."""
    tok = token_table.index_select(0, torch.where(is_prompt, 0, token_ids).long())
    pr = prompt_table.index_select(0, torch.where(is_prompt, prompt_rows, 0).long()) if prompt_table.shape[0] else tok
    x = torch.where(is_prompt[:, None], pr, tok)
    if pos_table is not None:
        x = x + pos_table.index_select(0, positions.long())
    if embed_norm is not None:
        x = F.layer_norm(x, x.shape[-1:], embed_norm[0], embed_norm[1], embed_norm[2])
    norm_w, norm_b, eps, kind = input_norm
    if kind == "rms":
        x32 = x.float()
        normed = norm_w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    else:
        normed = F.layer_norm(x, x.shape[-1:], norm_w, norm_b, eps)
    return x, normed
