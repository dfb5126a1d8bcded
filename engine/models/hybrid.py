"""What the families whose layers keep a recurrent state beside attention layers share (Qwen3.5, LFM2, Granite 4.0's
hybrids): the state's batch for a step, and a causal LM over a backbone of `model.embed_tokens`, `model.layers`."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..config import ModelConfig
from ..recurrent_state import RecurrentBatch
from .base import RotaryCausalLM
from .common import Attention
from .linear import Linear


def recurrent_batch(attention: Attention, h: Tensor) -> RecurrentBatch:
    """The step's recurrent states, which the engine's attention implementations carry (`attention.recurrent`);
    without them (the reference path), the batch is one sequence from zero."""
    return getattr(attention, "recurrent", None) or RecurrentBatch.single(h.shape[0])


Recurrence = Callable[..., tuple[Tensor, Tensor]]  # (per-token inputs..., state) -> (outputs, new state)


def scan_packed(batch: RecurrentBatch, inputs: tuple[Tensor, ...], state: Tensor, step: Recurrence,
                chunked: Recurrence) -> tuple[Tensor, Tensor]:
    """Each sequence's tokens of the packed per-token `inputs` (each [T, ...]) through a recurrence from its state
    [B, ...]: one batched `step(*inputs, state)` where every sequence has one token (a decode step), else per sequence
    `step` for one token or `chunked(*its inputs, its state)` for several. Returns the outputs [T, ...] and the final
    states [B, ...]."""
    if batch.all_single:
        return step(*inputs, state)
    outs, states, start = [], [], 0
    for i, n in enumerate(batch.lengths):
        part = [x[start:start + n] for x in inputs]
        if n == 1:
            out, new = step(*part, state[i:i + 1])
            new = new[0]
        else:
            out, new = chunked(*part, state[i])
        outs.append(out)
        states.append(new)
        start += n
    return torch.cat(outs), torch.stack(states)


class HybridCausalLM(RotaryCausalLM):
    """A model over `backbone_class(config)` (its `embed_tokens`, layers and final norm), an untied or tied LM head;
    no fused layer-0 input (the QKV kernel computes no stateful layer), no CUDA-graph decode (each step's states are
    looked up by slot on the host)."""

    key_prefix = "model."
    fused_layer0 = False
    backbone_class: type[nn.Module]

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.model = self.backbone_class(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    @property
    def graph_capturable(self) -> bool:
        return False
