"""Exact greedy tokens from a float32 LM head at about bf16 cost (CPUs with native bf16 matmul).

Greedy decoding only needs each row's argmax over the vocabulary. The head is computed in bf16 (oneDNN
accumulates in fp32; about 3x faster than fp32 here), which bounds every logit's error by a per-row margin:
with u = 2^-8 the unit roundoff of bf16 and K the hidden size, rounding the inputs, the fp32 accumulation and
rounding the output give

    |bf16 logit_j - fp32 logit_j| <= ||h|| * ||w_j|| * (3.2 u + K 2^-23) =: E   (Cauchy-Schwarz, ||w_j|| <= max)

so the fp32 argmax is among the tokens whose bf16 logit is within 2E of the row's bf16 maximum (found chunk by
chunk: only chunks whose maximum clears that bar are looked into). Those few candidates are scored again in
fp32 and the best one is the token (ties to the lowest id, as torch.argmax). The result is the fp32 argmax,
never an approximation of it (up to the last-bit rounding of fp32 sums, as between any two GEMM shapes).
"""

from __future__ import annotations

import torch
from torch import Tensor

BF16_ROUNDOFF = 2.0**-8
FP32_ROUNDOFF = 2.0**-24
CHUNK = 128  # the vocabulary is screened in chunks: a chunk whose best bf16 logit is below the bar is skipped
MAX_CHUNKS_PER_ROW = 16  # beyond this (very flat rows), scoring every token in fp32 is as cheap


class ScreenedGreedyHead:
    def __init__(self, weight: Tensor):
        """`weight`: the LM head's [vocab, hidden] float32 weight (no bias)."""
        self.weight = weight
        vocab = weight.shape[0]
        self.padded = -(-vocab // CHUNK) * CHUNK
        # [hidden, padded vocab]; padding columns are zero, their logits are set to -inf before screening
        self.screen = torch.zeros(weight.shape[1], self.padded, dtype=torch.bfloat16, device=weight.device)
        self.screen[:, :vocab] = weight.t()
        hidden = weight.shape[1]
        self.margin = float(weight.norm(dim=1).max()) * (3.2 * BF16_ROUNDOFF + 2 * hidden * FP32_ROUNDOFF)

    @staticmethod
    def applies(weight: Tensor, bias: Tensor | None) -> bool:
        """fp32 weights on a CPU whose oneDNN has native bf16 matmul, and no bias."""
        return (weight.device.type == "cpu" and weight.dtype == torch.float32 and bias is None
                and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())

    @torch.no_grad()
    def __call__(self, hidden: Tensor) -> Tensor:
        """The fp32 greedy token [n] of each row of `hidden` [n, K] (float32)."""
        n, vocab = hidden.shape[0], self.weight.shape[0]
        screened = hidden.to(torch.bfloat16) @ self.screen  # [n, padded V]
        if self.padded != vocab:
            screened[:, vocab:] = float("-inf")
        chunks = screened.view(n, -1, CHUNK)
        chunk_max = chunks.amax(dim=-1).float()  # [n, chunks]
        threshold = chunk_max.amax(dim=-1) - 2 * self.margin * hidden.norm(dim=1)  # compared in fp32: exact
        chunk_rows, chunk_ids = (chunk_max >= threshold[:, None]).nonzero(as_tuple=True)
        if chunk_rows.numel() > n * MAX_CHUNKS_PER_ROW:
            return (hidden @ self.weight.t()).argmax(dim=-1)
        inside = chunks[chunk_rows, chunk_ids].float() >= threshold[chunk_rows, None]  # [candidate chunks, CHUNK]
        which, offset = inside.nonzero(as_tuple=True)
        rows, cols = chunk_rows[which], chunk_ids[which] * CHUNK + offset
        exact = (hidden.index_select(0, rows) * self.weight.index_select(0, cols)).sum(dim=-1)
        best = torch.full((n,), float("-inf"), device=hidden.device).scatter_reduce_(0, rows, exact, "amax")
        top = exact == best[rows]
        tokens = torch.full((n,), vocab, dtype=torch.long, device=hidden.device).scatter_reduce_(
            0, rows[top], cols[top], "amin")
        lost = (tokens == vocab).nonzero().flatten()  # a row with no finite candidate (NaN/inf hidden state)
        if lost.numel():
            tokens[lost] = (hidden.index_select(0, lost) @ self.weight.t()).argmax(dim=-1)
        return tokens
