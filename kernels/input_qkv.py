"""Layer 0's QKV projection with the first-layer input as its prologue: the normed input never goes to memory.

`fused_prompt_input` (prompt_input.py) writes layer 0's residual and its normed input; the QKV GEMM then reads
the normed input back. Here the GEMM's A operand is built on the fly instead. Each program owns a tile of
BLOCK_M rows x BLOCK_N output columns:
1. it gathers its rows, each from the soft-prompt table or the token-embedding table (the concatenation is never
   materialised), and applies the family's embedding step (GPT-2's `+ wpe[position]`, BLOOM's embedding
   LayerNorm);
2. it computes the row statistics of layer 0's input norm (RMSNorm or LayerNorm) in a pass over the hidden dim
   (two for a LayerNorm, so the variance is taken around the mean, as torch does);
3. in the GEMM's K loop, it rebuilds each [BLOCK_M, BLOCK_K] chunk of the normed input in registers (gather,
   embedding step, norm, rounded to the model dtype where the model rounds) and multiplies it with the weight.
The programs of the first column tile also store the residual stream (or, for BLOOM with
`apply_residual_connection_post_layernorm`, the normed input, which is then layer 0's residual).

The gathered rows are re-read by each column tile and each pass; they are few (a batch's rows x hidden) next to
the weight, and come from L2. fp32 products use IEEE fp32 (no TF32), so fp32 stays tight against the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from .prompt_input import check_input_args, fused_prompt_input_reference
from .tiles import gpu_tiles


@triton.jit
def _embedded_chunk(
    token_table_ptr, prompt_table_ptr, pos_table_ptr, embed_w_ptr, embed_b_ptr,
    tok, pr, pos, use_prompt, row_mask, k_offs, H, token_stride, prompt_stride, pos_stride, e_mean, e_rstd,
    HAS_POS: tl.constexpr, HAS_EMBED_NORM: tl.constexpr, EMBEDDED: tl.constexpr,
):
    """[BLOCK_M, BLOCK_K] of the rows after the embedding step, in fp32 (rounded to the table dtype when
    EMBEDDED; else the raw sum before BLOOM's embedding LayerNorm)."""
    k_mask = k_offs < H
    m_tok = (row_mask & ~use_prompt)[:, None] & k_mask[None, :]
    m_pr = (row_mask & use_prompt)[:, None] & k_mask[None, :]
    x_tok = tl.load(token_table_ptr + tok[:, None] * token_stride + k_offs[None, :], mask=m_tok, other=0.0)
    x_pr = tl.load(prompt_table_ptr + pr[:, None] * prompt_stride + k_offs[None, :], mask=m_pr, other=0.0)
    x = tl.where(use_prompt[:, None], x_pr, x_tok)
    out_ty = x.dtype
    x = x.to(tl.float32)
    if HAS_POS:
        m = row_mask[:, None] & k_mask[None, :]
        x += tl.load(pos_table_ptr + pos[:, None] * pos_stride + k_offs[None, :], mask=m, other=0.0).to(tl.float32)
    if EMBEDDED:
        if HAS_EMBED_NORM:
            w = tl.load(embed_w_ptr + k_offs, mask=k_mask, other=0.0).to(tl.float32)
            b = tl.load(embed_b_ptr + k_offs, mask=k_mask, other=0.0).to(tl.float32)
            x = (x - e_mean[:, None]) * e_rstd[:, None] * w[None, :] + b[None, :]
        x = x.to(out_ty).to(tl.float32)
        x = tl.where(k_mask[None, :], x, 0.0)
    return x


@triton.jit
def _centered_sum_sq(
    token_table_ptr, prompt_table_ptr, pos_table_ptr, embed_w_ptr, embed_b_ptr, tok, pr, pos, use_prompt, row_mask,
    H, token_stride, prompt_stride, pos_stride, e_mean, e_rstd, center,
    HAS_POS: tl.constexpr, HAS_EMBED_NORM: tl.constexpr, EMBEDDED: tl.constexpr, PLAIN_SUM: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Per row, over the hidden dim, of the rows as `_embedded_chunk` gives them: sum(x) if PLAIN_SUM, else
    sum((x - center)^2)."""
    acc = center * 0.0
    for k0 in range(0, H, BLOCK_K):
        k_offs = k0 + tl.arange(0, BLOCK_K)
        x = _embedded_chunk(token_table_ptr, prompt_table_ptr, pos_table_ptr, embed_w_ptr, embed_b_ptr, tok, pr, pos,
                            use_prompt, row_mask, k_offs, H, token_stride, prompt_stride, pos_stride, e_mean, e_rstd,
                            HAS_POS, HAS_EMBED_NORM, EMBEDDED)
        if PLAIN_SUM:
            acc += tl.sum(x, axis=1)
        else:
            xc = tl.where((k_offs < H)[None, :], x - center[:, None], 0.0)
            acc += tl.sum(xc * xc, axis=1)
    return acc


@triton.jit
def _input_qkv_kernel(
    token_ids_ptr, prompt_rows_ptr, is_prompt_ptr, token_table_ptr, prompt_table_ptr, positions_ptr, pos_table_ptr,
    embed_w_ptr, embed_b_ptr, norm_w_ptr, norm_b_ptr, weight_ptr, bias_ptr, residual_ptr, out_ptr,
    T, H, N, token_stride, prompt_stride, pos_stride, stride_wn, stride_wk, embed_eps, norm_eps,
    HAS_POS: tl.constexpr, HAS_EMBED_NORM: tl.constexpr, RMS: tl.constexpr, HAS_NORM_BIAS: tl.constexpr,
    HAS_BIAS: tl.constexpr, RESIDUAL_IS_NORMED: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < T
    use_prompt = tl.load(is_prompt_ptr + rows, mask=row_mask, other=0).to(tl.int32) != 0
    # each row reads one table: its index into the other one is never loaded
    tok = tl.load(token_ids_ptr + rows, mask=row_mask & ~use_prompt, other=0).to(tl.int64)
    pr = tl.load(prompt_rows_ptr + rows, mask=row_mask & use_prompt, other=0).to(tl.int64)
    pos = tl.zeros([BLOCK_M], dtype=tl.int64)
    if HAS_POS:
        pos = tl.load(positions_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    zero = tl.zeros([BLOCK_M], dtype=tl.float32)

    # BLOOM's embedding LayerNorm over the raw rows, then layer 0's input norm over the rounded residual (as the
    # model computes them): each a pass for the mean (LayerNorm) and one for the variance around it
    e_mean = zero
    e_rstd = zero
    if HAS_EMBED_NORM:
        e_mean = _centered_sum_sq(token_table_ptr, prompt_table_ptr, pos_table_ptr, embed_w_ptr, embed_b_ptr,
                                  tok, pr, pos, use_prompt, row_mask, H, token_stride, prompt_stride, pos_stride,
                                  zero, zero, zero,
                                  HAS_POS, HAS_EMBED_NORM, False, True, BLOCK_K) / H
        e_var = _centered_sum_sq(token_table_ptr, prompt_table_ptr, pos_table_ptr, embed_w_ptr, embed_b_ptr,
                                 tok, pr, pos, use_prompt, row_mask, H, token_stride, prompt_stride, pos_stride,
                                 zero, zero, e_mean,
                                 HAS_POS, HAS_EMBED_NORM, False, False, BLOCK_K) / H
        e_rstd = 1.0 / tl.sqrt(e_var + embed_eps)
    mean = zero
    if not RMS:
        mean = _centered_sum_sq(token_table_ptr, prompt_table_ptr, pos_table_ptr, embed_w_ptr, embed_b_ptr,
                                tok, pr, pos, use_prompt, row_mask, H, token_stride, prompt_stride, pos_stride,
                                e_mean, e_rstd, zero,
                                HAS_POS, HAS_EMBED_NORM, True, True, BLOCK_K) / H
    var = _centered_sum_sq(token_table_ptr, prompt_table_ptr, pos_table_ptr, embed_w_ptr, embed_b_ptr,
                           tok, pr, pos, use_prompt, row_mask, H, token_stride, prompt_stride, pos_stride,
                           e_mean, e_rstd, mean,
                           HAS_POS, HAS_EMBED_NORM, True, False, BLOCK_K) / H
    rstd = 1.0 / tl.sqrt(var + norm_eps)

    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k_offs = k0 + tl.arange(0, BLOCK_K)
        k_mask = k_offs < H
        h = _embedded_chunk(token_table_ptr, prompt_table_ptr, pos_table_ptr, embed_w_ptr, embed_b_ptr,
                            tok, pr, pos, use_prompt, row_mask, k_offs, H, token_stride,
                            prompt_stride, pos_stride, e_mean, e_rstd, HAS_POS, HAS_EMBED_NORM, True)
        w = tl.load(norm_w_ptr + k_offs, mask=k_mask, other=0.0)
        out_ty = w.dtype
        if RMS:  # normalise in fp32, round, then scale (HF's order)
            y = (h * rstd[:, None]).to(out_ty).to(tl.float32) * w.to(tl.float32)[None, :]
        else:
            y = (h - mean[:, None]) * rstd[:, None] * w.to(tl.float32)[None, :]
            if HAS_NORM_BIAS:
                y += tl.load(norm_b_ptr + k_offs, mask=k_mask, other=0.0).to(tl.float32)[None, :]
        y = y.to(out_ty)
        if pid_n == 0:
            store_mask = row_mask[:, None] & k_mask[None, :]
            res_ptrs = residual_ptr + rows.to(tl.int64)[:, None] * H + k_offs[None, :]
            if RESIDUAL_IS_NORMED:
                tl.store(res_ptrs, y, mask=store_mask)
            else:
                tl.store(res_ptrs, h.to(out_ty), mask=store_mask)
        w_tile = tl.load(weight_ptr + k_offs[:, None] * stride_wk + cols[None, :] * stride_wn,
                         mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc += tl.dot(y, w_tile, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


def _tiles(t: int, on_gpu: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps): small tiles under the interpreter (tests), GEMM tiles on a GPU."""
    if not on_gpu:
        return 16, 32, 32, 1
    block_m = 16 if t <= 16 else 32 if t <= 32 else 64
    return block_m, 128, 64, 4


def fused_input_qkv(
    token_ids: Tensor,
    prompt_rows: Tensor,
    is_prompt: Tensor,
    token_table: Tensor,
    prompt_table: Tensor,
    positions: Tensor | None,
    pos_table: Tensor | None,
    embed_norm: tuple[Tensor, Tensor, float] | None,
    input_norm: tuple[Tensor, Tensor | None, float, str],
    weight: Tensor,
    bias: Tensor | None,
    residual_is_normed: bool = False,
) -> tuple[Tensor, Tensor]:
    """(residual [T, H], qkv [T, N]) of layer 0 in the tables' dtype: `qkv = linear(norm(x), weight, bias)` where
    x is row t of [prompt rows ; token rows] after the embedding step (see the module docstring). `weight` is
    [N, H] in any strides ([in, out] storage too). With `residual_is_normed` the first output is the normed input
    (layer 0's residual when the model adds the residual after the norm). Indices are not bounds-checked."""
    check_input_args(token_ids, prompt_rows, is_prompt, token_table, prompt_table, positions, pos_table, embed_norm,
                     input_norm)
    t = token_ids.shape[0]
    h = token_table.shape[1]
    norm_w, norm_b, norm_eps, kind = input_norm
    if norm_w.dtype != token_table.dtype:
        raise ValueError(f"the input norm's weight must be in the tables' dtype {token_table.dtype}, "
                         f"got {norm_w.dtype}")
    if weight.dim() != 2 or weight.shape[1] != h or weight.dtype != token_table.dtype:
        raise ValueError(f"weight must be [N, {h}] in {token_table.dtype}, got {tuple(weight.shape)} {weight.dtype}")
    n = weight.shape[0]
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must be [{n}]")

    residual = token_table.new_empty(t, h)
    out = token_table.new_empty(t, n)
    if t == 0 or n == 0:
        return residual, out
    dummy = token_table  # stands in for absent optional tensors (never read)
    block_m, block_n, block_k, warps = _tiles(t, gpu_tiles(token_table))
    grid = (triton.cdiv(t, block_m), triton.cdiv(n, block_n))
    _input_qkv_kernel[grid](
        token_ids.contiguous(), prompt_rows.contiguous(), is_prompt.contiguous(), token_table,
        prompt_table if prompt_table.shape[0] else dummy,
        positions.contiguous() if positions is not None else dummy, pos_table if pos_table is not None else dummy,
        embed_norm[0].contiguous() if embed_norm else dummy, embed_norm[1].contiguous() if embed_norm else dummy,
        norm_w.contiguous(), norm_b.contiguous() if norm_b is not None else dummy,
        weight, bias.contiguous() if bias is not None else dummy, residual, out,
        t, h, n, token_table.stride(0), prompt_table.stride(0), pos_table.stride(0) if pos_table is not None else 0,
        weight.stride(0), weight.stride(1), float(embed_norm[2]) if embed_norm else 0.0, float(norm_eps),
        HAS_POS=pos_table is not None, HAS_EMBED_NORM=embed_norm is not None, RMS=kind == "rms",
        HAS_NORM_BIAS=norm_b is not None, HAS_BIAS=bias is not None, RESIDUAL_IS_NORMED=residual_is_normed,
        DOT_PRECISION="ieee" if token_table.dtype == torch.float32 else "tf32",
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
    )
    return residual, out


def fused_input_qkv_reference(
    token_ids: Tensor,
    prompt_rows: Tensor,
    is_prompt: Tensor,
    token_table: Tensor,
    prompt_table: Tensor,
    positions: Tensor | None,
    pos_table: Tensor | None,
    embed_norm: tuple[Tensor, Tensor, float] | None,
    input_norm: tuple[Tensor, Tensor | None, float, str],
    weight: Tensor,
    bias: Tensor | None,
    residual_is_normed: bool = False,
) -> tuple[Tensor, Tensor]:
    """Plain-PyTorch `fused_input_qkv`: the first-layer input, then `F.linear` (the normed input materialised)."""
    residual, normed = fused_prompt_input_reference(token_ids, prompt_rows, is_prompt, token_table, prompt_table,
                                                    positions, pos_table, embed_norm, input_norm)
    return (normed if residual_is_normed else residual), F.linear(normed, weight, bias)
