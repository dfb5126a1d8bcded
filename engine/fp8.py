"""Block-wise FP8 weights (`quant_method: fp8`, transformers' FineGrainedFP8: DeepSeek-V3 / R1, Qwen3 and GLM-4.5
FP8 releases, ...), dequantized at load.

A linear weight W [..., rows, cols] is stored as `<name>.weight` in float8 (e4m3) and `<name>.weight_scale_inv`
[..., ceil(rows / bm), ceil(cols / bn)] in float32, one scale per bm x bn block (`weight_block_size`, 128 x 128 in
the releases): W = fp8 value x the block's scale, computed in fp32 and rounded once to the model dtype, as
transformers dequantizes them where it has no FP8 kernels.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from torch import Tensor

from .errors import CheckpointError

SCALE_SUFFIX = "_scale_inv"  # `<name>.weight_scale_inv` beside `<name>.weight`
ACTIVATION_SUFFIXES = ("activation_scale", "input_scale")  # static activation scales: nothing to do in bf16


def dequantize_fp8(weight: Tensor, scale_inv: Tensor, dtype: torch.dtype,
                   block: tuple[int, int] | None = None) -> Tensor:
    """`weight` (float8) times its blocks' scales, in `dtype`. `block`: the config's `weight_block_size` (the last
    block of a dim that is not a multiple of it is ragged); None: read off the scale grid, which must then divide
    the weight. A single scale covers the whole weight."""
    if weight.dim() < 2:
        raise CheckpointError(f"an FP8 weight must have 2 or more dims, got {tuple(weight.shape)}")
    rows, cols = weight.shape[-2:]
    scale = scale_inv.float()
    if scale.numel() == 1:
        return (weight.float() * scale.reshape(())).to(dtype)
    if scale.dim() < 2:
        scale = scale.reshape(1, -1)
    sr, sc = scale.shape[-2:]
    if block is None and (rows % sr or cols % sc):
        raise CheckpointError(f"FP8 weight {tuple(weight.shape)}: its scales {tuple(scale_inv.shape)} do not divide "
                              "it and the config gives no weight_block_size")
    br, bc = block if block is not None else (rows // sr, cols // sc)
    if (-(-rows // br), -(-cols // bc)) != (sr, sc):
        raise CheckpointError(f"FP8 weight {tuple(weight.shape)} and its scales {tuple(scale_inv.shape)} disagree "
                              f"for {br} x {bc} blocks")
    full = scale.repeat_interleave(br, dim=-2)[..., :rows, :].repeat_interleave(bc, dim=-1)[..., :cols]
    return (weight.float() * full).to(dtype)


def dequantize_entries(tensors: Mapping[str, Tensor], dtype: torch.dtype,
                       block: tuple[int, int] | None = None) -> Iterator[tuple[str, Tensor]]:
    """A checkpoint's entries with each float8 weight multiplied out by its `weight_scale_inv` (dropped), and static
    activation scales dropped, one at a time. `block`: the config's `weight_block_size`."""
    for key in tensors:
        if key.endswith(SCALE_SUFFIX) or key.endswith(ACTIVATION_SUFFIXES):
            if key.endswith(SCALE_SUFFIX) and key.removesuffix(SCALE_SUFFIX) not in tensors:
                raise CheckpointError(f"FP8 scales {key} belong to no weight of the checkpoint")
            continue
        tensor = tensors[key]
        if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            if key + SCALE_SUFFIX not in tensors:
                raise CheckpointError(f"FP8 weight {key} has no {key}{SCALE_SUFFIX} beside it")
            yield key, dequantize_fp8(tensor, tensors[key + SCALE_SUFFIX], dtype, block)
        else:
            yield key, tensor


def quantize_fp8(weight: Tensor, block: tuple[int, int] = (128, 128)) -> tuple[Tensor, Tensor]:
    """The inverse (for tests and tools): (float8_e4m3fn weight, fp32 scale_inv per block), each block scaled so its
    largest magnitude maps to e4m3's largest finite value, 448."""
    rows, cols = weight.shape[-2:]
    br, bc = block
    sr, sc = -(-rows // br), -(-cols // bc)
    padded = torch.zeros(*weight.shape[:-2], sr * br, sc * bc)
    padded[..., :rows, :cols] = weight.float()
    blocks = padded.reshape(*weight.shape[:-2], sr, br, sc, bc)
    scale = blocks.abs().amax(dim=(-3, -1)).clamp(min=1e-12) / 448.0  # [..., sr, sc]
    full = scale.repeat_interleave(br, dim=-2)[..., :rows, :].repeat_interleave(bc, dim=-1)[..., :cols]
    return (weight.float() / full).to(torch.float8_e4m3fn), scale
