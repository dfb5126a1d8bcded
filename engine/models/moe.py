"""Sparse mixture-of-experts MLP (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, GraniteMoE, GLM-4.5, ERNIE 4.5, DeepSeek-V2
/ V3, gpt-oss, MiniMax-M2, Llama 4, Phi-3.5-MoE, AFMoE, ...): a router picks each token's top-k experts, each a
SwiGLU MLP (gpt-oss's clamped), and their outputs are summed with the router's weights (Llama 4's weights scale the
experts' inputs instead; Qwen2-MoE adds a gated shared expert, GLM-4.5, ERNIE 4.5, DeepSeek, Llama 4 and AFMoE
ungated ones).

Tokens are grouped by expert and each expert runs once over its tokens; each token's k weighted outputs are then
summed in one reduction (no scattered atomic adds: deterministic on CUDA), as transformers' grouped-GEMM experts do.
The grouping reads the counts on the host, so a MoE model's decode steps are not captured in CUDA graphs.
"""

from __future__ import annotations

import re
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelConfig, MoEConfig
from .common import RMSNorm
from .linear import Linear


class SparseMoE(nn.Module):
    def __init__(self, c: ModelConfig, mlp: type[nn.Module]):
        """`mlp`: the expert class, built as mlp(c, intermediate_size)."""
        super().__init__()
        moe = c.moe
        assert moe is not None
        self.moe: MoEConfig = moe
        self.gate = Linear(c.hidden_size, moe.num_experts, bias=moe.router_bias)  # the router
        # experts have biases only where the MoE config says (gpt-oss), even where the dense MLPs do (ERNIE 4.5)
        expert_config = replace(c, mlp_bias=moe.expert_bias)
        computed = moe.num_experts - moe.identity_experts  # (LongCat-Flash's last ones return their input)
        self.experts = nn.ModuleList([*(mlp(expert_config, moe.intermediate_size) for _ in range(computed)),
                                      *(nn.Identity() for _ in range(moe.identity_experts))])
        if moe.shared_expert_intermediate_size:
            self.shared_expert = mlp(c, moe.shared_expert_intermediate_size)
            self.shared_expert_gate = Linear(c.hidden_size, 1, bias=False)
        if moe.ungated_shared_intermediate_size:
            self.shared_experts = mlp(c, moe.ungated_shared_intermediate_size)
        if (moe.sigmoid_scores and moe.score_bias) or moe.correction_bias:  # (kept in fp32 by the loader:
            # CausalLM.fp32_key_suffixes)
            self.gate.e_score_correction_bias = nn.Parameter(torch.zeros(moe.num_experts))
        if moe.output_norm:
            self.post_mlp_layernorm = RMSNorm(c.hidden_size, c.norm_eps)

    def fuse(self, transposed: bool) -> None:
        for expert in self.experts:
            if not isinstance(expert, nn.Identity):
                expert.fuse(transposed)
        if self.moe.shared_expert_intermediate_size:
            self.shared_expert.fuse(transposed)
        if self.moe.ungated_shared_intermediate_size:
            self.shared_experts.fuse(transposed)

    def route(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Each token's top-k experts [T, k] and their weights [T, k] (softmax over all experts in fp32, then
        renormalised over the chosen ones where the config says so; GraniteMoE: the top-k logits' softmax; ERNIE
        4.5: chosen by probability + correction bias; DeepSeek-V2, Mistral 4: from the best groups, scaled, Mistral
        4's in the model dtype; GLM-4.5, DeepSeek-V3: `_sigmoid_route`; gpt-oss: the top-k of biased logits in the
        model dtype, their softmax; Llama 4: their sigmoids; Phi-3.5-MoE: `_sparsemixer_route`; MiniMax-M2, AFMoE:
        `_sigmoid_route` in one group)."""
        moe = self.moe
        if moe.fp32_router:
            logits = F.linear(x.float(), self.gate.weight.float())
        else:
            logits = self.gate(x) if moe.router_in_model_dtype else self.gate(x).float()
        if moe.sigmoid_scores:
            return self._sigmoid_route(logits)
        if moe.sparsemixer_eps:
            return self._sparsemixer_route(logits)
        if moe.sigmoid_over_topk:  # Llama 4: the top-k logits' sigmoids, in fp32, cast back
            top, experts = torch.topk(logits, moe.top_k, dim=-1)
            return experts, torch.sigmoid(top.float()).to(x.dtype)
        if moe.softmax_over_topk:
            top, experts = torch.topk(logits, moe.top_k, dim=-1)
            weights = torch.softmax(top, dim=-1)
            return experts, (weights.to(x.dtype) if moe.weights_in_model_dtype else weights)
        probs = torch.softmax(logits, dim=-1)
        # ERNIE 4.5: chosen by probability + bias, weighted by probability
        choice = probs + self.gate.e_score_correction_bias if moe.correction_bias else probs
        experts = torch.topk(self._in_best_groups(choice), moe.top_k, dim=-1).indices
        weights = probs.gather(1, experts)
        if moe.norm_topk_prob:
            total = weights.sum(dim=-1, keepdim=True)
            weights = weights / (total.clamp(min=moe.norm_min) if moe.norm_min else total)
        if moe.routed_scaling != 1.0:
            weights = weights * moe.routed_scaling
        return experts, (weights.to(x.dtype) if moe.weights_in_model_dtype else weights)

    def _in_best_groups(self, choice: Tensor) -> Tensor:
        """The experts' choice scores [T, E] with those outside each token's best `top_groups` of `num_groups` groups
        set to -inf (a group ranked by its two best scores, DeepSeek-V3's; by its best, V2's); all where one group."""
        moe = self.moe
        if moe.num_groups <= 1:
            return choice
        grouped = choice.view(-1, moe.num_groups, moe.num_experts // moe.num_groups)
        rank = grouped.amax(dim=-1) if moe.group_by_best else grouped.topk(2, dim=-1).values.sum(dim=-1)
        best = torch.topk(rank, moe.top_groups, dim=-1, sorted=False).indices
        allowed = torch.zeros_like(rank, dtype=torch.bool).scatter_(1, best, True)
        return grouped.masked_fill(~allowed[..., None], float("-inf")).view(-1, moe.num_experts)

    def _sparsemixer_route(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        """Phi-3.5-MoE's sparsemixer at inference, in the logits' dtype as HF computes it: the best expert, weighted
        by its softmax over the logits not more than 2 eps (relative) below it; then the best of the others, by its
        softmax over the others within 2 eps of it."""
        eps2 = 2 * self.moe.sparsemixer_eps
        top, first = logits.max(dim=-1, keepdim=True)
        far = (top - logits) / logits.abs().clamp(min=top) > eps2
        weight = torch.softmax(logits.masked_fill(far, float("-inf")), dim=-1).gather(-1, first)
        others = logits.scatter(-1, first, float("-inf"))
        top2, second = others.max(dim=-1, keepdim=True)
        far2 = (top2 - logits) / logits.abs().clamp(min=top2) > eps2
        weight2 = torch.softmax(others.masked_fill(far2, float("-inf")), dim=-1).gather(-1, second)
        return torch.cat([first, second], dim=-1), torch.cat([weight, weight2], dim=-1)

    def _sigmoid_route(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        """GLM-4.5's (DeepSeek-V3's) routing of fp32 router logits, as HF computes it (weights stay fp32); Kolibri-1
        adds the correction bias to the logits rather than to their sigmoids."""
        moe = self.moe
        scores = logits.sigmoid()
        chosen_by = logits if moe.correction_bias_on_logits else scores  # (Kolibri-1's: the logits)
        choice = self._in_best_groups(chosen_by + self.gate.e_score_correction_bias if moe.score_bias else chosen_by)
        experts = torch.topk(choice, moe.top_k, dim=-1, sorted=False).indices
        weights = scores.gather(1, experts)
        if moe.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + moe.topk_norm_eps)
        return experts, weights * moe.routed_scaling

    def forward(self, x: Tensor) -> Tensor:
        """The routed experts' output with the shared experts' added (A.X K1: then normed)."""
        out = self.mix(x, *self.route(x))
        if self.moe.shared_expert_intermediate_size:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        if self.moe.ungated_shared_intermediate_size:
            out = out + self.shared_experts(x)
            if self.moe.shared_average:  # Cohere2-MoE's "average"
                out = out / 2
        return self.post_mlp_layernorm(out) if self.moe.output_norm else out

    def mix(self, x: Tensor, experts: Tensor, weights: Tensor) -> Tensor:
        """Each token of x through its chosen experts [T, k], their outputs summed with the weights [T, k] (no shared
        expert; Gemma 4 routes on another input than the one its experts take)."""
        moe = self.moe
        if moe.identity_experts and not moe.accumulate_by_expert:  # LongCat-Flash as transformers >= 5.25 mixes:
            # the identity slots weigh nothing among the experts, and the input times their summed weights is added
            identity = experts >= moe.num_experts - moe.identity_experts
            apart = weights.masked_fill(~identity, 0.0).sum(dim=-1, keepdim=True)
            return self._mix(x, experts, weights.masked_fill(identity, 0.0)) + (x * apart).to(x.dtype)
        return self._mix(x, experts, weights)

    def _mix(self, x: Tensor, experts: Tensor, weights: Tensor) -> Tensor:
        t, k = experts.shape
        flat = experts.flatten()
        order = flat.argsort(stable=True)  # the (token, slot) pairs grouped by expert
        counts = torch.bincount(flat, minlength=self.moe.num_experts).tolist()
        rows = x[order // k]
        if self.moe.weights_scale_input:  # Llama 4: the weights scale each expert's input, not its output
            rows = rows * weights.flatten()[order, None]
        outputs = torch.empty_like(rows)
        start = 0
        for e, n in enumerate(counts):
            if n:
                outputs[start:start + n] = self.experts[e](rows[start:start + n])
                start += n
        if self.moe.accumulate_by_expert:  # LongCat-Flash: expert by expert, in the model dtype (HF's loop; a token
            # meets each expert at most once, so the order within one does not matter)
            out = torch.zeros_like(x)
            tokens, scaled = order // k, (outputs * weights.flatten()[order, None]).to(x.dtype)
            start = 0
            for n in counts:
                if n:
                    out.index_add_(0, tokens[start:start + n], scaled[start:start + n])
                    start += n
            return out
        weighted = torch.empty((t * k, x.shape[1]), dtype=torch.promote_types(x.dtype, weights.dtype),
                               device=x.device)
        weighted[order] = outputs if self.moe.weights_scale_input else outputs * weights.flatten()[order, None]
        # each token's k outputs summed at once (in fp32 where the weights are): deterministic, as HF sums them
        return weighted.view(t, k, -1).sum(dim=1).to(x.dtype)


_MIXTRAL_EXPERT = re.compile(r"(.*)\.block_sparse_moe\.experts\.(\d+)\.w([123])\.weight")
_MIXTRAL_NAMES = {"1": "gate_proj", "2": "down_proj", "3": "up_proj"}
# GraniteMoE's names (as saved) for the router and the 3-D expert tensors
_BLOCK_SPARSE_NAMES = {"router.layer.weight": "gate.weight", "router.weight": "gate.weight",
                       "input_linear.weight": "experts.gate_up_proj", "output_linear.weight": "experts.down_proj"}


def moe_checkpoint_tensors(key: str, tensor: Tensor) -> list[tuple[str, Tensor]]:
    """Checkpoint entries of a MoE layer under our names: Mixtral's `block_sparse_moe.experts.{e}.w1/w2/w3` and
    `block_sparse_moe.gate` (as saved, also by transformers 5's save_pretrained), GraniteMoE's
    `block_sparse_moe.input_linear` [E, 2F, H], `output_linear` [E, H, F] and `router.layer`, and transformers 5's
    in-memory layout of all experts in two 3-D tensors, `mlp.experts.gate_up_proj` [E, 2F, H] and
    `mlp.experts.down_proj` [E, H, F], one entry per expert."""
    if match := _MIXTRAL_EXPERT.fullmatch(key):
        stem, expert, w = match.groups()
        return [(f"{stem}.mlp.experts.{expert}.{_MIXTRAL_NAMES[w]}.weight", tensor)]
    if key.endswith((".moe_statics.e_score_correction_bias", ".mlp.e_score_correction_bias",
                     ".block_sparse_moe.e_score_correction_bias")):  # ERNIE 4.5's, [1, E], under `mlp.` or
        # `mlp.gate.`; EXAONE-MoE's and MiniMax-M2's on the MoE block
        stem = key.split(".mlp.", 1)[0].split(".block_sparse_moe.", 1)[0]
        return [(f"{stem}.mlp.gate.e_score_correction_bias", tensor.reshape(-1))]
    if ".shared_mlp.input_linear." in key:  # GraniteMoeShared's shared MLP, [gate | up] fused, beside the MoE block
        stem = key.split(".shared_mlp.", 1)[0]
        return list(zip((f"{stem}.mlp.shared_experts.gate_proj.weight", f"{stem}.mlp.shared_experts.up_proj.weight"),
                        tensor.chunk(2)))
    if ".shared_mlp.output_linear." in key:
        return [(key.replace(".shared_mlp.output_linear.", ".mlp.shared_experts.down_proj."), tensor)]
    if ".block_sparse_moe." in key:  # Mixtral's / GraniteMoE's module name for what we call `mlp`
        stem, name = key.split(".block_sparse_moe.", 1)
        key = f"{stem}.mlp.{_BLOCK_SPARSE_NAMES.get(name, name)}"
    if tensor.dim() == 3 and key.endswith((".experts.gate_up_proj", ".experts.down_proj")):
        stem, name = key.rsplit(".", 1)
        if name == "down_proj":
            return [(f"{stem}.{e}.down_proj.weight", t) for e, t in enumerate(tensor)]
        return [pair for e, t in enumerate(tensor)
                for pair in zip((f"{stem}.{e}.gate_proj.weight", f"{stem}.{e}.up_proj.weight"), t.chunk(2))]
    return [(key, tensor)]
