"""Session-wide tiny checkpoints (one per architecture), tokenizers and PEFT adapters, built on the fly."""

from __future__ import annotations

import gc
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # no test reaches the Hub: a Hub id resolves from a local cache or fails fast

import huggingface_hub.constants  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from softprompt.testing import build_prompt_tuning_adapter, build_tiny_checkpoint, build_tokenizer  # noqa: E402

huggingface_hub.constants.HF_HUB_OFFLINE = True  # where huggingface_hub was imported before this file
torch.set_num_threads(min(2, os.cpu_count() or 1))
RSS_LIMIT_BYTES = 4 << 30


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


@pytest.fixture(autouse=True)
def _collect_dropped_engines():
    """An engine a test drops sits in reference cycles (callbacks holding it) until a full garbage collection, with
    its zero-filled KV pool (up to 1 GiB on the CPU) still resident: past a few GiB, collect after the test."""
    yield
    if _rss_bytes() > RSS_LIMIT_BYTES:
        gc.collect()


# name -> (arch, build options); several Llama-family variants cover the options users' checkpoints use.
MODEL_VARIANTS: dict[str, tuple[str, dict]] = {
    "llama": ("llama", {}),
    "llama3_rope": ("llama", {"rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 32}}),
    "llama_bias_tied": ("llama", {"attention_bias": True, "mlp_bias": True, "tie_word_embeddings": True}),
    "mistral": ("mistral", {}),
    "qwen2": ("qwen2", {}),
    "gpt2": ("gpt2", {}),
    "bloom": ("bloom", {}),
    "bloom_post_norm": ("bloom", {"apply_residual_connection_post_layernorm": True}),
    "qwen3": ("qwen3", {}),  # new variants go last: each variant's seed is its index
    "phi3": ("phi3", {}),  # fused qkv_proj / gate_up_proj weights
    # Phi-4-mini's options: RoPE over 3/4 of each head (not fused into the triton kernels), longrope (capped at its
    # original 128 positions), tied embeddings
    "phi3_longrope": ("phi3", {"rope_parameters": {
        "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
        "short_factor": [1.0, 1.1, 1.3, 1.7, 2.0, 2.5], "long_factor": [1.0, 2.0, 4.0, 8.0, 9.0, 12.0],
        "original_max_position_embeddings": 128}, "original_max_position_embeddings": 128,
        "tie_word_embeddings": True}),
    # sliding windows shorter than the tests' sequences: every layer (Mistral), or the layers past the first (Qwen2)
    "mistral_window": ("mistral", {"sliding_window": 6}),
    "qwen2_window": ("qwen2", {"use_sliding_window": True, "sliding_window": 7, "max_window_layers": 1}),
    "gemma": ("gemma", {}),  # token embeddings scaled by sqrt(hidden), (1 + w) norm gains, GeGLU
    # + q/k norms, sandwich norms, two sliding-window layers (own RoPE base) before a global one, softcapped logits
    "gemma3": ("gemma3_text", {"num_layers": 3, "sliding_window": 6, "final_logit_softcapping": 5.0}),
    # sliding and global layers in turn, attention scores and logits softcapped (caps low enough to bite)
    "gemma2": ("gemma2", {"num_layers": 3, "sliding_window": 6, "attn_logit_softcapping": 1.0,
                          "final_logit_softcapping": 5.0}),
    # a multimodal Gemma 3 checkpoint (Gemma3ForConditionalGeneration, as the 4B+ models): its language model only
    "gemma3_multimodal": ("gemma3", {"num_layers": 3, "sliding_window": 6}),
    # GPT-NeoX: Pythia's parallel residual and RoPE over a quarter of each head; then serial, full RoPE, tied head
    "pythia": ("gpt_neox", {}),
    "gpt_neox_serial": ("gpt_neox", {"use_parallel_residual": False, "tie_word_embeddings": True, "rope_parameters": {
        "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0}}),
    # Ministral: sliding-window layers named by layer_types; SmolLM3: its second layer without RoPE (NoPE)
    "ministral": ("ministral", {"sliding_window": 6, "layer_types": ["sliding_attention", "full_attention"]}),
    "smollm3": ("smollm3", {"no_rope_layer_interval": 2}),
    # GPT-2's scale_attn_by_inverse_layer_idx (layer i's scores / (i + 1)), untied head
    "gpt2_inverse_scale": ("gpt2", {"scale_attn_by_inverse_layer_idx": True, "tie_word_embeddings": False}),
    # mixtures of experts (4 experts, 2 a token): Mixtral; Qwen2-MoE's shared expert, a dense first layer, raw
    # top-k weights; Qwen3-MoE's renormalised ones and q/k norms
    "mixtral": ("mixtral", {}),
    "qwen2_moe": ("qwen2_moe", {"shared_expert_intermediate_size": 96, "mlp_only_layers": [0],
                                "norm_topk_prob": False}),
    "qwen3_moe": ("qwen3_moe", {"norm_topk_prob": True}),
    # Phi-2's layout (RoPE over half of each head, parallel attention and MLP, LM-head bias); then q/k LayerNorm, GQA
    "phi": ("phi", {}),
    "phi_qk_norm_gqa": ("phi", {"qk_layernorm": True, "num_key_value_heads": 2}),
    # OPT: pre-norm (opt-125m and most); post-norm with narrower embeddings projected in and out (opt-350m)
    "opt": ("opt", {}),
    "opt_post_norm": ("opt", {"do_layer_norm_before": False, "word_embed_proj_dim": 32}),
    # GPTBigCode (StarCoder 1, SantaCoder): multi-query attention; then per-head fused q/k/v rows without it
    "gpt_bigcode": ("gpt_bigcode", {}),
    "gpt_bigcode_mha": ("gpt_bigcode", {"multi_query": False}),
    # Granite: embeddings (prompt rows too), residual branches and logits scaled; its own attention scale
    "granite": ("granite", {"embedding_multiplier": 3.0, "residual_multiplier": 0.5, "logits_scaling": 2.0,
                            "attention_multiplier": 0.2}),
    # StableLM: StableLM 2 1.6B's options (qkv bias, serial); then StableLM 2 12B's (parallel, per-head q/k norms, GQA)
    "stablelm": ("stablelm", {"use_qkv_bias": True}),
    "stablelm_parallel": ("stablelm", {"use_parallel_residual": True, "qk_layernorm": True,
                                       "num_key_value_heads": 2}),
    # StarCoder2: LayerNorm, biases, GELU MLP, GQA, a sliding window shorter than the tests' sequences
    "starcoder2": ("starcoder2", {"sliding_window": 7}),
    # OLMo 2: norms after attention and the MLP, full-width q/k norms, GQA
    "olmo2": ("olmo2", {}),
    # Falcon: 7B's multi-query, parallel attention and MLP on one norm; 40B's grouped K/V and two parallel norms;
    # plain multi-head attention, one after the other, with biases
    "falcon": ("falcon", {}),
    "falcon_new_arch": ("falcon", {"new_decoder_architecture": True, "num_kv_heads": 2}),
    "falcon_serial": ("falcon", {"multi_query": False, "parallel_attn": False, "bias": True}),
    # GPT-J: interleaved RoPE over half of each head (GPT-J-6B: 64 of 256), parallel attention and MLP
    "gptj": ("gptj", {}),
    # Cohere (Command R, Aya): parallel attention and MLP on one LayerNorm, interleaved RoPE, logit scale; then
    # Command R+'s per-head q/k norms with q/k/v/o biases
    "cohere": ("cohere", {}),
    "cohere_qk_norm": ("cohere", {"use_qk_norm": True, "attention_bias": True}),
    # Ministral 3: YaRN and queries scaled by position past original_max_position_embeddings (16 here, so the
    # tests' sequences reach it); then a multimodal Mistral 3 checkpoint (Mistral3ForConditionalGeneration, as
    # Mistral Small 3.x and Ministral 3 ship): its language model only
    "ministral3": ("ministral3", {"rope_parameters": {
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
        "llama_4_scaling_beta": 0.5, "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}}),
    "mistral3_multimodal": ("mistral3", {}),
    # OLMo 3: OLMo 2's layout with two sliding-window layers before a full-attention one, each layer type with its
    # own RoPE (YaRN past 16 positions on the full-attention layer, as the long-context checkpoints)
    "olmo3": ("olmo3", {"num_layers": 3, "sliding_window": 6,
                        "layer_types": ["sliding_attention", "sliding_attention", "full_attention"],
                        "rope_parameters": {
                            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                            "full_attention": {"rope_type": "yarn", "rope_theta": 500000.0, "factor": 4.0,
                                               "original_max_position_embeddings": 16}}}),
    # Cohere 2 (Command R7B, Command A): Cohere's layout with RoPE and a sliding window on the sliding layers, none
    # (NoPE) on the full-attention one
    "cohere2": ("cohere2", {"num_layers": 3, "sliding_window": 6,
                            "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}),
    # GLM (glm-4-9b-chat-hf): q/k/v biases, fused gate_up_proj, interleaved RoPE over half of each head; GLM-4-0414:
    # + norms after attention and the MLP
    "glm": ("glm", {}),
    "glm4": ("glm4", {}),
    # EXAONE 4: OLMo 2's norm placement with per-head q/k norms; two sliding-window layers with RoPE, then a
    # full-attention one without (NoPE)
    "exaone4": ("exaone4", {"num_layers": 3, "sliding_window": 6,
                            "layer_types": ["sliding_attention", "sliding_attention", "full_attention"]}),
    # ERNIE 4.5: Llama with interleaved RoPE over whole heads (computed in fp32) and biases on every projection
    "ernie4_5": ("ernie4_5", {"use_bias": True}),
    # OLMo (1): LayerNorms without weights, q/k/v clipped (at a value the tiny model's projections reach)
    "olmo": ("olmo", {"clip_qkv": 1.5}),
    # OLMoE: 4 experts (2 a token, raw top-k weights), q and k normed over all heads, then clipped
    "olmoe": ("olmoe", {"clip_qkv": 1.5}),
    # Seed-OSS (36B): q/k/v biases, none on the output projection (its own attention_out_bias)
    "seed_oss": ("seed_oss", {"attention_bias": True, "attention_out_bias": False}),
    # GraniteMoE: Granite's multipliers; 4 experts, 2 a token, weighted by the softmax of their two router logits
    "granitemoe": ("granitemoe", {"embedding_multiplier": 3.0, "residual_multiplier": 0.5, "logits_scaling": 2.0,
                                  "attention_multiplier": 0.2}),
    # InternLM3 (Llama's implementation in transformers): biases on every projection or none (bias == qkv_bias)
    "internlm3": ("internlm3", {"attention_bias": True, "mlp_bias": True}),
    # GPT-Neo: separate bias-free q/k/v, unscaled scores; a global layer, then a local one windowed shorter than the
    # tests' sequences
    "gpt_neo": ("gpt_neo", {"window_size": 6}),
    # Helium (Kyutai): Llama with RoPE in interleaved pairs, q/k/v biases but none on the output projection
    "helium": ("helium", {"attention_bias": True}),
    # Arcee (AFM): Llama with an ungated squared-ReLU MLP (up, then down), YaRN
    "arcee": ("arcee", {"mlp_bias": True, "rope_parameters": {
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16}}),
    # Nemotron: (1 + w) LayerNorm gains, RoPE over half of each head, an ungated squared-ReLU MLP, GQA, biases
    "nemotron": ("nemotron", {"attention_bias": True, "mlp_bias": True}),
    # CWM (Code World Model): Llama with sliding-window layers named by layer_types (a window shorter than the tests'
    # sequences), Llama 3 RoPE scaling
    "cwm": ("cwm", {"sliding_window": 6, "layer_types": ["full_attention", "sliding_attention"], "rope_parameters": {
        "rope_type": "llama3", "rope_theta": 1000000.0, "factor": 16.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 32}}),
    # HyperCLOVAX: Granite's multipliers (logits times logits_scaling), an RMSNorm on each sublayer's output
    "hyperclovax": ("hyperclovax", {"embedding_multiplier": 3.0, "residual_multiplier": 0.5, "logits_scaling": 0.5,
                                    "attention_multiplier": 0.2}),
    # Jais 2: Llama with LayerNorms, an ungated squared-ReLU MLP, biases everywhere
    "jais2": ("jais2", {}),
    # Apertus: Llama with per-head q/k norms and an ungated MLP with xIELU (learned alpha_p / alpha_n per layer),
    # its norms under their own names, Llama 3 RoPE scaling
    "apertus": ("apertus", {"rope_parameters": {
        "rope_type": "llama3", "rope_theta": 12000000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 32}}),
    # CodeGen: GPT-J's model with q/k/v fused in 4 model-parallel row groups ([q | v | k] each); 8 heads, 2 a group
    "codegen": ("codegen", {"num_heads": 8}),
    # XGLM and BioGPT (fairseq's pre-norm decoder): token embeddings scaled by sqrt(hidden); sinusoidal positions
    # (XGLM) or learned ones (BioGPT), two rows into their table
    "xglm": ("xglm", {}),
    "biogpt": ("biogpt", {}),
    # multimodal Qwen2.5-VL and Qwen3-VL checkpoints (their language model: Qwen2.5's and Qwen3's, whose multimodal
    # RoPE is the plain one on text); the first with tied embeddings, as Qwen2.5-VL-3B has them
    "qwen2_5_vl": ("qwen2_5_vl", {"tie_word_embeddings": True}),
    "qwen3_vl": ("qwen3_vl", {"tie_word_embeddings": False}),
    "qwen2_vl": ("qwen2_vl", {}),
    # Qwen3-VL-MoE (30B-A3B): Qwen3-MoE text (experts renormalised always), the stacked experts as the Hub holds them
    "qwen3_vl_moe": ("qwen3_vl_moe", {"tie_word_embeddings": False}),
    # a multimodal EXAONE 4.5 checkpoint: its EXAONE 4 language model (two sliding layers, a NoPE global one)
    "exaone4_5": ("exaone4_5", {"num_layers": 3, "sliding_window": 6,
                                "layer_types": ["sliding_attention", "sliding_attention", "full_attention"]}),
    # GLM-4.5 (MoE): q/k/v biases, RoPE over half of each head; a dense layer, then sigmoid-routed experts chosen by
    # score + correction bias within the best of two groups, scaled, with an ungated shared expert; per-head q/k norms
    "glm4_moe": ("glm4_moe", {"num_layers": 3, "attention_bias": True, "use_qk_norm": True}),
    # ERNIE 4.5 MoE (21B-A3B): ERNIE 4.5's attention, a dense first layer, then experts chosen by router probability +
    # a correction bias (the router kept in fp32), an ungated shared expert; biases on the dense MLPs, none on experts
    "ernie4_5_moe": ("ernie4_5_moe", {"use_bias": True}),
    # DeepSeek's latent attention (queries through a low-rank projection, keys and values from a compressed latent,
    # rotated key channels shared by the heads; values narrower than keys), a dense first layer, then experts.
    # DeepSeek-V3: YaRN with mscale_all_dim (the scores' scale grows too), RoPE in interleaved pairs, sigmoid router
    # with groups; V2-Lite's plain q_proj, V2's fp32 complex-number RoPE and softmax router over the best groups
    # (group_limited_greedy); GLM-4.7-Flash (glm4_moe_lite): q/k/v biases, rotate-half RoPE, layers named by type
    "deepseek_v3": ("deepseek_v3", {"num_layers": 3, "rope_parameters": {
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
        "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1}}),
    "deepseek_v2": ("deepseek_v2", {"num_layers": 3, "q_lora_rank": None}),
    "glm4_moe_lite": ("glm4_moe_lite", {"num_layers": 3, "attention_bias": True, "rope_interleave": False}),
    # the same attention in models without experts, for the half-precision tests (a MoE model's logits jump where
    # router probabilities nearly tie)
    "deepseek_v3_dense": ("deepseek_v3", {"first_k_dense_replace": 2, "rope_parameters": {
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
        "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1}}),
    "deepseek_v2_dense": ("deepseek_v2", {"first_k_dense_replace": 2}),
    # Mistral 4: DeepSeek-V3's attention with Ministral 3's queries scaled by position (YaRN), a softmax router in
    # the model dtype over the best groups; Youtu-LLM: that attention with dense MLPs, tied embeddings; MiniCPM3:
    # rotate-half RoPE, token embeddings times scale_emb, residual branches scaled, hidden states divided before the
    # head
    "mistral4": ("mistral4", {"num_layers": 3, "rope_parameters": {
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
        "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1, "llama_4_scaling_beta": 0.1}}),
    # Mistral Small 4 as the Hub holds it: a multimodal Mistral 3 checkpoint around Mistral 4's language model
    "mistral3_mistral4": ("mistral3", {"text_model_type": "mistral4", "num_layers": 3}),
    "youtu": ("youtu", {}),
    # dots.llm1 (dots1): Qwen3's attention (per-head q/k norms; here with biases and a sliding layer, by
    # max_window_layers), a dense first layer, then DeepSeek-V3's router and a shared expert
    "dots1": ("dots1", {"num_layers": 3, "attention_bias": True, "sliding_window": 6, "max_window_layers": 2}),
    # IQuest-Coder (Llama's implementation in transformers); VaultGemma: Gemma 2 (softcaps, sliding layers) with only
    # an input norm and an MLP norm per layer
    "iquestcoder": ("iquestcoder", {}),
    "vaultgemma": ("vaultgemma", {}),
    # Hunyuan (dense: Hunyuan-7B's NTK RoPE with a fixed alpha; MoE: q/k/v/o biases, an fp32-kept softmax router, a
    # shared MLP): per-head q/k norms after RoPE
    "hunyuan_v1_dense": ("hunyuan_v1_dense", {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0,
                                                                  "alpha": 1000.0, "factor": 1.0}}),
    "hunyuan_v1_moe": ("hunyuan_v1_moe", {"attention_bias": True}),
    # Solar Open: GLM-4.5's router in every layer (no dense MLP), q/k/v biases but none on the output projection
    "solar_open": ("solar_open", {"attention_bias": True}),
    # Mellum (JetBrains): Qwen3-MoE's attention with sliding and full-attention layers, each type with a RoPE of its own
    # (bases 10000 and 500000), a dense first layer, then experts
    "mellum": ("mellum", {"num_layers": 3}),
    # FlexOlmo: OLMo 2's layers (norms after each sublayer, q/k norms over all heads) with OLMoE's experts
    "flex_olmo": ("flex_olmo", {"norm_topk_prob": True}),
    # GraniteMoeShared (Granite 3.x MoE with a shared expert): GraniteMoE's multipliers and router, plus a shared MLP
    "granitemoeshared": ("granitemoeshared", {"embedding_multiplier": 3.0, "residual_multiplier": 0.5,
                                              "logits_scaling": 2.0, "attention_multiplier": 0.2}),
    # EXAONE-MoE: EXAONE 4's attention (per-head q/k norms, RoPE on the sliding layers only, NoPE on the full one) in
    # Llama's pre-norm layers, a dense first layer, then DeepSeek-V3's router (its correction bias on the MoE block)
    "exaone_moe": ("exaone_moe", {"num_layers": 3, "sliding_window": 6,
                                  "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}),
    "minicpm3": ("minicpm3", {}),
    # gpt-oss: q/k/v/o biases, attention sinks, a sliding layer then a full one, YaRN; every layer 4 experts (2 a
    # token) behind a biased router, with biases and a clamped SwiGLU (the limit lowered so that the clamp bites)
    "gpt_oss": ("gpt_oss", {"swiglu_limit": 1.0}),
    # MiniMax-M2: q and k each normed over all heads at once, RoPE over half of each head; every layer 4 experts (2 a
    # token) chosen by sigmoid score + a correction bias (on the MoE block, cast as the model is), renormalised
    "minimax_m2": ("minimax_m2", {}),
    # Llama 4 (text): RoPE in interleaved pairs rotated in fp32, q/k L2-normed after it, on the RoPE layers; a NoPE
    # layer whose queries are temperature-tuned by position; a sparse layer whose router's top-1 sigmoid scales the
    # expert's input, with a shared expert; chunked attention capping sequences at the chunk (half the context)
    "llama4_text": ("llama4_text", {"num_layers": 3}),
    # the same without experts, for the half-precision logit tests
    "llama4_text_dense": ("llama4_text", {"num_layers": 3, "interleave_moe_layer_step": 4}),
    # a multimodal Llama 4 checkpoint as the Hub holds Scout and Maverick (language_model.*, vision_model.*): its
    # language model, text in and text out
    "llama4": ("llama4", {"num_layers": 3}),
    # Phi-3.5-MoE: LayerNorms with biases, q/k/v/o and LM-head biases, sparsemixer routing (a near-tie band wide
    # enough to mask some logits), longrope scaled by short_mscale below its original length
    "phimoe": ("phimoe", {"attention_bias": True, "lm_head_bias": True, "router_jitter_noise": 0.2,
                          "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0,
                                              "short_factor": [1.0, 1.1, 1.3, 1.7, 2.0, 2.5, 3.0, 3.5],
                                              "long_factor": [1.0, 2.0, 4.0, 8.0, 9.0, 12.0, 14.0, 16.0],
                                              "short_mscale": 1.2, "long_mscale": 1.3,
                                              "original_max_position_embeddings": 128},
                          "original_max_position_embeddings": 128}),
    # AFMoE (Arcee's Trinity): per-head q/k norms, RoPE on the sliding layers only, gated attention outputs, norms
    # around both sublayers, muP's input scale (soft-prompt rows too); a dense first layer, then sigmoid-routed
    # experts (scaled) with a shared one
    "afmoe": ("afmoe", {"num_layers": 3, "mup_enabled": True}),
    # GraniteSWA and GraniteMoeSWA (IBM's Granite "swash"): Granite's multipliers, attention sinks, a full-attention
    # layer then sliding ones, a RoPE base per layer (the last layer none)
    "granite_swa": ("granite_swa", {"num_layers": 3, "embedding_multiplier": 3.0, "residual_multiplier": 0.5,
                                    "logits_scaling": 2.0, "attention_multiplier": 0.2}),
    "granitemoe_swa": ("granitemoe_swa", {"num_layers": 3, "embedding_multiplier": 3.0, "residual_multiplier": 0.5,
                                          "logits_scaling": 2.0, "attention_multiplier": 0.2,
                                          "shared_intermediate_size": 64}),
    # Cohere2-MoE: Cohere 2's parallel layers (a rotated dense full-attention layer, a sliding layer, a NoPE one)
    # with experts (the softmax of the top-2 logits) and a shared expert, summed with them; and with RMSNorms and
    # the shared expert averaged in
    "cohere2_moe": ("cohere2_moe", {"num_layers": 3, "shared_expert_combination_strategy": "sum"}),
    "cohere2_moe_rms": ("cohere2_moe", {"num_layers": 3, "rms_norm_eps": 1e-5,
                                        "shared_expert_combination_strategy": "average"}),
    # Kolibri-1 (Aleph Alpha): EXAONE 4's attention (per-head q/k norms, RoPE on the sliding layers only) in GLM-4's
    # sandwich-normed layers; experts chosen by logit + correction bias, weighted by renormalised sigmoids, and a
    # shared expert
    "kolibri1": ("kolibri1", {"num_layers": 3, "norm_topk_prob": True}),
    # Flint: Qwen3-MoE's attention with attention sinks (fp32), RoPE on its sliding layer only, gpt-oss's norms; a
    # dense first layer, then experts by the sigmoid of fp32 logits alone and an ungated shared expert
    "flint": ("flint", {"num_layers": 3}),
    # DeepSeek-V3.2: V3's latent attention and experts with a sparse-attention indexer that keeps every key up to its
    # index_topk (64 here), where sequences are capped; YaRN as V3's
    "deepseek_v32": ("deepseek_v32", {"num_layers": 3, "rope_parameters": {
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
        "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1}}),
    # GLM-5 (glm_moe_dsa): the same sparse attention, its later layers reusing the first's indexer choice
    "glm_moe_dsa": ("glm_moe_dsa", {"num_layers": 3}),
    # MPT: ALiBi with MPT's slopes (6 heads: not a power of two), q/k/v clamped, a tied head
    "mpt": ("mpt", {"hidden_size": 96, "num_heads": 6, "attn_config": {"clip_qkv": 0.5}}),
    # Persimmon: StableLM's serial layout, biases everywhere, fused per-head q/k/v, q/k LayerNorms, RoPE over half of
    # each head, squared ReLU
    "persimmon": ("persimmon", {}),
    # DBRX: bias-free LayerNorms, fused Wqkv clamped, GQA; 4 experts (2 a token) in every layer, stored w1/v1/w2
    "dbrx": ("dbrx", {}),
    # nanochat: gainless norms (one on the input embeddings too), RoPE turning the other way, q/k L2 norms after
    # it, squared ReLU, soft-capped logits (the cap lowered so that it bites)
    "nanochat": ("nanochat", {}),
    # GPT-SW3 (AI Sweden): GPT-2's model under its own model_type
    "gpt-sw3": ("gpt-sw3", {}),
    # Hy3 (Tencent, hy_v3): per-head q/k norms, a dense first layer, then GLM-4.5's sigmoid router (one group,
    # scaled) and a shared expert
    "hy_v3": ("hy_v3", {"num_layers": 3}),
    # Gemma 4 (31B's layout): sliding and full-attention layers in turn, the full ones with twice the head width,
    # half the K/V heads, values from the keys' projection and proportional RoPE; gainless value norms, attention
    # scale 1, per-layer output scales, soft-capped logits
    "gemma4": ("gemma4_text", {"num_layers": 4, "final_logit_softcapping": 30.0}),
    # 26B-A4B's: 4 experts (2 a token) beside each layer's dense MLP, routed on the un-normed input
    "gemma4_moe": ("gemma4_text", {"num_layers": 3, "enable_moe_block": True, "num_experts": 4, "top_k_experts": 2,
                                   "moe_intermediate_size": 32}),
    # a multimodal Gemma 4 checkpoint (model.language_model.*, a vision tower): its language model
    "gemma4_multimodal": ("gemma4", {"num_layers": 3}),
    # Gemma 4 "unified" (gemma4_unified_text, the 12B's): the same layers, the last two attending with the K/V of the
    # last earlier layer of their type, their MLPs twice as wide; and as the multimodal checkpoint
    "gemma4_unified": ("gemma4_unified_text", {"num_layers": 6, "num_kv_shared_layers": 2,
                                               "use_double_wide_mlp": True, "final_logit_softcapping": 30.0}),
    "gemma4_unified_multimodal": ("gemma4_unified", {"num_layers": 3}),
    # Laguna (poolside): a query head count per layer, per-head q/k norms, heads gated by softplus, a sliding layer
    # with full RoPE and full-attention layers with RoPE over half of each head; a dense first layer, then experts by
    # soft-capped sigmoid scores + a correction bias, scaled, and a shared expert; and with a gate per channel
    "laguna": ("laguna", {"num_layers": 4, "moe_router_logit_softcapping": 3.0, "moe_routed_scaling_factor": 2.0}),
    "laguna_element_gate": ("laguna", {"num_layers": 3, "gating": "per-element"}),
    # Qwen3.5: Gated DeltaNet (linear-attention) layers, whose recurrent state the engine keeps per sequence and per
    # task prompt, with a gated full-attention layer every second layer (RoPE over half of each head); the long
    # inputs of the tests cross the delta rule's 64-token chunks; and the multimodal checkpoint's language model
    "qwen3_5": ("qwen3_5_text", {"num_layers": 4, "full_attention_interval": 2}),
    "qwen3_5_multimodal": ("qwen3_5", {"num_layers": 3, "full_attention_interval": 3}),
    # Qwen3.5-MoE: experts (a softmax router) beside a sigmoid-gated shared expert in every layer; and multimodal
    "qwen3_5_moe": ("qwen3_5_moe_text", {"num_layers": 3, "full_attention_interval": 3}),
    "qwen3_5_moe_multimodal": ("qwen3_5_moe", {"num_layers": 3, "full_attention_interval": 3}),
    # Qwen3-Next: the same layers, its linear layers' projections fused per key head; a dense MLP in mlp_only_layers
    "qwen3_next": ("qwen3_next", {"num_layers": 4, "full_attention_interval": 2, "mlp_only_layers": [0]}),
    # LFM2 (Liquid AI): gated short convolutions (a recurrent conv state per sequence) and GQA attention layers with
    # per-head q/k norms; and with biases on its convolution layers
    "lfm2": ("lfm2", {"num_layers": 4}),
    "lfm2_conv_bias": ("lfm2", {"num_layers": 3, "conv_bias": True, "tie_word_embeddings": False}),
    # Granite 4.0's hybrids: Mamba-2 layers (a conv and scan state per sequence) with attention layers, Granite's
    # multipliers and experts beside a shared MLP; and the dense NoPE layout (the shared MLP alone, no RoPE)
    "granite_hybrid": ("granitemoehybrid", {"num_layers": 4}),
    "granite_hybrid_dense": ("granitemoehybrid", {"num_layers": 3, "num_local_experts": 0,
                                                  "position_embedding_type": "nope"}),
    # Nemotron-H: one mixer a layer (Mamba-2, NoPE attention, squared-ReLU MLP, grouped sigmoid-routed experts)
    "nemotron_h": ("nemotron_h", {"num_layers": 5}),
    # Bamba: Mamba-2 and attention layers (RoPE over half of each head), SwiGLU MLPs, Llama's names of its own
    "bamba": ("bamba", {"num_layers": 3}),
    # models without attention, whose whole past is a recurrent state (the soft prompt's computed once per task):
    # Mamba (Mamba-1 selective scans), Falcon-Mamba (gainless norms on dt, B, C), Mamba-2 (Codestral Mamba's layout)
    "mamba": ("mamba", {"num_layers": 3}),
    "falcon_mamba": ("falcon_mamba", {"num_layers": 2}),
    "mamba2": ("mamba2", {"num_layers": 3}),
    # Jamba: Mamba-1 layers (gained norms on dt, B, C) and a NoPE attention layer, SwiGLU MLPs and experts in turn
    "jamba": ("jamba", {"num_layers": 4}),
    # OLMo Hybrid: Gated DeltaNet layers (q, k, v projected and convolved apart, beta in (0, 2)) in a pre-norm layout
    # with OLMo 3's post-norm attention layers
    "olmo_hybrid": ("olmo_hybrid", {"num_layers": 4}),
    # Falcon-H1: a Mamba-2 mixer beside attention in every layer, muP multipliers everywhere (the token embeddings'
    # only on input ids, not under PEFT); the mixer's output norm after its gate, before it, or none
    "falcon_h1": ("falcon_h1", {"num_layers": 3}),
    "falcon_h1_norm_first": ("falcon_h1", {"num_layers": 2, "mamba_norm_before_gate": True}),
    "falcon_h1_no_norm": ("falcon_h1", {"num_layers": 2, "mamba_rms_norm": False, "tie_word_embeddings": True}),
    # LFM2-MoE: LFM2's layers, a dense first one, then experts by sigmoid score + correction bias (new variants go
    # last: a variant's weights are drawn from its index here)
    "lfm2_moe": ("lfm2_moe", {"num_layers": 3}),
    # LFM3: convolutions, sliding-window (6 tokens) and full-attention layers in turn, each attention type with a RoPE
    # of its own (the full one proportional over half of each 24-wide head), gated heads, sandwich norms; and without
    # the gate and the sandwich norms, with biases, untied
    "lfm3": ("lfm3", {"num_layers": 5}),
    "lfm3_plain": ("lfm3", {"num_layers": 3, "use_sandwich_norm": False, "use_attention_gate": False,
                            "attention_bias": True, "conv_bias": True, "tie_word_embeddings": False}),
    # the multimodal LFM2-VL and LFM3-VL checkpoints: their language model, the vision tower left out
    "lfm2_vl": ("lfm2_vl", {"num_layers": 3}),
    "lfm3_vl": ("lfm3_vl", {"num_layers": 4}),
    # MiMo-V2-Flash: full-attention and sliding-window (6 tokens) layers in turn, the sliding ones with twice the K/V
    # heads and attention sinks; heads 24 wide with RoPE over a third, values 16 wide times 0.707; a dense first
    # layer, then experts from the best of 2 groups. And one with every head's values as wide as its keys, unscaled,
    # q/k/v biases, tied embeddings, yarn on the full layers and every layer sparse; and one without experts
    "mimo_v2_flash": ("mimo_v2_flash", {"num_layers": 4}),
    "mimo_v2_flash_plain": ("mimo_v2_flash", {
        "num_layers": 3, "v_head_dim": 24, "attention_value_scale": None, "attention_bias": True,
        "tie_word_embeddings": True, "mlp_layer_types": ["sparse"] * 3, "rope_parameters": {
            "full_attention": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                               "original_max_position_embeddings": 64, "partial_rotary_factor": 0.5},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}}),
    "mimo_v2_flash_dense": ("mimo_v2_flash", {"num_layers": 4, "mlp_layer_types": ["dense"] * 4}),  # (half precision)
    # A.X K1: DeepSeek-V3 (latent attention, YaRN, grouped sigmoid routing, a shared expert) with an RMSNorm over each
    # MoE block's output
    "axk1": ("axk1", {"num_layers": 3, "rope_parameters": {
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
        "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1}}),
    # LongCat-Flash: 2 layers of two latent-attention sublayers (4 in the pool) with dense MLPs, a shortcut MoE with
    # zero-computation experts (3 of the 6 a token); YaRN
    "longcat_flash": ("longcat_flash", {"num_layers": 2, "moe_topk": 3, "rope_parameters": {
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
        "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1}}),
    # Kimi Linear: Kimi Delta Attention layers (a decay per key channel) around a latent-attention layer without RoPE
    # (a plain q_proj), a dense first layer, then grouped sigmoid routing with a shared expert; and with a query LoRA
    # and q/k/v/o biases, one layer of each kind, both dense
    "kimi_linear": ("kimi_linear", {"num_layers": 4}),
    "kimi_linear_dense": ("kimi_linear", {"num_layers": 2, "q_lora_rank": 32, "attention_bias": True,
                                          "mlp_layer_types": ["dense", "dense"]}),
}
ARCH_VARIANTS = ("llama", "qwen2", "qwen3", "gemma3", "pythia", "gpt2", "bloom")  # one per family (+ Qwen2/3)


@pytest.fixture(scope="session")
def model_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


_cache: dict[str, Path] = {}


def tiny_model(root: Path, variant: str) -> Path:
    if variant not in _cache:
        arch, options = MODEL_VARIANTS[variant]
        _cache[variant] = build_tiny_checkpoint(arch, root / variant, seed=list(MODEL_VARIANTS).index(variant), **options)
    return _cache[variant]


@pytest.fixture(scope="session")
def model_dir_for(model_root):
    return lambda variant: tiny_model(model_root, variant)


@pytest.fixture(scope="session")
def thinking_model_dir(model_root) -> Path:
    """The tiny Llama with a tokenizer whose last two ids are `<think>` and `</think>`, as a thinking model's."""
    out = model_root / "llama-thinking"
    build_tiny_checkpoint("llama", out, with_tokenizer=False)
    build_tokenizer(out, 510, added_tokens=("<think>", "</think>"))
    return out


_adapters: dict[tuple, Path] = {}


@pytest.fixture(scope="session")
def adapter_for(model_root):
    """adapter_for(variant, seed=0, num_virtual_tokens=8, init="random") -> PEFT adapter dir."""

    def make(variant: str, seed: int = 0, num_virtual_tokens: int = 8, init: str = "random") -> Path:
        key = (variant, seed, num_virtual_tokens, init)
        if key not in _adapters:
            model_dir = tiny_model(model_root, variant)
            out = model_root / "adapters" / f"{variant}-{seed}-{num_virtual_tokens}-{init}"
            init_text = "the cat sat on the mat" if init == "text" else None
            _adapters[key] = build_prompt_tuning_adapter(
                model_dir, out, num_virtual_tokens=num_virtual_tokens, init=init, init_text=init_text, seed=seed
            )
        return _adapters[key]

    return make
