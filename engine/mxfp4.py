"""MXFP4 weights (OCP microscaling FP4, as gpt-oss's checkpoints store their experts), dequantized at load.

A weight W [..., rows, cols] is stored as `<name>_blocks` [..., rows, cols / 32, 16] uint8, two FP4 (E2M1) codes a
byte (the low nibble first), and `<name>_scales` [..., rows, cols / 32] uint8, one E8M0 exponent per 32 values
(2^(s - 127)). Every value is exact in bfloat16 and float32. As transformers dequantizes them, the result is the
weight transposed ([..., cols, rows]): gpt-oss's experts as its model holds them ([E, in, out]).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from torch import Tensor

from .errors import CheckpointError

FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize_mxfp4(blocks: Tensor, scales: Tensor, dtype: torch.dtype) -> Tensor:
    """The weight [..., cols, rows] in `dtype` of blocks [..., rows, groups, 16] and scales [..., rows, groups]."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise CheckpointError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.dim() < 3 or blocks.shape[:-1] != scales.shape:
        raise CheckpointError(f"MXFP4 blocks {tuple(blocks.shape)} do not fit scales {tuple(scales.shape)}")
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    out = torch.empty(*blocks.shape[:-1], blocks.shape[-1] * 2, dtype=dtype)
    for i in range(blocks.shape[0]):  # one leading slice (an expert) at a time: fp32 temporaries stay small
        codes = blocks[i].long()
        values = torch.stack([lut[codes & 0x0F], lut[codes >> 4]], dim=-1).flatten(-2)  # low nibble first
        out[i] = torch.ldexp(values, scales[i].to(torch.int32)[..., None] - 127).to(dtype)
    return out.flatten(-2).transpose(-1, -2)


def dequantize_entries(tensors: Mapping[str, Tensor], dtype: torch.dtype) -> Iterator[tuple[str, Tensor]]:
    """A checkpoint's entries with each `<name>_blocks` / `<name>_scales` pair replaced by `<name>` dequantized, one at
    a time."""
    for key in tensors:
        if key.endswith("_scales") and key.removesuffix("_scales") + "_blocks" in tensors:
            continue
        tensor = tensors[key]
        if key.endswith("_blocks"):
            stem = key.removesuffix("_blocks")
            if stem + "_scales" not in tensors:
                raise CheckpointError(f"MXFP4 weight {key} has no {stem}_scales beside it")
            yield stem, dequantize_mxfp4(tensor, tensors[stem + "_scales"], dtype)
        else:
            yield key, tensor


def quantize_mxfp4(weight: Tensor) -> tuple[Tensor, Tensor]:
    """The inverse of `dequantize_mxfp4` (for tests and tools): weight [..., cols, rows] (cols a multiple of 32) to
    (blocks, scales), each group of 32 scaled by the power of two that brings its largest magnitude within 6 and
    rounded to the nearest FP4 value."""
    t = weight.float().transpose(-1, -2)
    if t.shape[-1] % 32:
        raise ValueError(f"MXFP4 needs a multiple of 32 values along the quantized dim, got {t.shape[-1]}")
    groups = t.reshape(*t.shape[:-1], t.shape[-1] // 32, 32)
    biggest = groups.abs().amax(dim=-1)
    exponent = torch.where(biggest > 0, torch.ceil(torch.log2(biggest / 6)), torch.full_like(biggest, -127))
    exponent = exponent.clamp(-127, 128)
    scaled = groups / torch.exp2(exponent)[..., None]
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    codes = (scaled[..., None] - lut).abs().argmin(dim=-1).to(torch.uint8)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks, (exponent + 127).to(torch.uint8)
