"""RoPE on q/k and the paged KV-cache write, in one pass over the new tokens.

Program (t, h) handles token t's query head h (h < Hq: rotated into a contiguous q), or its KV head h - Hq
(rotated k and raw v stored at `slot_mapping[t]` of the caches). Rotation uses the rotate-half convention of
`apply_rotary` in engine/models/common.py, `x * cos + rotate_half(x) * sin`, with the same rounding: each product
and the sum rounded to the input dtype, as the eager model computes them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _rotate(x1, x2, c1, c2, s1, s2):
    """Both halves of `x * cos + rotate_half(x) * sin`, each product and the sum rounded to x's dtype."""
    ty = x1.dtype
    x1 = x1.to(tl.float32)
    x2 = x2.to(tl.float32)
    o1 = (x1 * c1).to(ty).to(tl.float32) - (x2 * s1).to(ty).to(tl.float32)
    o2 = (x2 * c2).to(ty).to(tl.float32) + (x1 * s2).to(ty).to(tl.float32)
    return o1.to(ty), o2.to(ty)


@triton.jit
def _rope_kv_write_kernel(
    q_ptr, k_ptr, v_ptr, positions_ptr, cos_ptr, sin_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    q_s0, q_s1, k_s0, k_s1, v_s0, v_s1, cos_s0, sin_s0,
    kc_s0, kc_s1, kc_s2, vc_s0, vc_s1, vc_s2, block_size, num_q_heads,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, ROTARY: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    d = tl.arange(0, BLOCK_HALF)
    mask = d < HALF
    if ROTARY:
        pos = tl.load(positions_ptr + t).to(tl.int64)
        c1 = tl.load(cos_ptr + pos * cos_s0 + d, mask=mask, other=0.0).to(tl.float32)
        c2 = tl.load(cos_ptr + pos * cos_s0 + HALF + d, mask=mask, other=0.0).to(tl.float32)
        s1 = tl.load(sin_ptr + pos * sin_s0 + d, mask=mask, other=0.0).to(tl.float32)
        s2 = tl.load(sin_ptr + pos * sin_s0 + HALF + d, mask=mask, other=0.0).to(tl.float32)
    if h < num_q_heads:
        src = q_ptr + t * q_s0 + h * q_s1
        x1 = tl.load(src + d, mask=mask)
        x2 = tl.load(src + HALF + d, mask=mask)
        if ROTARY:
            x1, x2 = _rotate(x1, x2, c1, c2, s1, s2)
        dst = q_out_ptr + (t * num_q_heads + h) * (2 * HALF)
        tl.store(dst + d, x1, mask=mask)
        tl.store(dst + HALF + d, x2, mask=mask)
    else:
        kh = h - num_q_heads
        slot = tl.load(slot_ptr + t).to(tl.int64)
        block = slot // block_size
        offset = slot % block_size
        src = k_ptr + t * k_s0 + kh * k_s1
        x1 = tl.load(src + d, mask=mask)
        x2 = tl.load(src + HALF + d, mask=mask)
        if ROTARY:
            x1, x2 = _rotate(x1, x2, c1, c2, s1, s2)
        dst = k_cache_ptr + block * kc_s0 + offset * kc_s1 + kh * kc_s2
        tl.store(dst + d, x1, mask=mask)
        tl.store(dst + HALF + d, x2, mask=mask)
        src = v_ptr + t * v_s0 + kh * v_s1
        dst = v_cache_ptr + block * vc_s0 + offset * vc_s1 + kh * vc_s2
        tl.store(dst + d, tl.load(src + d, mask=mask), mask=mask)
        tl.store(dst + HALF + d, tl.load(src + HALF + d, mask=mask), mask=mask)


def rope_kv_write(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    positions: Tensor,
    cos_sin: tuple[Tensor, Tensor] | None,
    k_cache: Tensor,
    v_cache: Tensor,
    slot_mapping: Tensor,
) -> Tensor:
    """Rotated q [T, Hq, D] (contiguous); rotated k and raw v written in place at `slot_mapping` of the caches.

    q/k/v may be strided views (unit stride on the head dim); cos/sin are [max_pos, D] tables in q's dtype, indexed
    by `positions` (None: no rotary, only the KV write and a contiguous copy of q). Indices are not bounds-checked.
    """
    if q.dim() != 3 or k.shape != v.shape or k.dim() != 3:
        raise ValueError(f"q must be [T, Hq, D] and k, v [T, Hkv, D], got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    t, hq, dim = q.shape
    hkv = k.shape[1]
    if k.shape[0] != t or k.shape[2] != dim or dim % 2:
        raise ValueError(f"q/k/v disagree on T or the (even) head dim: {tuple(q.shape)} vs {tuple(k.shape)}")
    if q.stride(2) != 1 or k.stride(2) != 1 or v.stride(2) != 1:
        raise ValueError("q, k and v must have unit stride on the head dim")
    if not (q.dtype == k.dtype == v.dtype == k_cache.dtype == v_cache.dtype):
        raise ValueError("q, k, v and the caches must share one dtype")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.shape[2:] != (hkv, dim):
        raise ValueError(f"caches must be [num_blocks, block_size, {hkv}, {dim}], got {tuple(k_cache.shape)}")
    if k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("caches must have unit stride on the head dim")
    if positions.shape != (t,) or slot_mapping.shape != (t,):
        raise ValueError(f"positions and slot_mapping must be [{t}]")
    if cos_sin is not None:
        cos, sin = cos_sin
        if cos.dim() != 2 or cos.shape != sin.shape or cos.shape[1] != dim:
            raise ValueError(f"cos/sin must be [max_pos, {dim}], got {tuple(cos.shape)}, {tuple(sin.shape)}")
        if cos.dtype != q.dtype or sin.dtype != q.dtype or cos.stride(1) != 1 or sin.stride(1) != 1:
            raise ValueError("cos/sin must be in q's dtype with unit stride on the head dim")
    else:
        cos = sin = q  # never read

    q_out = q.new_empty(t, hq, dim)
    half = dim // 2
    block_half = triton.next_power_of_2(half)
    _rope_kv_write_kernel[(t, hq + hkv)](
        q, k, v, positions.contiguous(), cos, sin, q_out, k_cache, v_cache, slot_mapping.contiguous(),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0), sin.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), k_cache.shape[1], hq,
        HALF=half, BLOCK_HALF=block_half, ROTARY=cos_sin is not None, num_warps=max(1, min(4, block_half // 64)),
    )
    return q_out


def rope_kv_write_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    positions: Tensor,
    cos_sin: tuple[Tensor, Tensor] | None,
    k_cache: Tensor,
    v_cache: Tensor,
    slot_mapping: Tensor,
) -> Tensor:
    """Plain-PyTorch `rope_kv_write` (rotation as `apply_rotary`, in the input dtype)."""
    if cos_sin is not None:
        cos, sin = cos_sin[0][positions][:, None], cos_sin[1][positions][:, None]
        half = q.shape[-1] // 2
        q = q * cos + torch.cat((-q[..., half:], q[..., :half]), dim=-1) * sin
        k = k * cos + torch.cat((-k[..., half:], k[..., :half]), dim=-1) * sin
    block_size = k_cache.shape[1]
    blocks, offsets = slot_mapping // block_size, slot_mapping % block_size
    k_cache[blocks, offsets] = k
    v_cache[blocks, offsets] = v
    return q.contiguous()
