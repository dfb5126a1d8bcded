"""Exact greedy tokens from a float32 LM head at about int8 cost (CPUs whose oneDNN has an int8 GEMM).

Greedy decoding only needs each row's argmax over the vocabulary. The head is screened with an int8 GEMM, whose
int32 sums are exact.
- **Weights:** the vocabulary rows are sorted by their largest magnitude and cut into chunks of CHUNK rows. Each
  chunk is quantized with its own scale, so rows of similar size share one.
- **Hidden states:** each row is quantized with its own scale.

For a hidden row h and a token j of chunk c, let ĥ and ŵ_j be the dequantized vectors. By Cauchy-Schwarz,

    |h·w_j - ĥ·ŵ_j| <= ||h|| * max_c ||w_j - ŵ_j|| + ||h - ĥ|| * max_c ||ŵ_j||

The fp32 logit differs from h·w_j by at most 2K 2^-24 ||h|| ||w_j||. Together with a slack for the fp32
arithmetic of the screen itself, this gives E_c, a bound on |fp32 logit - screened logit| for every token of
chunk c. Then:
- L = max_j (screened_j - E_c(j)) lies below the best fp32 logit;
- only a token with screened_j + E_c(j) >= L can be the fp32 argmax;
- a chunk whose best screened logit cannot reach L is skipped.

The few candidates are scored again in fp32, and the best one is the token (ties go to the lowest id, as with
torch.argmax). The result is the fp32 argmax, never an approximation of it (up to the last-bit rounding of fp32
sums, as between any two GEMM shapes).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

CHUNK = 128  # vocabulary rows per chunk: one int8 scale each, and the unit the screen skips
MAX_CHUNKS_PER_ROW = 16  # beyond this (very flat rows), scoring every token in fp32 is as cheap
SAFETY = 1.01  # covers the fp32 rounding of the screened logits and of the bound's own terms
INT8_MAX = 127


def _quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row symmetric int8 [n, K] and scales [n] (a zero row gets scale 1)."""
    peak = x.abs().amax(dim=1)
    scale = torch.where(peak > 0, peak / INT8_MAX, torch.ones_like(peak))
    return torch.round(x / scale[:, None]).clamp_(-INT8_MAX, INT8_MAX), scale


class ScreenedGreedyHead:
    def __init__(self, weight: Tensor):
        """`weight`: the LM head's [vocab, hidden] float32 weight (no bias)."""
        self.weight = weight
        vocab, hidden = weight.shape
        chunks = -(-vocab // CHUNK)
        w = weight.double()
        order = torch.argsort(w.abs().amax(dim=1), descending=True)
        # padding repeats the smallest row: same screened value, same token, so it changes nothing
        order = torch.cat([order, order[-1:].expand(chunks * CHUNK - vocab)])
        self.token_of = order  # screened column -> token id
        rows = w[order].view(chunks, CHUNK, hidden)
        scale = rows.abs().amax(dim=(1, 2)) / INT8_MAX
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round(rows / scale[:, None, None]).clamp_(-INT8_MAX, INT8_MAX)
        dequantized = q * scale[:, None, None]
        self.screen = q.to(torch.int8).view(-1, hidden).t().contiguous()  # [hidden, chunks * CHUNK]
        self.scale = scale.float()
        # per chunk: weight error, dequantized norm, and the fp32 GEMM's own error per unit of ||h||
        self.weight_error = ((rows - dequantized).norm(dim=2).amax(dim=1)
                             + 2 * hidden * 2.0**-24 * rows.norm(dim=2).amax(dim=1)).float()
        self.dequantized_norm = dequantized.norm(dim=2).amax(dim=1).float()
        self.hidden_slack = hidden**0.5 * 2.0**-16  # x the row's scale: fp32 rounding of h - ĥ

    @staticmethod
    def applies(weight: Tensor, bias: Tensor | None) -> bool:
        """fp32 weights on a CPU whose torch has an int8 GEMM, a hidden size whose int32 sums cannot overflow,
        and no bias."""
        if weight.device.type != "cpu" or weight.dtype != torch.float32 or bias is not None:
            return False
        if weight.shape[1] * INT8_MAX**2 >= 2**31:
            return False
        return _int8_gemm_works()

    def fp32_argmax(self, hidden: Tensor) -> Tensor:
        """The plain way: every logit in fp32 (rows the screen cannot serve)."""
        return (hidden @ self.weight.t()).argmax(dim=-1)

    @torch.no_grad()
    def __call__(self, hidden: Tensor) -> Tensor:
        """The fp32 greedy token [n] of each row of `hidden` [n, K] (float32)."""
        n = hidden.shape[0]
        h_norm = hidden.norm(dim=1)
        # NaN/inf rows (or norms too large for fp32): their argmax as torch computes it. One sum read back is
        # cheaper than isfinite().all().
        if not math.isfinite(float(h_norm.sum())):
            return self.fp32_argmax(hidden)
        q, h_scale = _quantize_rows(hidden)
        h_error = (hidden - q * h_scale[:, None]).norm(dim=1) + self.hidden_slack * h_scale
        acc = torch._int_mm(q.to(torch.int8), self.screen).view(n, -1, CHUNK)  # [n, chunks, CHUNK], exact
        unit = h_scale[:, None] * self.scale[None, :]  # [n, chunks]: one int32 step in logit units
        bound = SAFETY * (h_norm[:, None] * self.weight_error + h_error[:, None] * self.dequantized_norm)
        chunk_best = acc.amax(dim=-1).float() * unit
        lower = (chunk_best - bound).amax(dim=1)  # <= the best fp32 logit of the row
        chunk_rows, chunk_ids = (chunk_best + bound >= lower[:, None]).nonzero(as_tuple=True)
        if chunk_rows.numel() > n * MAX_CHUNKS_PER_ROW:
            return self.fp32_argmax(hidden)
        screened = acc[chunk_rows, chunk_ids].float() * unit[chunk_rows, chunk_ids, None]  # [candidate chunks, CHUNK]
        inside = screened + bound[chunk_rows, chunk_ids, None] >= lower[chunk_rows, None]
        which, offset = inside.nonzero(as_tuple=True)
        rows, cols = chunk_rows[which], self.token_of[chunk_ids[which] * CHUNK + offset]
        exact = (hidden.index_select(0, rows) * self.weight.index_select(0, cols)).sum(dim=-1)
        best = torch.full((n,), float("-inf"), device=hidden.device).scatter_reduce_(0, rows, exact, "amax")
        top = exact == best[rows]
        vocab = self.weight.shape[0]
        return torch.full((n,), vocab, dtype=torch.long, device=hidden.device).scatter_reduce_(
            0, rows[top], cols[top], "amin")


_INT8_GEMM: bool | None = None


def _int8_gemm_works() -> bool:
    """torch._int_mm runs on this CPU and its sums are exact (checked once)."""
    global _INT8_GEMM
    if _INT8_GEMM is None:
        try:
            a = (torch.arange(24 * 40) % 255 - 127).to(torch.int8).view(24, 40)
            b = (torch.arange(40 * 136) % 253 - 126).to(torch.int8).view(40, 136)
            _INT8_GEMM = bool(torch.equal(torch._int_mm(a, b).long(), a.long() @ b.long()))
        except (RuntimeError, AttributeError):
            _INT8_GEMM = False
    return _INT8_GEMM
