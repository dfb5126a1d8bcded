"""The ground truth: one request at a time, `cat([soft_prompt, embed(ids)])` into our model, no cache.

Every fast path is tested against this; this is tested against HF transformers + PEFT.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .models import CausalLM
from .sampling import SamplingParams, TokenLogprob, make_generator, sample_next
from .stopping import Finish, check_finish


class DenseCausalAttention:
    """Causal attention over one whole sequence, in fp32, with optional ALiBi. No KV cache."""

    def __init__(self, positions: Tensor, scale: float, alibi_slopes: Tensor | None):
        self.positions = positions
        self.scale = scale
        self.alibi_slopes = alibi_slopes
        t = positions.shape[0]
        self.mask = torch.ones(t, t, dtype=torch.bool, device=positions.device).tril()

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        rep = q.shape[1] // k.shape[1]
        q32 = q.float().transpose(0, 1)  # [H, T, D]
        k32 = k.float().repeat_interleave(rep, dim=1).transpose(0, 1)
        v32 = v.float().repeat_interleave(rep, dim=1).transpose(0, 1)
        scores = (q32 @ k32.transpose(1, 2)) * self.scale
        if self.alibi_slopes is not None:
            scores = scores + self.alibi_slopes[:, None, None] * self.positions.float()[None, None, :]
        scores = scores.masked_fill(~self.mask, float("-inf"))
        out = torch.softmax(scores, dim=-1) @ v32
        return out.transpose(0, 1).to(q.dtype)


class ReferencePath:
    """Plain concat, full recompute each step: slow and obviously right."""

    def __init__(self, model: CausalLM):
        self.model = model
        self.alibi = model.alibi

    @torch.no_grad()
    def hidden(self, prefix: Tensor | None, ids: list[int]) -> Tensor:
        """Final hidden states [P + n, hidden] of the prefix rows followed by the tokens."""
        device = self.model.word_embeddings.weight.device
        embeds = self.model.embed_tokens(torch.tensor(ids, dtype=torch.long, device=device))
        if prefix is not None:
            embeds = torch.cat([prefix.to(embeds.dtype), embeds], dim=0)
        positions = torch.arange(embeds.shape[0], device=device)
        attention = DenseCausalAttention(positions, self.model.config.attention_scale, self.alibi)
        return self.model(embeds, positions, attention)

    def logits(self, prefix: Tensor | None, ids: list[int]) -> Tensor:
        """fp32 logits [n, vocab] at the token positions (the prefix rows are dropped)."""
        p = 0 if prefix is None else prefix.shape[0]
        return self.model.compute_logits(self.hidden(prefix, ids)[p:])

    def generate(
        self,
        prefix: Tensor | None,
        ids: list[int],
        params: SamplingParams,
        eos_token_ids: tuple[int, ...],
        decode: Callable[[list[int]], str] | None = None,
    ) -> tuple[list[int], list[TokenLogprob] | None, Finish]:
        generator = make_generator(params, self.model.word_embeddings.weight.device)
        generated: list[int] = []
        logprobs: list[TokenLogprob] = []
        while True:
            last = self.model.compute_logits(self.hidden(prefix, ids + generated)[-1:])
            tokens, lps = sample_next(last, [params], [generator])
            generated.append(tokens[0])
            if lps[0] is not None:
                logprobs.append(lps[0])
            finish = check_finish(generated, params, eos_token_ids, decode)
            if finish is not None:
                return generated, (logprobs if params.logprobs is not None else None), finish
