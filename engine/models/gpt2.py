"""GPT-2: learned positions, LayerNorm, GELU, Conv1D weights (transposed to Linear at load). GPTBigCode
(StarCoder 1, SantaCoder): GPT-2's layout in nn.Linear weights, with multi-query attention (one K/V head)."""

from __future__ import annotations

from torch import Tensor, nn

from ..config import ModelConfig
from .base import CausalLM, Layer0Input, Layer0Norms, layer_qkv
from .common import Attention, activation, fused_qkv_to_blocks
from .linear import Linear


class GPT2Attention(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.c_attn = Linear(c.hidden_size, (c.num_heads + 2 * c.num_kv_heads) * c.head_dim)
        self.c_proj = Linear(c.hidden_size, c.hidden_size)


class GPT2MLP(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.c_fc = Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.c_proj = Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)
        self.act = c.hidden_act

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(activation(self.act, self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(c.hidden_size, eps=c.norm_eps)
        self.attn = GPT2Attention(c)
        self.ln_2 = nn.LayerNorm(c.hidden_size, eps=c.norm_eps)
        self.mlp = GPT2MLP(c)


class GPT2Backbone(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.wte = nn.Embedding(c.vocab_size, c.hidden_size)
        self.wpe = nn.Embedding(c.max_positions, c.hidden_size)
        self.h = nn.ModuleList(GPT2Block(c) for _ in range(c.num_layers))
        self.ln_f = nn.LayerNorm(c.hidden_size, eps=c.norm_eps)


class GPT2LMHeadModel(CausalLM):
    key_prefix = "transformer."
    transposed_weight_suffixes = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    ignored_key_suffixes = ("attn.bias", "attn.masked_bias")

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.transformer = GPT2Backbone(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def layer0_norms(self) -> Layer0Norms:
        block = self.transformer.h[0]
        ln, qkv = block.ln_1, block.attn.c_attn
        return Layer0Norms(self.transformer.wpe.weight, None, (ln.weight, ln.bias, ln.eps, "layer"),
                           (qkv.weight, qkv.bias))

    def forward(
        self, embeds: Tensor | None, positions: Tensor, attention: Attention, layer0: Layer0Input | None = None
    ) -> Tensor:
        c = self.config
        t = positions.shape[0]
        if layer0 is None:
            h = embeds + self.transformer.wpe(positions)  # soft-prompt rows get position embeddings too (as in PEFT)
        else:
            h = layer0.residual
        for i, block in enumerate(self.transformer.h):
            qkv = layer_qkv(i, layer0, block.ln_1, h, block.attn.c_attn)
            kv_width = c.num_kv_heads * c.head_dim
            q, k, v = qkv.split([c.hidden_size, kv_width, kv_width], dim=-1)
            if c.inverse_layer_scale and i > 0:  # scores / (i + 1), as the scaled query's dot products
                q = q / (i + 1)
            kv_shape = (t, c.num_kv_heads, c.head_dim)
            out = attention(i, q.reshape(t, c.num_heads, c.head_dim), k.reshape(kv_shape), v.reshape(kv_shape))
            h = h + block.attn.c_proj(out.reshape(t, c.hidden_size))
            h = h + block.mlp(block.ln_2(h))
        return self.transformer.ln_f(h)


class GPTBigCodeForCausalLM(GPT2LMHeadModel):
    transposed_weight_suffixes = ()  # nn.Linear weights
    ignored_key_suffixes = ()

    def checkpoint_tensors(self, key: str, tensor: Tensor) -> list[tuple[str, Tensor]]:
        """Without multi-query, c_attn's rows are per head ([H, (q, k, v), D]): reordered to [(q, k, v), H, D]."""
        c = self.config
        if c.num_kv_heads == c.num_heads and key.endswith(("attn.c_attn.weight", "attn.c_attn.bias")):
            tensor = fused_qkv_to_blocks(tensor, c.num_heads, c.num_heads, c.head_dim)
        return [(key, tensor)]
