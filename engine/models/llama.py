"""Llama family: Llama 2/3, Mistral, Ministral, Qwen2, Qwen3, Phi-3, SmolLM3, Granite, ERNIE 4.5, Seed-OSS, GLM and
GLM-4, and the mixtures of experts Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, GraniteMoE, ... (RoPE, GQA, RMSNorm, SwiGLU;
Qwen3 norms q and k per head, OLMoE over all heads at once and clips q/k/v; Phi-3 and GLM store q/k/v or gate/up
fused and may rotate part of each head; SmolLM3 leaves RoPE out of some layers; Granite scales embeddings, residual
branches and logits; ERNIE 4.5 and GLM rotate interleaved pairs, GLM-4 norms each sublayer's output)."""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from ..config import ModelConfig
from .base import Layer0Input, Layer0Norms, RotaryCausalLM, language_model_tensors
from .common import XIELU, Attention, RMSNorm, activation, apply_rotary, l2_norm, norm_heads, permute_head_channels
from .linear import Linear, linear, transposed_storage
from .moe import SparseMoE, moe_checkpoint_tensors

_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.")
# checkpoints that name Llama's modules otherwise: Apertus's norms, HyperCLOVAX's and Kolibri-1's post-norms (GLM-4's,
# as we name them), Hunyuan's q/k norms and its MoE's router and shared MLP, the routers and correction biases of
# Kolibri-1, AFMoE and Hy3
CHECKPOINT_NAMES = ((".attention_layernorm.", ".input_layernorm."),
                    (".feedforward_layernorm.", ".post_attention_layernorm."),
                    (".post_norm1.", ".post_self_attn_layernorm."), (".post_norm2.", ".post_mlp_layernorm."),
                    (".post_attn_norm.", ".post_self_attn_layernorm."), (".post_ffn_norm.", ".post_mlp_layernorm."),
                    (".moe.router.expert_bias", ".mlp.gate.e_score_correction_bias"),
                    (".mlp.router.gate.", ".mlp.gate."), (".mlp.expert_bias", ".mlp.gate.e_score_correction_bias"),
                    (".query_layernorm.", ".q_norm."), (".key_layernorm.", ".k_norm."),
                    (".mlp.gate.wg.", ".mlp.gate."), (".mlp.shared_mlp.", ".mlp.shared_experts."))


def _fuse(linears: list[nn.Linear], transposed: bool) -> tuple[Tensor, Tensor | None]:
    """Stack several projections of the same input into one weight (one GEMM instead of several); the original
    parameters become views of the fused storage, so no memory is duplicated. `transposed`: hold it [in, out]. A
    projection without a bias, beside others with one, adds zeros to the fused bias."""
    weight = torch.cat([m.weight for m in linears])
    if transposed:
        weight = transposed_storage(weight)
    bias = None
    if any(m.bias is not None for m in linears):
        bias = torch.cat([weight.new_zeros(m.weight.shape[0]) if m.bias is None else m.bias for m in linears])
    row = 0
    for m in linears:
        n = m.weight.shape[0]
        m.weight = nn.Parameter(weight[row:row + n], requires_grad=False)
        if m.bias is not None:
            m.bias = nn.Parameter(bias[row:row + n], requires_grad=False)
        row += n
    return weight, bias


def _interleaved_to_halves(name: str, tensor: Tensor, c: ModelConfig) -> Tensor:
    """A q/k projection's rows and bias, or a q/k norm's gains, with each head's channels permuted from RoPE's
    interleaved pairs (2i, 2i+1) to rotate-half's (i, i + rotary_dim/2); other tensors as they are."""
    if name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.q_proj.bias",
                      "self_attn.k_proj.bias")):
        return permute_head_channels(tensor, c.head_dim, c.key_channel_order)
    if name.endswith(("self_attn.q_norm.weight", "self_attn.k_norm.weight")):
        return tensor[..., c.key_channel_order]
    return tensor


class LlamaAttention(nn.Module):
    def __init__(self, c: ModelConfig, norm: type[nn.Module] = RMSNorm):
        """`norm`: the class of Qwen3's / Gemma 3's per-head q and k norms (where the config has them)."""
        super().__init__()
        self.q_proj = Linear(c.hidden_size, c.num_heads * c.head_dim, bias=c.qkv_bias)
        self.k_proj = Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.v_proj = Linear(c.hidden_size, c.num_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.o_proj = Linear(c.num_heads * c.head_dim, c.hidden_size, bias=c.o_bias)
        if c.qk_norm:
            self.q_norm = norm(c.head_dim, c.norm_eps)
            self.k_norm = norm(c.head_dim, c.norm_eps)
        elif c.qk_norm_over_heads:  # OLMoE: over all heads at once
            self.q_norm = norm(c.num_heads * c.head_dim, c.norm_eps)
            self.k_norm = norm(c.num_kv_heads * c.head_dim, c.norm_eps)
        if c.attention_sinks:  # gpt-oss, GraniteSWA: a logit per head in each query's softmax denominator
            self.sinks = nn.Parameter(torch.zeros(c.num_heads))
        self.qkv_weight: Tensor | None = None
        self.qkv_bias: Tensor | None = None

    def fuse(self, transposed: bool) -> None:
        self.qkv_weight, self.qkv_bias = _fuse([self.q_proj, self.k_proj, self.v_proj], transposed)


class LlamaMLP(nn.Module):
    def __init__(self, c: ModelConfig, intermediate_size: int | None = None):
        """`intermediate_size`: a mixture-of-experts model's expert width (default: the config's)."""
        super().__init__()
        width = intermediate_size or c.intermediate_size
        if c.gated_mlp:
            self.gate_proj = Linear(c.hidden_size, width, bias=c.mlp_bias)
        self.up_proj = Linear(c.hidden_size, width, bias=c.mlp_bias)
        self.down_proj = Linear(width, c.hidden_size, bias=c.mlp_bias)
        self.act = c.hidden_act
        if self.act == "xielu":  # (learned parameters of its own)
            self.act_fn = XIELU()
        self.gated = c.gated_mlp
        self.gate_up_weight: Tensor | None = None
        self.gate_up_bias: Tensor | None = None

    def fuse(self, transposed: bool) -> None:
        if self.gated:
            self.gate_up_weight, self.gate_up_bias = _fuse([self.gate_proj, self.up_proj], transposed)

    def forward(self, x: Tensor) -> Tensor:
        if not self.gated:  # Arcee, Apertus: down(act(up(x)))
            up = self.up_proj(x)
            return self.down_proj(self.act_fn(up) if self.act == "xielu" else activation(self.act, up))
        gate, up = linear(x, self.gate_up_weight, self.gate_up_bias).chunk(2, dim=-1)
        if self.act == "silu" and not torch.is_grad_enabled():  # in place: no new [T, ffn] buffers
            return self.down_proj(torch.nn.functional.silu(gate, inplace=True).mul_(up))
        return self.down_proj(activation(self.act, gate) * up)


class LlamaLayer(nn.Module):
    attention_class: type[nn.Module] = LlamaAttention
    expert_class: type[nn.Module] = LlamaMLP  # a mixture of experts' expert
    norm_class: type[nn.Module] = RMSNorm

    def __init__(self, c: ModelConfig, index: int):
        super().__init__()
        self.self_attn = self.attention_class(c)
        sparse = c.moe is not None and index in c.moe.sparse_layers
        self.mlp = SparseMoE(c, self.expert_class) if sparse else LlamaMLP(c)
        self.input_layernorm = self.norm_class(c.hidden_size, c.norm_eps)
        self.post_attention_layernorm = self.norm_class(c.hidden_size, c.norm_eps)
        if c.sandwich_norms:  # GLM-4: a norm on the attention's and on the MLP's output, before each residual add
            self.post_self_attn_layernorm = self.norm_class(c.hidden_size, c.norm_eps)
            self.post_mlp_layernorm = self.norm_class(c.hidden_size, c.norm_eps)


class LlamaBackbone(nn.Module):
    """Token embeddings, the decoder layers and the final norm; a family of the Llama layout names its
    `layer_class` and its `final_norm`."""

    layer_class: type[nn.Module] = LlamaLayer

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(self.layer_class(c, i) for i in range(c.num_layers))
        self.norm = self.final_norm(c)

    @classmethod
    def final_norm(cls, c: ModelConfig) -> nn.Module:
        """The norm after the last layer: the layers' kind (`LlamaLayer.norm_class`)."""
        return cls.layer_class.norm_class(c.hidden_size, c.norm_eps)


class LlamaForCausalLM(RotaryCausalLM):
    key_prefix = "model."
    backbone_class: type[nn.Module] = LlamaBackbone
    # a family's own checkpoint names -> ours, replaced in this order before the CHECKPOINT_NAMES every one shares
    checkpoint_renames: tuple[tuple[str, str], ...] = ()
    per_layer_rope = True  # (Mellum's sliding and full-attention layers rotate with RoPEs of their own)

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.model = self.backbone_class(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=config.lm_head_bias)
        self.fused_layer0 = config.embedding_multiplier == 1.0  # (the fused input kernels do not scale)
        self.mtp_layers = int(getattr(config.hf_config, "num_nextn_predict_layers", 0) or 0)
        if config.model_type == "hy_v3":  # (Hy3's multi-token-prediction layer after the last, which transformers
            self.mtp_layers = 1  # leaves out too)
        if config.moe is not None and config.moe.fp32_router_weight:  # (ERNIE 4.5's routers; DeepSeek's since
            # transformers 5.24)
            self.fp32_key_suffixes = (*self.fp32_key_suffixes, "mlp.gate.weight")
        if config.moe is not None and config.moe.correction_bias_in_model_dtype:  # (MiniMax-M2's, AFMoE's)
            self.fp32_key_suffixes = tuple(s for s in self.fp32_key_suffixes if s != "e_score_correction_bias")
        self._sinks: Tensor | None = None

    @property
    def attention_sinks(self) -> Tensor | None:
        if not self.config.attention_sinks:
            return None
        if self._sinks is None:  # (once, after loading: CUDA graphs keep reading the same tensor)
            self._sinks = torch.stack([layer.self_attn.sinks for layer in self.model.layers]).float().contiguous()
        return self._sinks

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def checkpoint_tensors(self, key: str, tensor: Tensor) -> list[tuple[str, Tensor]]:
        """Phi-3's, GLM's and DBRX's fused qkv_proj (and gate_up_proj) weights as our separate projections (fused
        again, in our layout, by prepare_for_inference); Mixtral's experts under our names; a multimodal Mistral 3
        checkpoint's language model. With RoPE in interleaved pairs (Cohere, GLM, ERNIE 4.5), each head's q/k rows,
        biases and norm gains are permuted (`ModelConfig.key_channel_order`) so that rotate-half RoPE turns the
        pairs."""
        c = self.config
        if (mapped := language_model_tensors(key, tensor)) is not None:  # (a multimodal checkpoint's)
            if not mapped:
                return []
            [(key, tensor)] = mapped
        for theirs, ours in (*self.checkpoint_renames, *CHECKPOINT_NAMES):
            key = key.replace(theirs, ours)
        if (match := _LAYER_KEY.match(key)) and c.num_layers <= int(match[1]) < c.num_layers + self.mtp_layers:
            return []  # GLM-4.5's multi-token-prediction layers after the last one (speculative decoding only)
        # ERNIE 4.5's, EXAONE-MoE's and Mellum's multi-token-prediction blocks, which transformers leaves out too
        if (c.model_type == "ernie4_5_moe" and "mtp" in key) or (c.model_type in ("exaone_moe", "mellum")
                                                                  and key.startswith(("mtp.", "model.mtp."))):
            return []
        q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        if key.endswith("self_attn.qkv_proj.weight") and tensor.shape[0] == q + 2 * kv:
            stem = key.removesuffix("qkv_proj.weight")
            mapped = list(zip((stem + "q_proj.weight", stem + "k_proj.weight", stem + "v_proj.weight"),
                              tensor.split([q, kv, kv])))
        elif c.moe is not None:
            mapped = moe_checkpoint_tensors(key, self._experts_as_transformers_holds_them(key, tensor))
        elif key.endswith("mlp.gate_up_proj.weight") and tensor.shape[0] == 2 * c.intermediate_size:
            stem = key.removesuffix("gate_up_proj.weight")
            mapped = list(zip((stem + "gate_proj.weight", stem + "up_proj.weight"),
                              tensor.split([c.intermediate_size, c.intermediate_size])))
        else:
            mapped = [(key, tensor)]
        if c.interleaved_rope:
            mapped = [(name, _interleaved_to_halves(name, t, c)) for name, t in mapped]
        return mapped

    def _experts_as_transformers_holds_them(self, key: str, tensor: Tensor) -> Tensor:
        """Qwen3-VL-MoE's checkpoints hold the stacked experts transposed ([E, H, 2F], [E, F, H]); transformers
        transposes a tensor whose shape is not its own [E, 2F, H] / [E, H, F] (a square one stays), and so do we."""
        c = self.config
        if c.model_type != "qwen3_vl_moe" or tensor.dim() != 3:
            return tensor
        e, f, h = c.moe.num_experts, c.moe.intermediate_size, c.hidden_size
        for name, shape in ((".experts.gate_up_proj", (e, 2 * f, h)), (".experts.down_proj", (e, h, f))):
            if key.endswith(name) and tuple(tensor.shape) != shape:
                return tensor.transpose(1, 2)
        return tensor

    def prepare_for_inference(self, device: torch.device) -> None:
        transposed = self.fp32_on_cpu(device)
        for layer in self.model.layers:  # fused first, into the chosen layout: the base then leaves their views be
            layer.self_attn.fuse(transposed)
            layer.mlp.fuse(transposed)
        super().prepare_for_inference(device)

    def layer0_norms(self) -> Layer0Norms:
        layer = self.model.layers[0]
        norm, attn = layer.input_layernorm, layer.self_attn
        kind = "layer" if isinstance(norm, nn.LayerNorm) else "rms"  # (StableLM's LayerNorm)
        return Layer0Norms(None, None, (norm.weight, getattr(norm, "bias", None), norm.eps, kind),
                           (attn.qkv_weight, attn.qkv_bias))

    def rotate(self, qk: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """q and k [T, heads, head_dim] rotated by RoPE (Llama 4 rotates in fp32)."""
        return apply_rotary(qk, cos, sin)

    def forward(
        self, embeds: Tensor | None, positions: Tensor, attention: Attention, layer0: Layer0Input | None = None
    ) -> Tensor:
        c = self.config
        t = positions.shape[0]
        ropes = self.rope_rows_by_layer(attention, positions)
        qk_width = (c.num_heads + c.num_kv_heads) * c.head_dim
        h = embeds if layer0 is None else layer0.residual
        if c.embedding_multiplier != 1.0:  # Granite (no fused layer-0 input then)
            h = h * c.embedding_multiplier
        r = c.residual_multiplier
        if c.query_scale_beta:  # Ministral 3: queries scaled by position (1 below the first period)
            q_scale = 1 + c.query_scale_beta * torch.log(1 + torch.floor(positions / c.query_scale_period))
            q_scale = q_scale.to(h.dtype)[:, None, None]
        if c.nope_query_scale:  # Llama 4's NoPE layers: queries scaled by position, in fp32
            scale, floor = c.nope_query_scale
            nope_q_scale = (torch.log1p(torch.floor((positions.float() + 1.0) / floor)) * scale + 1.0)[:, None, None]
        for i, layer in enumerate(self.model.layers):
            a = layer.self_attn
            if i == 0 and layer0 is not None and layer0.qkv is not None:
                qkv = layer0.qkv
                # a parallel MLP takes the normed input too, which the fused QKV kernel never wrote
                x = layer.input_layernorm(h) if c.parallel_residual else None
            else:
                x = layer0.normed if (i == 0 and layer0 is not None) else layer.input_layernorm(h)
                qkv = linear(x, a.qkv_weight, a.qkv_bias)
            if c.qk_norm_over_heads:  # OLMoE: normed before the clip
                q_width = c.num_heads * c.head_dim
                qkv = torch.cat((a.q_norm(qkv[:, :q_width]), a.k_norm(qkv[:, q_width:qk_width]), qkv[:, qk_width:]),
                                dim=1)
            if c.clip_qkv:  # OLMo, OLMoE
                qkv = qkv.clamp(-c.clip_qkv, c.clip_qkv)
            qk = qkv[:, :qk_width].view(t, c.num_heads + c.num_kv_heads, c.head_dim)
            if c.qk_norm and not c.qk_norm_after_rope:
                qk = norm_heads(qk, c.num_heads, a.q_norm, a.k_norm)
            if ropes[i] is not None and i not in c.nope_layers:
                qk = self.rotate(qk, *ropes[i])
                if c.qk_l2_norm:  # Llama 4: on its RoPE layers, after RoPE
                    qk = l2_norm(qk, c.norm_eps)
            if c.qk_norm_after_rope:  # Hunyuan
                qk = norm_heads(qk, c.num_heads, a.q_norm, a.k_norm)
            q, k = qk[:, : c.num_heads], qk[:, c.num_heads:]
            if c.query_scale_beta:
                q = q * q_scale
            if c.nope_query_scale and i in c.nope_layers:
                q = (q * nope_q_scale).to(qk.dtype)
            v = qkv[:, qk_width:].view(t, c.num_kv_heads, c.head_dim)
            heads = attention(i, q, k, v).reshape(t, c.num_heads * c.head_dim)
            if c.attention_output_gate:  # AFMoE: gated by its normed input
                heads = heads * torch.sigmoid(a.gate_proj(x))
            # residual sums land in the projections' fresh outputs (o + h == h + o, bit for bit)
            out = a.o_proj(heads)
            if c.parallel_residual:  # StableLM: h + attn(ln(h)) + mlp(ln(h)), summed in HF's order
                h = (h + out).add_(layer.mlp(x))
                continue
            if c.sandwich_norms:  # GLM-4: each sublayer's output normed before its residual add
                out = layer.post_self_attn_layernorm(out)
            h = (out if r == 1.0 else out.mul_(r)).add_(h)
            out = layer.mlp(layer.post_attention_layernorm(h))
            if c.sandwich_norms:
                out = layer.post_mlp_layernorm(out)
            h = (out if r == 1.0 else out.mul_(r)).add_(h)
        return self.model.norm(h)
