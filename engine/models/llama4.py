"""Llama 4 (Scout, Maverick): Llama's layout with RoPE in interleaved pairs, rotated in fp32 as transformers' complex
numbers do, on the RoPE layers only (q/k L2-normed after it there), NoPE layers whose queries are temperature-tuned
by position, and mixtures of experts whose router's top-k sigmoids scale each expert's input, beside an ungated
shared expert (`ModelConfig.qk_l2_norm`, `nope_query_scale`; `MoEConfig.sigmoid_over_topk`, `weights_scale_input`).
The checkpoints name the MLP `feed_forward` and hold the experts stacked [E, H, 2F] / [E, F, H] (transposed)."""

from __future__ import annotations

import re

import torch
from torch import Tensor

from .base import language_model_tensors
from .common import apply_rotary
from .llama import LlamaForCausalLM

_EXPERTS = re.compile(r"(.*\.mlp\.experts)\.(gate_up_proj|down_proj)")
_NAMES = ((".feed_forward.", ".mlp."), (".mlp.router.", ".mlp.gate."), (".mlp.shared_expert.", ".mlp.shared_experts."))


class Llama4ForCausalLM(LlamaForCausalLM):
    @property
    def rope_dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def rope_tables(self) -> None:
        return None  # (the model rotates q/k itself, in fp32)

    def rotate(self, qk: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        return apply_rotary(qk.float(), cos, sin).to(qk.dtype)

    def checkpoint_tensors(self, key: str, tensor: Tensor) -> list[tuple[str, Tensor]]:
        if (mapped := language_model_tensors(key, tensor)) is not None:  # (the multimodal checkpoint's)
            if not mapped:
                return []
            [(key, tensor)] = mapped
        for theirs, ours in _NAMES:
            key = key.replace(theirs, ours)
        match = _EXPERTS.fullmatch(key)
        if match is None:
            return super().checkpoint_tensors(key, tensor)
        stem, name = match.groups()
        if name == "down_proj":  # [E, F, H]
            return [(f"{stem}.{e}.down_proj.weight", t.t()) for e, t in enumerate(tensor)]
        f = tensor.shape[-1] // 2  # [E, H, 2F]: gate, then up
        return [pair for e, t in enumerate(tensor)
                for pair in ((f"{stem}.{e}.gate_proj.weight", t[:, :f].t()),
                             (f"{stem}.{e}.up_proj.weight", t[:, f:].t()))]
