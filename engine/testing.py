"""Tiny random-weight Hugging Face checkpoints, tokenizers and PEFT prompt-tuning adapters for tests and demos,
and `assert_generation_matches` for checking an engine against a reference in your own test suite."""

from __future__ import annotations

import math
import random
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "BOS_ID", "CHAT_TEMPLATE", "EOS_ID", "PAD_ID", "SPECIAL_TOKENS", "SUPPORTED_TINY_ARCHS", "UNK_ID",
    "assert_generation_matches", "build_cartridge_adapter", "build_cpt_adapter",
    "build_multitask_prompt_tuning_adapter", "build_p_tuning_adapter", "build_prefix_tuning_adapter",
    "build_prompt_tensor", "build_prompt_tuning_adapter", "build_tiny_checkpoint", "build_tokenizer",
    "hf_peft_reference", "tiny_model_with_adapters",
]

SUPPORTED_TINY_ARCHS: tuple[str, ...] = (
    "llama", "mistral", "ministral", "ministral3", "mistral3", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe",
    "granite", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "mellum", "olmoe", "granitemoe",
    "granitemoeshared", "gpt_oss", "minimax_m2", "llama4_text", "llama4", "phimoe", "afmoe", "granite_swa",
    "granitemoe_swa", "cohere2_moe", "kolibri1", "flint", "mpt", "persimmon", "dbrx", "nanochat", "gpt-sw3", "hy_v3",
    "glm4_moe", "deepseek_v2", "deepseek_v3", "deepseek_v32", "glm_moe_dsa", "glm4_moe_lite", "mistral4", "youtu",
    "axk1", "minicpm3", "dots1", "iquestcoder", "vaultgemma", "hunyuan_v1_dense", "hunyuan_v1_moe", "solar_open",
    "exaone_moe", "phi3", "smollm3", "ernie4_5", "ernie4_5_moe", "seed_oss", "internlm3", "helium", "arcee", "apertus",
    "cwm", "hyperclovax", "jais2", "gemma", "gemma2", "gemma3_text", "gemma3", "gemma4_text", "gemma4",
    "gemma4_unified_text", "gemma4_unified", "laguna", "qwen3_5_text", "qwen3_5", "qwen3_5_moe_text", "qwen3_5_moe",
    "qwen3_next", "lfm2", "granitemoehybrid", "bamba", "nemotron_h", "mamba", "falcon_mamba", "mamba2", "jamba",
    "lfm2_moe", "olmo_hybrid", "falcon_h1", "lfm3", "lfm2_vl", "lfm3_vl", "mimo_v2_flash", "longcat_flash",
    "kimi_linear", "gpt_neox", "phi", "stablelm", "nemotron", "starcoder2", "cohere", "cohere2", "olmo", "olmo2",
    "olmo3", "flex_olmo", "exaone4", "exaone4_5", "glm", "glm4", "falcon", "gptj", "codegen", "opt", "xglm", "biogpt",
    "gpt2", "gpt_bigcode", "gpt_neo", "bloom")

SPECIAL_TOKENS: tuple[str, ...] = ("<unk>", "<s>", "</s>", "<pad>")  # ids 0, 1, 2, 3
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)

_WORDS = (
    "the a an one some every this that my your our their cat dog bird fish horse mouse child teacher farmer "
    "king queen river mountain city house garden tree flower stone road ship star moon sun rain wind "
    "sat ran jumped saw found made took gave liked wanted built watched painted opened carried followed "
    "on in under over near behind beside into from with without through across and but or so because "
    "big small red blue green old young quiet loud happy sad bright dark warm cold fast slow "
    "mat table window door hill lake forest field book letter song story morning evening night day"
).split()


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence transformers' progress bars and PEFT's deprecation chatter while building fixtures."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*is_gradient_checkpointing.*")
            yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _corpus(num_sentences: int = 400) -> list[str]:
    """Deterministic English-like sentences from a fixed word list."""
    rng = random.Random(0)
    lines = []
    for _ in range(num_sentences):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 12))]
        if rng.random() < 0.3:
            words[0] = words[0].capitalize()
        end = rng.choice((".", ".", ".", "!", "?", ","))
        lines.append(" ".join(words) + end)
    lines.append("the cat sat on the mat.")
    lines.append("0 1 2 3 4 5 6 7 8 9 10 42 100 2024")
    return lines


def build_tokenizer(out_dir: str | Path, vocab_size: int = 512, corpus: Iterable[str] | None = None,
                    added_tokens: Sequence[str] = ()) -> Path:
    """Train a deterministic byte-level BPE tokenizer (<unk>=0, <s>=1, </s>=2, <pad>=3) and save it to `out_dir`.
    `corpus`: the lines to train on (default: sentences from a fixed word list, enough for a few hundred tokens).
    `added_tokens`: (non-special) added tokens after the trained ones, such as a thinking model's `<think>`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    min_size = len(SPECIAL_TOKENS) + 256
    if vocab_size < min_size:
        raise ValueError(f"vocab_size must be >= {min_size} (4 special tokens + 256 bytes), got {vocab_size}")
    out_dir = Path(out_dir)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus() if corpus is None else corpus, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [UNK_ID, BOS_ID, EOS_ID, PAD_ID]
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        clean_up_tokenization_spaces=False,
    )
    fast.add_tokens(list(added_tokens))
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return out_dir


def _hf_config(arch: str, *, vocab_size: int, hidden_size: int, num_layers: int, num_heads: int,
               num_kv_heads: int | None, intermediate_size: int | None, max_positions: int,
               tie_word_embeddings: bool | None, **overrides: Any) -> Any:
    """The transformers config object for one of SUPPORTED_TINY_ARCHS."""
    import transformers

    ids = dict(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    untied = ("llama", "mistral", "ministral", "ministral3", "mistral3", "granite", "mixtral", "qwen2_moe", "qwen3_moe",
              "olmoe", "granitemoe", "granitemoeshared", "phi3", "gpt_neox", "phi", "stablelm", "olmo", "olmo2",
              "olmo3", "exaone4", "exaone4_5", "glm", "glm4", "gptj", "codegen", "internlm3", "helium", "arcee",
              "nemotron", "cwm", "hyperclovax", "jais2", "apertus", "glm4_moe", "deepseek_v2", "deepseek_v3",
              "glm4_moe_lite", "mistral4", "minicpm3", "deepseek_v32", "glm_moe_dsa", "axk1", "dots1",
              "hunyuan_v1_dense", "hunyuan_v1_moe", "solar_open", "exaone_moe", "gpt_oss", "minimax_m2", "llama4_text",
              "llama4", "phimoe", "afmoe", "granite_swa", "granitemoe_swa", "kolibri1", "flint", "dbrx", "nanochat",
              "hy_v3", "laguna", "qwen3_5_text", "qwen3_5", "qwen3_5_moe_text", "qwen3_5_moe", "qwen3_next",
              "granitemoehybrid", "bamba", "nemotron_h", "mamba2", "jamba", "olmo_hybrid", "falcon_h1", "mimo_v2_flash",
              "longcat_flash", "kimi_linear")
    tie = arch not in untied if tie_word_embeddings is None else tie_word_embeddings
    inter = intermediate_size or 4 * hidden_size
    if arch in ("llama", "mistral", "ministral", "ministral3", "granite", "mixtral", "qwen2", "qwen2_moe", "qwen3",
                "qwen3_moe", "olmoe", "granitemoe", "granitemoeshared", "phi3", "smollm3", "ernie4_5", "ernie4_5_moe",
                "seed_oss", "internlm3", "helium", "arcee", "apertus", "cwm", "hyperclovax", "jais2", "glm4_moe",
                "dots1", "iquestcoder", "hunyuan_v1_dense", "hunyuan_v1_moe", "solar_open", "exaone_moe", "mellum",
                "minimax_m2", "phimoe", "afmoe", "granite_swa", "granitemoe_swa", "kolibri1", "flint", "hy_v3"):
        cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
               "ministral": transformers.MinistralConfig, "ministral3": transformers.Ministral3Config,
               "granite": transformers.GraniteConfig,
               "mixtral": transformers.MixtralConfig,
               "qwen2": transformers.Qwen2Config, "qwen2_moe": transformers.Qwen2MoeConfig,
               "qwen3": transformers.Qwen3Config, "qwen3_moe": transformers.Qwen3MoeConfig,
               "phi3": transformers.Phi3Config, "smollm3": transformers.SmolLM3Config,
               "ernie4_5": transformers.Ernie4_5Config, "ernie4_5_moe": transformers.Ernie4_5_MoeConfig,
               "olmoe": transformers.OlmoeConfig,
               "seed_oss": transformers.SeedOssConfig, "granitemoe": transformers.GraniteMoeConfig,
               "granitemoeshared": transformers.GraniteMoeSharedConfig,
               "internlm3": transformers.InternLM3Config, "helium": transformers.HeliumConfig,
               "arcee": transformers.ArceeConfig, "cwm": transformers.CwmConfig,
               "hyperclovax": transformers.HyperCLOVAXConfig, "jais2": transformers.Jais2Config,
               "apertus": transformers.ApertusConfig, "glm4_moe": transformers.Glm4MoeConfig,
               "dots1": transformers.Dots1Config, "iquestcoder": transformers.IQuestCoderConfig,
               "hunyuan_v1_dense": transformers.HunYuanDenseV1Config,
               "hunyuan_v1_moe": transformers.HunYuanMoEV1Config, "solar_open": transformers.SolarOpenConfig,
               "exaone_moe": transformers.ExaoneMoeConfig, "mellum": transformers.MellumConfig,
               "minimax_m2": transformers.MiniMaxM2Config, "phimoe": transformers.PhimoeConfig,
               "afmoe": transformers.AfmoeConfig, "granite_swa": transformers.GraniteSWAConfig,
               "granitemoe_swa": transformers.GraniteMoeSWAConfig, "kolibri1": transformers.Kolibri1Config,
               "flint": transformers.FlintConfig, "hy_v3": transformers.HYV3Config}[arch]
        kw = dict(hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                  num_key_value_heads=num_kv_heads or max(1, num_heads // 2), intermediate_size=inter,
                  max_position_embeddings=max_positions)
        # mixture of experts: 4 experts of half the width, 2 a token (Mixtral's 8 and 2, scaled down)
        if arch == "mixtral":
            kw.update(num_local_experts=4, num_experts_per_tok=2, intermediate_size=inter // 2)
        if arch == "mellum":  # a dense first layer, then 4 experts (2 a token); a sliding layer, a full one, each
            # with its RoPE
            kw.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=inter // 2, sliding_window=6,
                      mlp_layer_types=["dense"] + ["sparse"] * (num_layers - 1),
                      layer_types=(["sliding_attention", "full_attention"] * num_layers)[:num_layers])
        if arch in ("qwen2_moe", "qwen3_moe"):
            kw.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=inter // 2)
        if arch == "afmoe":  # a dense first layer, then 4 experts (2 a token) and a shared one; a sliding layer, a
            # full one (NoPE), ...
            kw.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=inter // 8, num_shared_experts=1,
                      sliding_window=6, global_attn_every_n_layers=2, route_scale=2.5)
        if arch == "kolibri1":  # every layer 4 experts (2 a token) and a shared one; sliding layers with RoPE, a full
            # one without (NoPE)
            del kw["intermediate_size"]
            layer_types = (["sliding_attention", "full_attention"] * num_layers)[:num_layers]
            kw.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=inter // 8,
                      shared_expert_intermediate_size=inter // 8, sliding_window=6, layer_types=layer_types)
        if arch == "flint":  # a dense first layer, then 4 experts (2 a token) and a shared one; full-attention
            # layers without RoPE around a sliding one; attention sinks
            kw.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=inter // 8,
                      shared_expert_intermediate_size=inter // 8, mlp_only_layers=[0], sliding_window=6,
                      layer_types=(["full_attention", "sliding_attention"] * num_layers)[:num_layers])
        if arch == "hy_v3":  # a dense first layer, then 4 experts (2 a token, scaled) and a shared one
            kw.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=inter // 8, num_shared_experts=1,
                      router_scaling_factor=2.5)
        if arch == "phimoe":  # (sparsemixer's two experts a token)
            kw.update(num_local_experts=4, num_experts_per_tok=2, intermediate_size=inter // 2)
        if arch == "minimax_m2":  # (and RoPE over half of each head)
            kw.update(num_local_experts=4, num_experts_per_tok=2, intermediate_size=inter // 2,
                      rotary_dim=hidden_size // num_heads // 2)
        if arch == "hunyuan_v1_moe":  # (experts as wide as the dense MLP, and a shared one)
            kw.update(num_experts=4, moe_topk=2, intermediate_size=inter // 2)
        if arch == "olmoe":
            kw.update(num_experts=4, num_experts_per_tok=2, intermediate_size=inter // 2)
        if arch in ("granitemoe", "granitemoeshared"):
            kw.update(num_local_experts=4, num_experts_per_tok=2, intermediate_size=inter // 2)
        if arch in ("granite_swa", "granitemoe_swa"):  # a full-attention layer, then sliding ones (window 6), each
            # layer's RoPE base its own, the last none (NoPE); attention sinks
            layer_types = (["full_attention"] + ["sliding_attention"] * num_layers)[:num_layers]
            thetas = ([10000.0, 500000.0] * num_layers)[:num_layers - 1] + [0]
            kw.update(sliding_window=6, layer_types=layer_types, layer_rope_theta=thetas)
        if arch == "granitemoe_swa":
            kw.update(num_local_experts=4, num_experts_per_tok=2, intermediate_size=inter // 2)
        if arch == "granitemoeshared":  # (and a shared MLP as wide as the experts)
            kw.update(shared_intermediate_size=inter // 2)
        if arch == "ernie4_5_moe":  # a dense first layer, then 4 experts (2 a token) and a shared one
            kw.update(moe_num_experts=4, moe_k=2, moe_intermediate_size=inter // 2, moe_num_shared_experts=1,
                      moe_layer_start_index=1)
        if arch in ("glm4_moe", "dots1"):  # a dense first layer, then 8 experts in 2 groups (2 a token, from the
            # best group)
            kw.update(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=inter // 4, n_shared_experts=1,
                      n_group=2, topk_group=1, first_k_dense_replace=1, routed_scaling_factor=2.5)
        if arch == "exaone_moe":  # a dense first layer, then 8 experts in 2 groups (2 a token) and a shared one
            kw.update(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=inter // 4, num_shared_experts=1,
                      n_group=2, topk_group=1, first_k_dense_replace=1, routed_scaling_factor=2.5)
        if arch == "solar_open":  # every layer sparse: 8 experts (2 a token) and a shared one, no dense MLP
            del kw["intermediate_size"]
            kw.update(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=inter // 4, n_shared_experts=1,
                      routed_scaling_factor=2.5)
        # Qwen3's and ERNIE 4.5's head_dim default to 128 whatever the hidden size; Ministral's to None
        if arch in ("qwen3", "qwen3_moe", "ministral", "ministral3", "ernie4_5", "ernie4_5_moe", "seed_oss",
                    "internlm3", "helium", "arcee", "apertus", "cwm", "hyperclovax", "jais2", "glm4_moe", "dots1",
                    "iquestcoder", "hunyuan_v1_dense", "hunyuan_v1_moe", "solar_open", "exaone_moe", "mellum",
                    "minimax_m2", "phimoe", "afmoe", "kolibri1", "flint", "hy_v3"):
            kw["head_dim"] = hidden_size // num_heads
    elif arch == "llama4_text":
        # a RoPE layer, a NoPE one (its queries temperature-tuned: floor_scale 4 so the test's positions reach it),
        # a RoPE one; the middle layer sparse (4 experts 1.5x the hidden size, 1 a token, and a shared one); RoPE
        # layers attend in chunks of half the context, so sequences are capped there
        cls = transformers.Llama4TextConfig
        kw = dict(hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                  num_key_value_heads=num_kv_heads or max(1, num_heads // 2), head_dim=hidden_size // num_heads,
                  intermediate_size=hidden_size * 3 // 2, intermediate_size_mlp=inter, num_local_experts=4,
                  num_experts_per_tok=1, max_position_embeddings=max_positions, no_rope_layer_interval=2,
                  interleave_moe_layer_step=2, attention_chunk_size=max_positions // 2, floor_scale=4,
                  attn_scale=0.5)
    elif arch == "gpt_oss":
        # 4 experts of half the width (2 a token) in every layer, a sliding layer then a full one (window 6), YaRN
        # scaled to the tiny context; attention sinks; gpt-oss's q/k/v/o biases
        cls = transformers.GptOssConfig
        kw = dict(hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                  num_key_value_heads=num_kv_heads or max(1, num_heads // 2), head_dim=hidden_size // num_heads,
                  intermediate_size=inter // 2, num_local_experts=4, num_experts_per_tok=2,
                  max_position_embeddings=max_positions, sliding_window=6,
                  rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0, "beta_fast": 32.0,
                                   "beta_slow": 1.0, "truncate": False,
                                   "original_max_position_embeddings": max_positions // 4})
    elif arch in ("deepseek_v2", "deepseek_v3", "deepseek_v32", "glm_moe_dsa", "glm4_moe_lite", "mistral4", "youtu",
                  "minicpm3", "axk1"):
        # latent attention at a tiny scale: queries through a rank-32 projection, keys/values from a rank-16 latent;
        # 16 key channels per head not rotated, 8 rotated (shared), values 12 wide; a dense first layer, then 8
        # experts (2 a token) in 2 groups (1 a token: V2's group_limited_greedy, V3's) and a shared expert
        cls = {"deepseek_v2": transformers.DeepseekV2Config, "deepseek_v3": transformers.DeepseekV3Config,
               "glm4_moe_lite": transformers.Glm4MoeLiteConfig, "mistral4": transformers.Mistral4Config,
               "deepseek_v32": transformers.DeepseekV32Config, "glm_moe_dsa": transformers.GlmMoeDsaConfig,
               "youtu": transformers.YoutuConfig, "minicpm3": transformers.MiniCPM3Config,
               "axk1": transformers.AXK1Config}[arch]
        kw = dict(hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                  num_key_value_heads=num_heads, intermediate_size=inter, max_position_embeddings=max_positions,
                  q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
                  n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=inter // 4, n_shared_experts=1,
                  first_k_dense_replace=1, routed_scaling_factor=2.5, n_group=2, topk_group=1)
        if arch == "deepseek_v2":
            kw["topk_method"] = "group_limited_greedy"
        if arch in ("deepseek_v32", "glm_moe_dsa"):  # (a tiny indexer that keeps the best 64 keys: every key up to
            # 64 tokens, where sequences are capped; GLM-5's later layers reuse the first's choice)
            kw.update(index_topk=64, index_n_heads=2, index_head_dim=16,
                      mlp_layer_types=["dense"] + ["sparse"] * (num_layers - 1))
        if arch == "axk1":  # (its layers named by type; the MoE blocks' outputs normed)
            del kw["first_k_dense_replace"]
            kw["mlp_layer_types"] = ["dense"] + ["sparse"] * (num_layers - 1)
        if arch == "glm4_moe_lite":  # (one group: GLM-4.7-Flash's)
            kw.update(n_group=1, mlp_layer_types=["dense"] + ["sparse"] * (num_layers - 1))
        if arch in ("youtu", "minicpm3"):  # (dense models)
            for key in ("n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "n_shared_experts",
                        "first_k_dense_replace", "routed_scaling_factor", "n_group", "topk_group"):
                del kw[key]
        if arch == "minicpm3":  # its embedding, residual and hidden-state scales (MiniCPM3-4B's scale_emb 12)
            kw.update(scale_emb=12, scale_depth=1.4, dim_model_base=16)
    elif arch == "gemma3":  # multimodal: Gemma 3 text + a tiny SigLIP vision tower the engine leaves out
        text = _hf_config("gemma3_text", vocab_size=vocab_size, hidden_size=hidden_size, num_layers=num_layers,
                          num_heads=num_heads, num_kv_heads=num_kv_heads, intermediate_size=intermediate_size,
                          max_positions=max_positions, tie_word_embeddings=True, **overrides)
        vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=28,
                      patch_size=14)
        return transformers.Gemma3Config(text_config=text.to_dict(), vision_config=vision, mm_tokens_per_image=4,
                                         image_token_index=vocab_size - 1, boi_token_index=vocab_size - 2,
                                         eoi_token_index=vocab_size - 3, **ids)
    elif arch == "mistral3":  # multimodal: Ministral 3 (or `text_model_type`'s) text + a tiny Pixtral vision tower
        text = _hf_config(overrides.pop("text_model_type", "ministral3"), vocab_size=vocab_size,
                          hidden_size=hidden_size, num_layers=num_layers,
                          num_heads=num_heads, num_kv_heads=num_kv_heads, intermediate_size=intermediate_size,
                          max_positions=max_positions, tie_word_embeddings=tie, **overrides)
        vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=28,
                      patch_size=14, head_dim=16)
        return transformers.Mistral3Config(text_config=text.to_dict(), vision_config=vision,
                                           image_token_index=vocab_size - 1, tie_word_embeddings=tie, **ids)
    elif arch == "llama4":  # multimodal: Llama 4 text + a tiny vision model the engine leaves out
        text = _hf_config("llama4_text", vocab_size=vocab_size, hidden_size=hidden_size, num_layers=num_layers,
                          num_heads=num_heads, num_kv_heads=num_kv_heads, intermediate_size=intermediate_size,
                          max_positions=max_positions, tie_word_embeddings=tie, **overrides)
        vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                      vision_output_dim=64, image_size=28, patch_size=14, projector_input_dim=64,
                      projector_output_dim=hidden_size)
        return transformers.Llama4Config(text_config=text.to_dict(), vision_config=vision,
                                         image_token_index=vocab_size - 1, tie_word_embeddings=tie, **ids)
    elif arch == "exaone4_5":  # multimodal: EXAONE 4 text + a tiny vision tower the engine leaves out
        text = _hf_config("exaone4", vocab_size=vocab_size, hidden_size=hidden_size, num_layers=num_layers,
                          num_heads=num_heads, num_kv_heads=num_kv_heads, intermediate_size=intermediate_size,
                          max_positions=max_positions, tie_word_embeddings=tie, **overrides)
        vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, num_key_value_heads=2,
                      out_hidden_size=hidden_size, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                      fullatt_block_indexes=[0])
        return transformers.Exaone4_5_Config(text_config=text.to_dict(), vision_config=vision,
                                             image_token_id=vocab_size - 1, video_token_id=vocab_size - 2,
                                             tie_word_embeddings=tie, **ids)
    elif arch in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"):  # Qwen2 / 3 (MoE) text + a tiny vision tower
        text_arch = {"qwen3_vl": "qwen3", "qwen3_vl_moe": "qwen3_moe"}.get(arch, "qwen2")
        text = _hf_config(text_arch, vocab_size=vocab_size, hidden_size=hidden_size, num_layers=num_layers,
                          num_heads=num_heads, num_kv_heads=num_kv_heads, intermediate_size=intermediate_size,
                          max_positions=max_positions, tie_word_embeddings=tie, **overrides).to_dict()
        half = hidden_size // num_heads // 2  # RoPE's frequencies, split in three (time, height, width) sections
        text["rope_parameters"] = {**text.get("rope_parameters", {}), "rope_type": "default",
                                   "mrope_section": [half - 2 * (half // 3), half // 3, half // 3],
                                   **({"mrope_interleaved": True} if arch.startswith("qwen3") else {})}
        vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden_size,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
        media = dict(image_token_id=vocab_size - 1, video_token_id=vocab_size - 2, vision_start_token_id=vocab_size - 3)
        if arch == "qwen2_vl":
            vision = dict(depth=1, embed_dim=32, hidden_size=hidden_size, mlp_ratio=2, num_heads=2, patch_size=14)
            return transformers.Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tie,
                                              **media, **ids)
        if arch == "qwen2_5_vl":
            vision["fullatt_block_indexes"] = [0]
            return transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tie,
                                                 **media, **ids)
        vision["deepstack_visual_indexes"] = []
        if arch == "qwen3_vl_moe":
            text.pop("norm_topk_prob", None)  # (it always renormalises)
            return transformers.Qwen3VLMoeConfig(text_config=text, vision_config=vision, tie_word_embeddings=tie,
                                                 **media, **ids)
        return transformers.Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tie, **media,
                                          **ids)
    elif arch in ("gemma4", "gemma4_unified"):  # multimodal: Gemma 4's (or the unified one's) text + a tiny vision
        # tower the engine leaves out
        text = _hf_config(arch + "_text", vocab_size=vocab_size, hidden_size=hidden_size, num_layers=num_layers,
                          num_heads=num_heads, num_kv_heads=num_kv_heads, intermediate_size=intermediate_size,
                          max_positions=max_positions, tie_word_embeddings=True, **overrides)
        if arch == "gemma4":
            cls = transformers.Gemma4Config
            vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                          num_key_value_heads=2, head_dim=16, patch_size=4, position_embedding_size=64)
        else:
            cls = transformers.Gemma4UnifiedConfig
            vision = dict(patch_size=4, pooling_kernel_size=2, mm_embed_dim=32, mm_posemb_size=16, output_proj_dims=32)
        return cls(text_config=text.to_dict(), vision_config=vision, audio_config=None, image_token_id=vocab_size - 1,
                   boi_token_id=vocab_size - 2, eoi_token_id=vocab_size - 3, video_token_id=vocab_size - 4,
                   audio_token_id=vocab_size - 5, **ids)
    elif arch in ("gemma4_text", "gemma4_unified_text"):  # sliding and full-attention layers in turn (the last
        # full), the full ones with twice the head width, half the K/V heads and their values their keys; the
        # per-layer input embeddings of E2B / E4B off (hidden_size_per_layer_input 0), as in the dense and 26B-A4B
        # models
        head_dim = hidden_size // num_heads
        kv_heads = num_kv_heads or max(1, num_heads // 2)
        kw = dict(hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                  num_key_value_heads=kv_heads, intermediate_size=inter, max_position_embeddings=max_positions,
                  head_dim=head_dim, global_head_dim=2 * head_dim, num_global_key_value_heads=max(1, kv_heads // 2),
                  attention_k_eq_v=True, sliding_window=6,
                  layer_types=(["sliding_attention", "full_attention"] * num_layers)[:num_layers - 1]
                  + ["full_attention"])
        if arch == "gemma4_text":
            cls = transformers.Gemma4TextConfig
            kw.update(hidden_size_per_layer_input=0)
        else:
            cls = transformers.Gemma4UnifiedTextConfig
    elif arch in ("gemma", "gemma2", "gemma3_text", "vaultgemma"):
        cls = {"gemma": transformers.GemmaConfig, "gemma2": transformers.Gemma2Config,
               "gemma3_text": transformers.Gemma3TextConfig, "vaultgemma": transformers.VaultGemmaConfig}[arch]
        head_dim = hidden_size // num_heads
        kw = dict(hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                  num_key_value_heads=num_kv_heads or max(1, num_heads // 2), intermediate_size=inter,
                  max_position_embeddings=max_positions, head_dim=head_dim)
        if arch == "gemma3_text":  # sliding layers first, a global one last (Gemma 3's 5:1 pattern, shortened)
            kw.update(query_pre_attn_scalar=head_dim, sliding_window=16,
                      layer_types=["sliding_attention"] * (num_layers - 1) + ["full_attention"])
        if arch in ("gemma2", "vaultgemma"):  # sliding and global layers in turn, as Gemma 2 has them
            kw.update(query_pre_attn_scalar=head_dim, sliding_window=16)
    elif arch == "gpt_neox":
        cls = transformers.GPTNeoXConfig
        kw = dict(hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                  intermediate_size=inter, max_position_embeddings=max_positions, hidden_dropout=0.0,
                  attention_dropout=0.0)
    elif arch == "phi":
        cls = transformers.PhiConfig
        kw = dict(hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                  num_key_value_heads=num_kv_heads or num_heads, intermediate_size=inter,
                  max_position_embeddings=max_positions, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0)
    elif arch == "stablelm":
        cls = transformers.StableLmConfig
        kw = dict(hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                  num_key_value_heads=num_kv_heads or num_heads, intermediate_size=inter,
                  max_position_embeddings=max_positions, hidden_dropout=0.0, attention_dropout=0.0)
    elif arch == "nemotron":  # (RoPE over half of each head by default, as Nemotron-4's)
        cls = transformers.NemotronConfig
        kw = dict(hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                  num_key_value_heads=num_kv_heads or max(1, num_heads // 2), head_dim=hidden_size // num_heads,
                  intermediate_size=inter, max_position_embeddings=max_positions)
    elif arch == "starcoder2":
        cls = transformers.Starcoder2Config
        kw = dict(hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                  num_key_value_heads=num_kv_heads or max(1, num_heads // 2), intermediate_size=inter,
                  max_position_embeddings=max_positions, residual_dropout=0.0, embedding_dropout=0.0,
                  attention_dropout=0.0)
    elif arch in ("cohere", "cohere2", "cohere2_moe"):
        cls = {"cohere": transformers.CohereConfig, "cohere2": transformers.Cohere2Config,
               "cohere2_moe": transformers.Cohere2MoeConfig}[arch]
        kw = dict(hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                  num_key_value_heads=num_kv_heads or max(1, num_heads // 2), intermediate_size=inter,
                  max_position_embeddings=max_positions, logit_scale=0.5)
        if arch == "cohere2_moe":  # a dense first layer (full attention, rotated), then a sliding and a full (NoPE)
            # layer with 4 experts (2 a token) and a shared one
            kw.update(head_dim=hidden_size // num_heads, intermediate_size=inter // 4,
                      prefix_dense_intermediate_size=inter, num_experts=4, num_experts_per_tok=2, num_shared_experts=1,
                      sliding_window=6, sliding_window_pattern=2, first_k_dense_replace=1)
    elif arch in ("olmo", "olmo2", "olmo3", "exaone4", "flex_olmo"):
        cls = {"olmo": transformers.OlmoConfig, "olmo2": transformers.Olmo2Config, "olmo3": transformers.Olmo3Config,
               "exaone4": transformers.Exaone4Config, "flex_olmo": transformers.FlexOlmoConfig}[arch]
        kw = dict(hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                  num_key_value_heads=num_kv_heads or max(1, num_heads // 2), intermediate_size=inter,
                  max_position_embeddings=max_positions)
        if arch == "flex_olmo":  # 4 experts of half the width, 2 a token
            kw.update(num_experts=4, num_experts_per_tok=2, intermediate_size=inter // 2)
    elif arch in ("glm", "glm4"):
        cls = transformers.GlmConfig if arch == "glm" else transformers.Glm4Config
        kw = dict(hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                  num_key_value_heads=num_kv_heads or max(1, num_heads // 2), intermediate_size=inter,
                  max_position_embeddings=max_positions, head_dim=hidden_size // num_heads)
    elif arch == "falcon":
        cls = transformers.FalconConfig
        kw = dict(hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                  num_kv_heads=num_kv_heads, ffn_hidden_size=inter,
                  max_position_embeddings=max_positions, hidden_dropout=0.0, attention_dropout=0.0)
    elif arch in ("gptj", "codegen"):
        cls = transformers.GPTJConfig if arch == "gptj" else transformers.CodeGenConfig
        kw = dict(n_embd=hidden_size, n_layer=num_layers, n_head=num_heads, n_positions=max_positions, n_inner=inter,
                  rotary_dim=hidden_size // num_heads // 2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    elif arch == "opt":
        cls = transformers.OPTConfig
        kw = dict(hidden_size=hidden_size, word_embed_proj_dim=hidden_size, num_hidden_layers=num_layers,
                  num_attention_heads=num_heads, ffn_dim=inter, max_position_embeddings=max_positions, dropout=0.0,
                  attention_dropout=0.0)
    elif arch == "xglm":
        cls = transformers.XGLMConfig
        kw = dict(d_model=hidden_size, num_layers=num_layers, attention_heads=num_heads, ffn_dim=inter,
                  max_position_embeddings=max_positions, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                  layerdrop=0.0)
    elif arch == "biogpt":
        cls = transformers.BioGptConfig
        kw = dict(hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                  intermediate_size=inter, max_position_embeddings=max_positions, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0, activation_dropout=0.0, layerdrop=0.0)
    elif arch in ("gpt2", "gpt-sw3", "gpt_bigcode"):  # (GPT-SW3 is GPT-2's model under its own type)
        cls = transformers.GPTBigCodeConfig if arch == "gpt_bigcode" else transformers.GPT2Config
        kw = dict(n_embd=hidden_size, n_layer=num_layers, n_head=num_heads, n_positions=max_positions, n_inner=inter,
                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0)
    elif arch == "gpt_neo":  # global and local layers in turn (the window as GPT-Neo's 256, unless overridden)
        cls = transformers.GPTNeoConfig
        kw = dict(hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads, intermediate_size=inter,
                  max_position_embeddings=max_positions, resid_dropout=0.0, embed_dropout=0.0, attention_dropout=0.0,
                  attention_types=[[["global", "local"], num_layers // 2]] + [[["global"], 1]] * (num_layers % 2))
    elif arch == "bloom":
        cls = transformers.BloomConfig
        kw = dict(hidden_size=hidden_size, n_layer=num_layers, n_head=num_heads)
    elif arch in ("qwen3_5_text", "qwen3_5_moe_text", "qwen3_next"):  # Gated DeltaNet layers (value heads twice
        # the key heads), a gated attention layer every full_attention_interval-th (default 4), RoPE over half of
        # each head (the M-RoPE sections of text); Qwen3.5-MoE, Qwen3-Next: 4 experts (2 a token) and a gated shared
        # expert (Qwen3-Next's linear layers in its fused per-key-head projections)
        cls = {"qwen3_5_text": transformers.Qwen3_5TextConfig, "qwen3_next": transformers.Qwen3NextConfig,
               "qwen3_5_moe_text": transformers.Qwen3_5MoeTextConfig}[arch]
        head_dim = hidden_size // num_heads
        if arch != "qwen3_5_text":
            overrides = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=inter // 8,
                             shared_expert_intermediate_size=inter // 8, **overrides)
        kw = dict(hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                  num_key_value_heads=num_kv_heads or max(1, num_heads // 2), head_dim=head_dim,
                  intermediate_size=inter, max_position_embeddings=max_positions, linear_num_key_heads=2,
                  linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=16,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                   "mrope_section": [head_dim // 4 - 2 * (head_dim // 12), head_dim // 12,
                                                     head_dim // 12], "mrope_interleaved": True})
    elif arch in ("qwen3_5", "qwen3_5_moe"):  # the multimodal checkpoint: the text model + a tiny vision tower
        text = _hf_config(f"{arch}_text", vocab_size=vocab_size, hidden_size=hidden_size, num_layers=num_layers,
                          num_heads=num_heads, num_kv_heads=num_kv_heads, intermediate_size=intermediate_size,
                          max_positions=max_positions, tie_word_embeddings=tie, **overrides)
        vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden_size,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
        cls = transformers.Qwen3_5MoeConfig if arch == "qwen3_5_moe" else transformers.Qwen3_5Config
        return cls(text_config=text.to_dict(), vision_config=vision,
                   image_token_id=vocab_size - 1, video_token_id=vocab_size - 2,
                   vision_start_token_id=vocab_size - 3, vision_end_token_id=vocab_size - 4, tie_word_embeddings=tie,
                   **ids)
    elif arch == "lfm2":  # gated short-convolution layers, attention layers at full_attn_idxs (default: the odd
        # ones), its MLP width adjusted to 2/3 and rounded up to a multiple of 32
        cls = transformers.Lfm2Config
        kw = dict(hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                  num_key_value_heads=num_kv_heads or max(1, num_heads // 2), intermediate_size=inter,
                  max_position_embeddings=max_positions, block_multiple_of=32,
                  full_attn_idxs=[i for i in range(num_layers) if i % 2])
    elif arch == "falcon_h1":  # every layer a Mamba-2 mixer (8 heads of 16, 2 groups, 16 states, 16-token chunks, the
        # output norm after the gate) beside GQA attention; muP multipliers everywhere, none of them 1
        cls = transformers.FalconH1Config
        kw = dict(hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                  num_key_value_heads=num_kv_heads or max(1, num_heads // 2), intermediate_size=inter,
                  max_position_embeddings=max_positions, mamba_d_ssm=128, mamba_n_heads=8, mamba_d_head=16,
                  mamba_n_groups=2, mamba_d_state=16, mamba_d_conv=4, mamba_chunk_size=16, mamba_rms_norm=True,
                  mamba_norm_before_gate=False, embedding_multiplier=3.0, lm_head_multiplier=0.5,
                  mlp_multipliers=[0.8, 1.3], key_multiplier=0.7, attention_in_multiplier=1.2,
                  attention_out_multiplier=0.9, ssm_multipliers=[0.9, 1.1, 0.8, 1.2, 0.7], ssm_in_multiplier=1.4,
                  ssm_out_multiplier=0.6)
    elif arch == "olmo_hybrid":  # Gated DeltaNet layers (2 key heads of 16, 4 value heads of 16) with an OLMo 3
        # attention layer every second layer (RoPE unless the overrides drop rope_parameters)
        cls = transformers.OlmoHybridConfig
        kw = dict(hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                  num_key_value_heads=num_kv_heads or max(1, num_heads // 2), intermediate_size=inter,
                  max_position_embeddings=max_positions, linear_num_key_heads=2, linear_num_value_heads=4,
                  linear_key_head_dim=16, linear_value_head_dim=16,
                  layer_types=["full_attention" if i % 2 else "linear_attention" for i in range(num_layers)])
    elif arch == "lfm2_moe":  # LFM2's layers, a dense first layer, then 4 experts (2 a token) by sigmoid score +
        # correction bias, renormalised and scaled
        cls = transformers.Lfm2MoeConfig
        kw = dict(hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                  num_key_value_heads=num_kv_heads or max(1, num_heads // 2), intermediate_size=inter,
                  moe_intermediate_size=inter // 8, num_dense_layers=1, num_experts=4, num_experts_per_tok=2,
                  routed_scaling_factor=2.0, max_position_embeddings=max_positions,
                  layer_types=["full_attention" if i % 2 else "conv" for i in range(num_layers)])
    elif arch in ("lfm2_vl", "lfm3_vl"):  # multimodal: LFM2's (LFM3's) text + a tiny vision tower the engine leaves out
        text = _hf_config(arch.removesuffix("_vl"), vocab_size=vocab_size, hidden_size=hidden_size,
                          num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads,
                          intermediate_size=intermediate_size, max_positions=max_positions, tie_word_embeddings=tie,
                          **overrides)
        if arch == "lfm2_vl":
            vision = dict(model_type="siglip2_vision_model", hidden_size=32, intermediate_size=64,
                          num_hidden_layers=1, num_attention_heads=2, num_patches=16, patch_size=4)
            return transformers.Lfm2VlConfig(text_config=text.to_dict(), vision_config=vision,
                                             image_token_id=vocab_size - 1, projector_hidden_size=32,
                                             tie_word_embeddings=tie, **ids)
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, patch_size=4)
        return transformers.Lfm3VlConfig(text_config=text.to_dict(), vision_config=vision,
                                         image_token_id=vocab_size - 1, video_token_id=vocab_size - 2,
                                         vision_start_token_id=vocab_size - 3, vision_end_token_id=vocab_size - 4,
                                         projector_hidden_size=32, tie_word_embeddings=tie, **ids)
    elif arch == "lfm3":  # LFM2's convolutions (7 taps) with sliding-window (6 tokens) and full-attention layers in
        # turn, heads 24 wide (not hidden / heads), the full-attention RoPE proportional over half of each head, gated
        # heads, sandwich norms
        cls = transformers.Lfm3Config
        kinds = ("conv", "sliding_attention", "full_attention")
        kw = dict(hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                  num_key_value_heads=num_kv_heads or max(1, num_heads // 2), intermediate_size=inter, head_dim=24,
                  max_position_embeddings=max_positions, sliding_window=6,
                  layer_types=[kinds[i % 3] for i in range(num_layers)])
    elif arch == "granitemoehybrid":  # Mamba-2 layers (8 heads of 16, 2 groups, 16 states; 16-token scan chunks)
        # with an attention layer every second layer (RoPE), Granite's multipliers, 4 experts (2 a token) beside a
        # shared MLP
        cls = transformers.GraniteMoeHybridConfig
        kw = dict(hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                  num_key_value_heads=num_kv_heads or max(1, num_heads // 2), intermediate_size=inter // 4,
                  shared_intermediate_size=inter // 4, num_local_experts=4, num_experts_per_tok=2,
                  max_position_embeddings=max_positions, position_embedding_type="rope",
                  layer_types=["attention" if i % 2 else "mamba" for i in range(num_layers)], mamba_n_heads=8,
                  mamba_n_groups=2, mamba_d_state=16, mamba_d_conv=4, mamba_chunk_size=16, mamba_expand=2,
                  embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.3, logits_scaling=2.0)
    elif arch == "bamba":  # Granite 4.0's Mamba-2 layers with attention layers (RoPE over half of each head) at
        # attn_layer_indices (the odd ones), a SwiGLU MLP
        cls = transformers.BambaConfig
        kw = dict(hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                  num_key_value_heads=num_kv_heads or max(1, num_heads // 2), intermediate_size=inter,
                  max_position_embeddings=max_positions, attn_layer_indices=[i for i in range(num_layers) if i % 2],
                  mamba_n_heads=8, mamba_n_groups=2, mamba_d_state=16, mamba_d_conv=4, mamba_chunk_size=16,
                  mamba_expand=2)
    elif arch == "nemotron_h":  # one mixer a layer: Mamba-2 (8 heads of 16, 2 groups, 16 states, 16-token chunks),
        # NoPE attention, squared-ReLU MLP, squared-ReLU experts (4, 2 a token, 2 groups) beside a shared expert; the
        # pattern cycles M * - E (hybrid_override_pattern's letters)
        cls = transformers.NemotronHConfig
        cycle = ["mamba", "attention", "mlp", "moe"]
        kw = dict(hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                  num_key_value_heads=num_kv_heads or max(1, num_heads // 2), head_dim=hidden_size // num_heads,
                  intermediate_size=inter, max_position_embeddings=max_positions,
                  layers_block_type=[cycle[i % 4] for i in range(num_layers)], mamba_num_heads=8, mamba_head_dim=16,
                  n_groups=2, ssm_state_size=16, conv_kernel=4, chunk_size=16, n_routed_experts=4,
                  num_experts_per_tok=2, n_group=2, topk_group=1, moe_intermediate_size=inter // 8,
                  moe_shared_expert_intermediate_size=inter // 8, routed_scaling_factor=2.0)
    elif arch in ("mamba", "falcon_mamba"):  # Mamba-1 mixers (inner width 2 x hidden, 16 states, rank-4 time steps)
        # in every layer, no attention (Falcon-Mamba: gainless RMSNorms on dt, B and C)
        cls = transformers.MambaConfig if arch == "mamba" else transformers.FalconMambaConfig
        kw = dict(hidden_size=hidden_size, num_hidden_layers=num_layers, state_size=16, expand=2, conv_kernel=4)
    elif arch == "mamba2":  # Mamba-2 mixers (8 heads of 16, 2 groups, 16 states, 16-token chunks) in every layer
        cls = transformers.Mamba2Config
        kw = dict(hidden_size=hidden_size, num_hidden_layers=num_layers, num_heads=8, head_dim=2 * hidden_size // 8,
                  n_groups=2, state_size=16, conv_kernel=4, chunk_size=16, expand=2)
    elif arch == "jamba":  # Mamba-1 layers (16 states) with NoPE attention every third layer (from the second),
        # SwiGLU MLPs and 4 experts (2 a token) in every second layer (from the second)
        cls = transformers.JambaConfig
        kw = dict(hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                  num_key_value_heads=num_kv_heads or max(1, num_heads // 2), intermediate_size=inter // 2,
                  max_position_embeddings=max_positions, attn_layer_period=3, attn_layer_offset=1,
                  expert_layer_period=2, expert_layer_offset=1, num_experts=4, num_experts_per_tok=2,
                  mamba_d_state=16, mamba_d_conv=4, mamba_expand=2)
    elif arch == "laguna":  # a query head count per layer, softplus-gated heads, a sliding layer (full RoPE) and full
        # ones (RoPE over half of each head); a dense first layer, then 4 experts (2 a token) and a shared one
        cls = transformers.LagunaConfig
        kv_heads = num_kv_heads or max(1, num_heads // 2)
        kw = dict(hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                  num_key_value_heads=kv_heads, head_dim=hidden_size // num_heads, intermediate_size=inter,
                  max_position_embeddings=max_positions, sliding_window=6, num_experts=4, num_experts_per_tok=2,
                  moe_intermediate_size=inter // 8, shared_expert_intermediate_size=inter // 8,
                  num_attention_heads_per_layer=[num_heads if i % 2 else num_heads // 2 for i in range(num_layers)],
                  layer_types=["full_attention" if i % 2 else "sliding_attention" for i in range(num_layers)])
    elif arch == "mimo_v2_flash":  # full-attention and sliding-window (6 tokens) layers in turn, the sliding ones
        # with twice the K/V heads and attention sinks; heads 24 wide (RoPE over a third), values 16 wide and scaled;
        # a dense first layer, then 4 experts (2 a token, from the best of 2 groups), scaled, no shared expert
        cls = transformers.MiMoV2FlashConfig
        kw = dict(hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                  num_key_value_heads=num_kv_heads or max(1, num_heads // 4), head_dim=24, v_head_dim=16,
                  intermediate_size=inter, max_position_embeddings=max_positions, sliding_window=6,
                  layer_types=["full_attention" if i % 2 == 0 else "sliding_attention" for i in range(num_layers)],
                  n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1, moe_intermediate_size=inter // 8,
                  routed_scaling_factor=2.0)
    elif arch == "kimi_linear":  # Kimi Delta Attention layers (2 heads of 16, 4-tap convolutions) around a latent-
        # attention layer without RoPE (DeepSeek-V3's tiny shapes, a plain q_proj); a dense first layer, then 8
        # experts (2 a token, from the best of 2 groups) and a shared one
        cls = transformers.KimiLinearConfig
        kw = dict(hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                  num_key_value_heads=num_heads, intermediate_size=inter, max_position_embeddings=max_positions,
                  q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
                  linear_num_heads=2, linear_head_dim=16, linear_conv_kernel_dim=4, num_local_experts=8,
                  num_experts_per_tok=2, n_group=2, topk_group=1, moe_intermediate_size=inter // 8,
                  n_shared_experts=1, routed_scaling_factor=2.0,
                  layer_types=["full_attention" if i % 3 == 1 else "linear_attention" for i in range(num_layers)],
                  mlp_layer_types=["dense"] + ["sparse"] * (num_layers - 1))
    elif arch == "longcat_flash":  # layers of two latent-attention sublayers (DeepSeek-V3's tiny shapes above, the
        # LoRA scales), each with a dense MLP, and a shortcut MoE: 4 experts and 2 zero-computation ones (2 a token)
        cls = transformers.LongcatFlashConfig
        kw = dict(hidden_size=hidden_size, num_layers=num_layers, num_attention_heads=num_heads,
                  ffn_hidden_size=inter // 2, max_position_embeddings=max_positions, q_lora_rank=32, kv_lora_rank=16,
                  qk_nope_head_dim=16, qk_rope_head_dim=8, head_dim=8, v_head_dim=12, n_routed_experts=4,
                  zero_expert_num=2, moe_topk=2, expert_ffn_hidden_size=inter // 8, routed_scaling_factor=2.0)
    elif arch == "persimmon":  # (RoPE over half of each head, q/k LayerNorms, squared ReLU)
        cls = transformers.PersimmonConfig
        kw = dict(hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                  intermediate_size=inter, max_position_embeddings=max_positions, qk_layernorm=True)
    elif arch == "dbrx":  # 4 experts (2 a token) in every layer, GQA, q/k/v clamped
        cls = transformers.DbrxConfig
        kw = dict(d_model=hidden_size, n_heads=num_heads, n_layers=num_layers, max_seq_len=max_positions,
                  attn_config={"kv_n_heads": num_kv_heads or max(1, num_heads // 2), "clip_qkv": 0.5,
                               "rope_theta": 10000.0},
                  ffn_config={"ffn_hidden_size": inter // 2, "moe_num_experts": 4, "moe_top_k": 2})
    elif arch == "nanochat":  # (gainless norms, q/k L2 norms after RoPE, squared ReLU, soft-capped logits)
        cls = transformers.NanoChatConfig
        kw = dict(hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                  num_key_value_heads=num_kv_heads or max(1, num_heads // 2), intermediate_size=inter,
                  max_position_embeddings=max_positions, final_logit_softcapping=5.0)
    elif arch == "mpt":  # (ALiBi positions; max_seq_len the context)
        cls = transformers.MptConfig
        kw = dict(d_model=hidden_size, n_layers=num_layers, n_heads=num_heads, max_seq_len=max_positions)
    else:
        raise ValueError(f"unknown tiny arch {arch!r}; expected one of {SUPPORTED_TINY_ARCHS}")
    return cls(vocab_size=vocab_size, tie_word_embeddings=tie, **ids, **{**kw, **overrides})


def gain_offset(norm: torch.nn.Module) -> float:
    """What a norm adds to its weight to get its gain: 1 for Gemma's and Nemotron's (1 + w), else 0."""
    name = type(norm).__name__.lower()
    zero_centered = ("qwen3_5rmsnorm", "qwen3_5moermsnorm", "qwen3nextrmsnorm")  # (1 + w), not their gated norms
    return 1.0 if (("gemma" in name and not name.startswith("gemma4")) or name.endswith("layernorm1p")
                   or name in zero_centered) else 0.0


@torch.no_grad()
def _reinit_(model: torch.nn.Module, seed: int, logit_std: float = 2.0) -> None:
    """Re-draw every parameter at a scale that gives tiny models well-separated, non-repetitive greedy logits."""
    from transformers.pytorch_utils import Conv1D

    gen = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if "norm" in type(m).__name__.lower()]
    final_norm = norms[-1] if norms else None
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    text_config = getattr(model.config, "text_config", None) or model.config  # a multimodal model's language model
    final_std = logit_std / math.sqrt(text_config.hidden_size) if tied else logit_std
    seen: set[int] = set()

    def draw(p: torch.Tensor, std: float, mean: float = 0.0) -> None:
        p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * std + mean)

    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if isinstance(module, torch.nn.Embedding):
                # +-1 entries: every token has the same per-channel energy, so no "hub" token wins under a tied head
                p.copy_(torch.randint(0, 2, p.shape, generator=gen).to(p.dtype) * 2 - 1)
            elif module is final_norm:
                # zero-mean gain: with tied embeddings e.(g*e) would otherwise make the current token the argmax
                draw(p, final_std if name == "weight" else 0.02)
                if name == "weight":
                    p.sub_(p.mean() + gain_offset(module))
            elif any(module is m for m in norms):
                draw(p, 0.1, 1.0 - gain_offset(module) if name == "weight" else 0.0)
            elif name in ("sinks", "softmax_offset"):  # attention sinks (gpt-oss's, Flint's, ...): large enough to
                # matter
                draw(p, 1.0)
            elif type(module).__name__ == "Gemma4TextRouter":  # its input's and its experts' scales, about 1
                draw(p, 0.1, 1.0)
            elif name in ("A_log", "dt_bias"):  # a Gated DeltaNet's decay exp(-exp(A_log) softplus(a + dt_bias)):
                # ~0.99 a token, so its state remembers tokens far back (a lost or stale state shows)
                draw(p, 0.3, -3.0 if name == "A_log" else -2.0)
            elif p.dim() == 1 or name.endswith("_bias"):  # (gpt-oss's stacked expert biases are [E, out])
                draw(p, 0.02)
            else:
                fan_in = p.shape[0] if isinstance(module, Conv1D) else p.shape[-1] if p.dim() == 3 else p[0].numel()
                if type(module).__name__ == "GptOssExperts":  # stacked [E, in, out]
                    fan_in = p.shape[1]
                draw(p, 1.0 / math.sqrt(fan_in))
    for name, buffer in model.named_buffers():  # a sigmoid router's stored score-correction bias (GLM-4.5's),
        if name.endswith(("e_score_correction_bias", "feed_forward.expert_bias")):  # (and LFM2-MoE's); Gemma 4's
            # per-layer output scales
            draw(buffer, 0.1)
        elif name.endswith("layer_scalar"):
            draw(buffer, 0.2, 1.0)


def _uninitialised_model(config: Any, multimodal: bool = False) -> torch.nn.Module:
    """The model with its parameters left as allocated, tied as `config` says: `_reinit_` draws every one of them,
    and HF's own init (half a minute for a 1B model on a CPU) would only be overwritten. `multimodal`: the image-text
    model, where transformers also registers a causal LM for the config (Llama 4's, saved as the Hub holds it)."""
    from .hf_auto import hf_causal_lm_class

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights
    with torch.random.fork_rng(devices=[]), no_init_weights():  # nor may HF touch the caller's global RNG
        if multimodal:
            from transformers import AutoModelForImageTextToText

            model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
        else:
            model = hf_causal_lm_class(config).from_config(config, dtype=torch.float32)
    model.tie_weights()  # skipped with the init
    if getattr(config, "tie_word_embeddings", False):
        head, embed = model.get_output_embeddings(), model.get_input_embeddings()
        if head is not None and head.weight is not embed.weight:
            raise RuntimeError("tie_weights() did not tie the LM head to the embeddings")
    return model


def build_tiny_checkpoint(arch: str, out_dir: str | Path, *, dtype: torch.dtype = torch.float32, seed: int = 0,
                          vocab_size: int = 512, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                          num_kv_heads: int | None = None, intermediate_size: int | None = None,
                          max_positions: int = 256, tie_word_embeddings: bool | None = None,
                          with_tokenizer: bool = True, shard_size: str | None = None,
                          **config_overrides: Any) -> Path:
    """Save a tiny `arch` causal LM with seed-determined random weights (+ tokenizer) as safetensors in `out_dir`."""
    out_dir = Path(out_dir)
    config = _hf_config(arch, vocab_size=vocab_size, hidden_size=hidden_size, num_layers=num_layers,
                        num_heads=num_heads, num_kv_heads=num_kv_heads, intermediate_size=intermediate_size,
                        max_positions=max_positions, tie_word_embeddings=tie_word_embeddings, **config_overrides)
    model = _uninitialised_model(config, multimodal=arch == "llama4")
    _reinit_(model, seed)
    if arch == "youtu":  # transformers zeroes Youtu's padding row whenever it loads one (its _init_weights)
        with torch.no_grad():
            model.get_input_embeddings().weight[config.pad_token_id] = 0
    model = model.to(dtype).eval()
    with _quiet():
        if arch == "qwen3_vl_moe":  # (transformers 5.23's save_pretrained fails on its experts)
            _save_with_experts_transposed(model, out_dir)
        elif shard_size:
            model.save_pretrained(out_dir, max_shard_size=shard_size)
        else:
            model.save_pretrained(out_dir)
    if arch == "gpt-sw3":  # (transformers reads it with GPT-2's config and model classes)
        import json

        saved = json.loads((out_dir / "config.json").read_text())
        (out_dir / "config.json").write_text(json.dumps({**saved, "model_type": "gpt-sw3"}, indent=2))
    if with_tokenizer:
        build_tokenizer(out_dir, vocab_size)
    return out_dir


def _save_with_experts_transposed(model: torch.nn.Module, out_dir: Path) -> None:
    """Save as Qwen3-VL-MoE's Hub checkpoints are laid out: the stacked experts transposed ([E, H, 2F], [E, F, H]),
    which transformers transposes back on load."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(out_dir)
    model.generation_config.save_pretrained(out_dir)
    state = {name: (t.transpose(1, 2) if name.endswith(("experts.gate_up_proj", "experts.down_proj")) else t)
             for name, t in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file({name: t.contiguous().clone() for name, t in state.items()}, out_dir / "model.safetensors",
              metadata={"format": "pt"})


# what openai/gpt-oss-20b's config.json says of its MXFP4 experts
GPT_OSS_MXFP4_CONFIG = {"quant_method": "mxfp4", "modules_to_not_convert": [
    "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}


def _rewrite_weights(model_dir: str | Path, out_dir: str | Path, rewrite: Any,
                     quantization_config: dict[str, Any]) -> Path:
    """A copy of a single-file checkpoint whose entries `rewrite(key, tensor)` maps to new entries (a dict; None:
    kept as they are), with `quantization_config` in its config."""
    import json
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    shutil.copytree(model_dir, out_dir)
    state = {}
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        for key in f.keys():
            tensor = f.get_tensor(key)
            state.update(rewrite(key, tensor) or {key: tensor})
    save_file(state, out_dir / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out_dir / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    return out_dir


def quantize_checkpoint_mxfp4(model_dir: str | Path, out_dir: str | Path) -> Path:
    """A copy of a gpt-oss checkpoint (`build_tiny_checkpoint("gpt_oss", ...)`) with its experts' weights in MXFP4,
    as openai/gpt-oss-20b / 120b ship them: `*.experts.gate_up_proj_blocks` / `_scales` and `down_proj_blocks` /
    `_scales` in place of the stacked weights (biases kept), and the config's `quantization_config`."""
    from .mxfp4 import quantize_mxfp4

    def rewrite(key: str, tensor: torch.Tensor) -> dict[str, torch.Tensor] | None:
        if not key.endswith(("experts.gate_up_proj", "experts.down_proj")):
            return None
        blocks, scales = quantize_mxfp4(tensor)
        return {key + "_blocks": blocks, key + "_scales": scales}

    return _rewrite_weights(model_dir, out_dir, rewrite, GPT_OSS_MXFP4_CONFIG)


def quantize_checkpoint_fp8(model_dir: str | Path, out_dir: str | Path, block: tuple[int, int] = (128, 128)) -> Path:
    """A copy of a checkpoint with its decoder layers' projection weights in block-wise FP8, as DeepSeek-V3's and the
    Qwen3 / GLM FP8 releases ship them: `<name>.weight` in float8_e4m3fn beside `<name>.weight_scale_inv`, and
    `quantization_config` {"quant_method": "fp8", "weight_block_size": block}. Norms, routers, embeddings and the
    LM head stay as they are."""
    from .fp8 import quantize_fp8

    def rewrite(key: str, tensor: torch.Tensor) -> dict[str, torch.Tensor] | None:
        if not (".layers." in key and key.endswith("proj.weight") and tensor.dim() == 2 and "norm" not in key):
            return None
        weight, scale_inv = quantize_fp8(tensor, block)
        return {key: weight, key + "_scale_inv": scale_inv}

    return _rewrite_weights(model_dir, out_dir, rewrite, {"quant_method": "fp8", "activation_scheme": "dynamic",
                                                          "fmt": "e4m3", "weight_block_size": list(block)})


def build_prompt_tuning_adapter(model_dir: str | Path, out_dir: str | Path, *, num_virtual_tokens: int = 8,
                                init: str = "random", init_text: str | None = None, seed: int = 0,
                                scale: float = 1.0) -> Path:
    """Create and save a PEFT prompt-tuning adapter for `model_dir` the way a user would."""
    from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model

    from .hf_auto import load_hf_causal_lm, peft_shape_fields, peft_token_dim

    if init not in ("random", "text"):
        raise ValueError(f"init must be 'random' or 'text', got {init!r}")
    out_dir = Path(out_dir)
    with _quiet():
        model = load_hf_causal_lm(model_dir)
    cfg = PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        num_virtual_tokens=num_virtual_tokens,
        prompt_tuning_init=PromptTuningInit.RANDOM if init == "random" else PromptTuningInit.TEXT,
        prompt_tuning_init_text=(init_text or "the cat sat on the mat") if init == "text" else None,
        tokenizer_name_or_path=str(model_dir),
        token_dim=peft_token_dim(model),
        **peft_shape_fields(model),
    )
    with _quiet():
        peft_model = get_peft_model(model, cfg)
        if init == "random":
            weight = peft_model.prompt_encoder["default"].embedding.weight
            with torch.no_grad():
                weight.copy_(build_prompt_tensor(weight.shape[1], weight.shape[0], seed=seed, scale=scale))
        peft_model.save_pretrained(out_dir)
    return out_dir


def build_p_tuning_adapter(model_dir: str | Path, out_dir: str | Path, *, num_virtual_tokens: int = 8,
                           encoder: str = "MLP", seed: int = 0) -> Path:
    """Create and save a PEFT P-tuning adapter (`PromptEncoderConfig`) with a seed-determined random prompt
    encoder: PEFT saves the encoder's output rows, which inference prepends like a soft prompt's."""
    from peft import PromptEncoderConfig, TaskType, get_peft_model

    from .hf_auto import load_hf_causal_lm, peft_shape_fields

    with _quiet():
        model = load_hf_causal_lm(model_dir)
    cfg = PromptEncoderConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=num_virtual_tokens,
                              encoder_hidden_size=32, encoder_reparameterization_type=encoder,
                              **peft_shape_fields(model))
    with _quiet():
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, cfg)
        peft_model.save_pretrained(Path(out_dir))
    return Path(out_dir)


def build_prefix_tuning_adapter(model_dir: str | Path, out_dir: str | Path, *, num_virtual_tokens: int = 8,
                                projection: bool = False, seed: int = 0) -> Path:
    """Create and save a PEFT prefix-tuning adapter (`PrefixTuningConfig`: every layer's K/V of the virtual
    tokens) with seed-determined random weights; `projection` trains through PEFT's prefix MLP, whose output
    PEFT saves."""
    from peft import PrefixTuningConfig, TaskType, get_peft_model

    from .hf_auto import load_hf_causal_lm, peft_shape_fields

    with _quiet():
        model = load_hf_causal_lm(model_dir)
    cfg = PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=num_virtual_tokens,
                             prefix_projection=projection, encoder_hidden_size=32, **peft_shape_fields(model))
    with _quiet():
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, cfg)
        peft_model.save_pretrained(Path(out_dir))
    return Path(out_dir)


def build_multitask_prompt_tuning_adapter(model_dir: str | Path, out_dir: str | Path, *, num_virtual_tokens: int = 8,
                                          num_tasks: int = 3, num_ranks: int = 1, seed: int = 0) -> Path:
    """Create and save a PEFT multitask prompt-tuning adapter (`MultitaskPromptTuningConfig`): shared rows and, per
    task, a rank-`num_ranks` matrix that scales them; seed-determined, with tasks that differ clearly."""
    from peft import MultitaskPromptTuningConfig, TaskType, get_peft_model

    from .hf_auto import load_hf_causal_lm, peft_shape_fields

    with _quiet():
        model = load_hf_causal_lm(model_dir)
    cfg = MultitaskPromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=num_virtual_tokens,
                                      num_tasks=num_tasks, num_ranks=num_ranks, **peft_shape_fields(model))
    gen = torch.Generator().manual_seed(seed)
    with _quiet():
        peft_model = get_peft_model(model, cfg)
        encoder = peft_model.prompt_encoder["default"]
        with torch.no_grad():
            weight = encoder.embedding.weight
            weight.copy_(build_prompt_tensor(weight.shape[1], weight.shape[0], seed=seed))
            for param in (encoder.prefix_task_cols, encoder.prefix_task_rows):
                param.copy_(1 + 0.5 * torch.randn(param.shape, generator=gen))
        peft_model.save_pretrained(Path(out_dir))
    return Path(out_dir)


def build_cpt_adapter(model_dir: str | Path, out_dir: str | Path, *, token_ids: Sequence[int] = (5, 6, 7, 8, 9),
                      seed: int = 0) -> Path:
    """Create and save a PEFT context-aware prompt tuning adapter (`CPTConfig`) over the context `token_ids`,
    with a seed-determined random delta (PEFT saves the token embeddings plus the delta after its projection)."""
    from peft import CPTConfig, TaskType, get_peft_model

    from .hf_auto import load_hf_causal_lm

    ids = list(token_ids)
    types = [1] + [2] * (len(ids) - 2) + [3] if len(ids) > 1 else [2]  # template, inputs..., output template
    # (CPTConfig resets num_attention_heads / num_layers: PEFT cannot build one where it cannot read them, XGLM's)
    cfg = CPTConfig(task_type=TaskType.CAUSAL_LM, cpt_token_ids=ids, cpt_mask=[1] * len(ids),
                    cpt_tokens_type_mask=types)
    gen = torch.Generator().manual_seed(seed)
    with _quiet():
        peft_model = get_peft_model(load_hf_causal_lm(model_dir), cfg)
        delta = peft_model.prompt_encoder["default"].delta_embedding.weight
        with torch.no_grad():
            delta.copy_(torch.randn(delta.shape, generator=gen))
        peft_model.save_pretrained(Path(out_dir))
    return Path(out_dir)


def build_cartridge_adapter(model_dir: str | Path, out_dir: str | Path, *, num_virtual_tokens: int = 8,
                            num_frozen_tokens: int = 1, seed: int = 0) -> Path:
    """Create and save a PEFT cartridge (`CartridgeConfig`: a trained prefix K/V cache, prefix tuning's layout)
    with seed-determined random K/V."""
    from peft import CartridgeConfig, TaskType, get_peft_model

    from .hf_auto import load_hf_causal_lm, peft_shape_fields

    with _quiet():
        model = load_hf_causal_lm(model_dir)
    cfg = CartridgeConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=num_virtual_tokens,
                          num_frozen_tokens=num_frozen_tokens, **peft_shape_fields(model))
    with _quiet():
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, cfg)
        peft_model.save_pretrained(Path(out_dir))
    return Path(out_dir)


def build_prompt_tensor(hidden_size: int, num_virtual_tokens: int, *, seed: int = 0, scale: float = 1.0,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A deterministic random [num_virtual_tokens, hidden_size] soft prompt."""
    gen = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(num_virtual_tokens, hidden_size, generator=gen)).to(dtype)


def tiny_model_with_adapters(tmp_dir: str | Path, arch: str = "llama", num_adapters: int = 2, *,
                             num_virtual_tokens: int | Sequence[int] = 8, init: str = "random", seed: int = 0,
                             **checkpoint_options: Any) -> tuple[Path, dict[str, Path]]:
    """A tiny random `arch` checkpoint (with tokenizer) in `tmp_dir/arch` and `num_adapters` PEFT prompt-tuning
    adapters for it in `tmp_dir/arch-adapters/task<i>`. Returns (model_dir, {"task0": adapter_dir, ...}).

    `arch` is one of SUPPORTED_TINY_ARCHS; `checkpoint_options` go to build_tiny_checkpoint (e.g. rope_parameters,
    attention_bias). `num_virtual_tokens` is one length for all adapters or one per adapter.
    """
    tmp_dir = Path(tmp_dir)
    lengths = [num_virtual_tokens] * num_adapters if isinstance(num_virtual_tokens, int) else list(num_virtual_tokens)
    if len(lengths) != num_adapters:
        raise ValueError(f"num_virtual_tokens gives {len(lengths)} lengths for {num_adapters} adapters")
    model_dir = build_tiny_checkpoint(arch, tmp_dir / arch, seed=seed, **checkpoint_options)
    adapters = {
        f"task{i}": build_prompt_tuning_adapter(model_dir, tmp_dir / f"{arch}-adapters" / f"task{i}",
                                                num_virtual_tokens=n, init=init, seed=seed + i)
        for i, n in enumerate(lengths)
    }
    return model_dir, adapters


def hf_peft_reference(model_dir: str | Path, adapters: dict[str, str | Path], dtype: torch.dtype = torch.float32,
                      device: str | torch.device = "cpu"):
    """HF transformers + PEFT (one adapter per task name) as the `reference` of assert_generation_matches."""
    from .verify import HFPeftOracle

    return HFPeftOracle(model_dir, {k: Path(v) for k, v in adapters.items()}, dtype, torch.device(device))


def assert_generation_matches(engine: Any, reference: Any, requests: Sequence[Any], dtype: torch.dtype | None = None,
                              tolerance: Any = None, batch: bool = True) -> Any:
    """Assert that `engine` gives `reference`'s greedy tokens and logits for `requests`, alone and in one batch.

    `reference`: another Engine (e.g. backend="reference") with the same prompt names, or `hf_peft_reference(...)`.
    `requests`: greedy `softprompt.Request`s (text or ids; max_new_tokens from their sampling params).
    Tolerances are `softprompt verify`'s defaults for `dtype` (default: the engine's), or a given
    `softprompt.engine.verify.Tolerance`. Raises AssertionError listing every broken tolerance; returns the
    detailed result (a `softprompt.engine.verify.BackendResult`) otherwise.
    """
    from .verify import DEFAULT_TOLERANCES, VerifyRequest, _EngineOracle, _oracle_outputs, run_backend

    verify_requests = []
    for request in requests:
        prepared = engine.prepare(request)
        if not prepared.params.greedy:
            raise ValueError("assert_generation_matches compares greedy generation: use temperature=0 requests")
        verify_requests.append(VerifyRequest(request.prompt, prepared.input_ids, prepared.params.max_new_tokens))
    oracle = _EngineOracle(reference) if hasattr(reference, "prefix_cache") else reference
    expected = _oracle_outputs(oracle, verify_requests)
    tol = tolerance or DEFAULT_TOLERANCES[dtype or engine.dtype]
    modes = ("single", "batch") if batch else ("single",)
    result = run_backend(engine, engine.backend, verify_requests, expected, tol, modes=modes)
    if result.failures:
        raise AssertionError(f"{engine.backend} does not match the reference:\n  " + "\n  ".join(result.failures))
    return result
