"""The ground truth: one request at a time, `cat([soft_prompt, embed(ids)])` into our model, no cache.

Every fast path is tested against this; this is tested against HF transformers + PEFT.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .detokenizer import FullText
from .models import CausalLM
from .reasoning import ThoughtGate
from .sampling import SamplingParams, TokenLogprob, make_generator, sample_next
from .stopping import Finish, check_finish
from .structured import GrammarGuide


class DenseCausalAttention:
    """Causal attention over one whole sequence, in fp32, with optional ALiBi. No KV cache.

    `positions` are the queries' [T]. `prefix_kv` [layers, 2, P, kv_heads, head_dim] (a prefix-tuning adapter's
    virtual tokens, at positions 0..P-1) is prepended to every layer's keys and values and seen by every query.
    `windows[layer]` (> 0): that layer's queries see only keys less than that many positions back. `softcap` (> 0):
    scores become softcap * tanh(score / softcap) before the mask. `sinks[layer]` [H] (gpt-oss): each head's sink
    logit, a column of the softmax without a value (as HF's eager attention concatenates it).
    """

    def __init__(self, positions: Tensor, scale: float, alibi_slopes: Tensor | None, prefix_kv: Tensor | None = None,
                 windows: tuple[int, ...] = (), softcap: float = 0.0, sinks: Tensor | None = None):
        self.scale = scale
        self.softcap = softcap
        self.sinks = sinks
        self.alibi_slopes = alibi_slopes
        self.prefix_kv = prefix_kv
        self.windows = windows
        t = positions.shape[0]
        p = 0 if prefix_kv is None else prefix_kv.shape[2]
        self.query_positions = positions
        self.key_positions = positions if p == 0 else torch.cat([torch.arange(p, device=positions.device), positions])
        self.mask = torch.ones(t, p + t, dtype=torch.bool, device=positions.device).tril(diagonal=p)
        self._window_masks: dict[int, Tensor] = {}

    def _mask(self, layer: int) -> Tensor:
        window = self.windows[layer] if layer < len(self.windows) else 0
        if not window:
            return self.mask
        if window not in self._window_masks:
            back = self.query_positions[:, None] - self.key_positions[None, :]
            self._window_masks[window] = self.mask & (back < window)
        return self._window_masks[window]

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if self.prefix_kv is not None:
            k = torch.cat([self.prefix_kv[layer, 0].to(k.dtype), k])
            v = torch.cat([self.prefix_kv[layer, 1].to(v.dtype), v])
        rep = q.shape[1] // k.shape[1]
        q32 = q.float().transpose(0, 1)  # [H, T, D]
        k32 = k.float().repeat_interleave(rep, dim=1).transpose(0, 1)
        v32 = v.float().repeat_interleave(rep, dim=1).transpose(0, 1)
        scores = (q32 @ k32.transpose(1, 2)) * self.scale
        if self.softcap:  # Gemma 2: cap * tanh(score / cap), before the mask
            scores = torch.tanh(scores / self.softcap) * self.softcap
        if self.alibi_slopes is not None:
            scores = scores + self.alibi_slopes[:, None, None] * self.key_positions.float()[None, None, :]
        scores = scores.masked_fill(~self._mask(layer), float("-inf"))
        if self.sinks is not None:
            column = self.sinks[layer].float()[:, None, None].expand(-1, scores.shape[1], 1)
            out = torch.cat([scores, column], dim=-1).softmax(-1)[..., :-1] @ v32
        else:
            out = torch.softmax(scores, dim=-1) @ v32
        return out.transpose(0, 1).to(q.dtype)


def is_prefix_kv(prefix: Tensor | None) -> bool:
    """A prompt's reference input is rows [P, hidden] or, for prefix tuning, K/V [L, 2, P, H, D]."""
    return prefix is not None and prefix.dim() == 5


class ReferencePath:
    """Plain concat, full recompute each step: slow and obviously right.

    `prefix` is a prompt's `reference_input`: rows [P, hidden] concatenated before the tokens' embeddings, or a
    prefix-tuning adapter's K/V [L, 2, P, H, D] prepended to every layer's keys and values (the tokens then take
    positions P.., as they do after rows)."""

    def __init__(self, model: CausalLM):
        self.model = model
        self.alibi = model.alibi

    @torch.no_grad()
    def hidden(self, prefix: Tensor | None, ids: list[int], tokens_as_input_ids: bool | None = None) -> Tensor:
        """Final hidden states [P + n, hidden] of the prefix rows followed by the tokens ([n, hidden] after K/V).
        `tokens_as_input_ids`: whether the tokens reach the model as input ids, whose embeddings a model may scale
        (Falcon-H1's token_embedding_multiplier), not as PEFT's inputs_embeds; default: without a prefix (a text
        prompt's are too: prompts.tokens_as_input_ids)."""
        device = self.model.word_embeddings.weight.device
        embeds = self.model.embed_tokens(torch.tensor(ids, dtype=torch.long, device=device))
        scale = self.model.config.token_embedding_multiplier
        if scale != 1.0 and (prefix is None if tokens_as_input_ids is None else tokens_as_input_ids):
            embeds = embeds * scale
        prefix_kv = prefix if is_prefix_kv(prefix) else None
        if prefix is not None and prefix_kv is None:
            embeds = torch.cat([prefix.to(embeds.dtype), embeds], dim=0)
        start = 0 if prefix_kv is None else prefix_kv.shape[2]
        positions = torch.arange(start, start + embeds.shape[0], device=device)
        c = self.model.config
        attention = DenseCausalAttention(positions, c.attention_scale, self.alibi, prefix_kv, c.layer_windows,
                                         c.attention_softcap, self.model.attention_sinks)
        return self.model(embeds, positions, attention)

    def logits(self, prefix: Tensor | None, ids: list[int], tokens_as_input_ids: bool | None = None) -> Tensor:
        """fp32 logits [n, vocab] at the token positions (the prefix rows are dropped)."""
        p = 0 if prefix is None or is_prefix_kv(prefix) else prefix.shape[0]
        return self.model.compute_logits(self.hidden(prefix, ids, tokens_as_input_ids)[p:])

    def generate(
        self,
        prefix: Tensor | None,
        ids: list[int],
        params: SamplingParams,
        eos_token_ids: tuple[int, ...],
        decode: Callable[[list[int]], str] | None = None,
        guide: GrammarGuide | None = None,
        gate: ThoughtGate | None = None,
        tokens_as_input_ids: bool | None = None,
    ) -> tuple[list[int], list[TokenLogprob] | None, Finish]:
        generator = make_generator(params)
        generated: list[int] = []
        logprobs: list[TokenLogprob] = []
        text = None if decode is None else FullText(decode, generated)
        while True:
            last = self.model.compute_logits(self.hidden(prefix, ids + generated, tokens_as_input_ids)[-1:])
            tokens, lps = sample_next(last, [params], [generator], [(ids, generated)], eos_token_ids,
                                      guides=[guide], gates=[gate])
            generated.append(tokens[0])
            if lps[0] is not None:
                logprobs.append(lps[0])
            finish = check_finish(generated, params, eos_token_ids, text, gate)
            if finish is not None:
                return generated, (logprobs if params.logprobs is not None else None), finish
