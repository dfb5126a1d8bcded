"""Our models + reference path against HF transformers + PEFT, on tiny random checkpoints.

Tolerances: fp32 logits within 1e-4 absolute (observed ~5e-6 on logits of scale ~7: only summation order
differs). bf16/fp16: HF's own half-precision logits differ from its fp32 ones by up to ~1% of the logit scale
(bf16) / ~0.15% (fp16); ours must stay within twice that distance (+0.01) of both, and greedy tokens must agree
wherever the fp32 top-2 margin exceeds that noise.
"""

from __future__ import annotations

import pytest
import torch

from softprompt import Engine, Request, SamplingParams

from .conftest import MODEL_VARIANTS

peft = pytest.importorskip("peft")
from softprompt.engine.hf_auto import load_hf_causal_lm, reference_load_kwargs  # noqa: E402

FP32_ATOL = 1e-4
# transformers 5.23's Bamba with a cache: its decode steps' logits are up to 1.6 off its own full forward's (Granite
# 4.0's hybrid, the same Mamba-2 mixer, agrees to 2e-6); PEFT 0.21's generate on Mamba, Falcon-Mamba and Mamba-2
# prepends the soft prompt again at every step (it looks for the cache under past_key_values; these models keep it in
# cache_params; their own cached generate agrees with the full forward); PEFT's generate on Falcon-H1 with its cache
# strays from the third token (with use_cache=False it gives the full forward's tokens, as does the bare model's
# cached generate). So greedy tokens are checked against the full forward's
HF_CACHE_DIVERGES = ("bamba", "mamba", "falcon_mamba", "mamba2", "falcon_h1", "falcon_h1_norm_first",
                     "falcon_h1_no_norm")
HALF_ATOL = {torch.bfloat16: 0.05, torch.float16: 0.01}  # relative to the logit scale


def hf_peft_model(model_dir, adapter_dir, dtype=torch.float32):
    base = load_hf_causal_lm(model_dir, dtype=dtype).eval()
    if adapter_dir is None:
        return base
    return peft.PeftModel.from_pretrained(base, adapter_dir).eval()


def random_ids(n: int, seed: int, vocab: int = 512) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab, (n,), generator=g).tolist()


@pytest.mark.parametrize("variant", list(MODEL_VARIANTS))
@pytest.mark.parametrize("init", ["random", "text"])
def test_logits_match_hf_peft_fp32(variant, init, model_dir_for, adapter_for):
    model_dir, adapter = model_dir_for(variant), adapter_for(variant, init=init)
    hf = hf_peft_model(model_dir, adapter)
    engine = Engine(model_dir, device="cpu", dtype="float32", backend="reference")
    prompt = engine.add_prompt("task", adapter)
    for n, seed in [(1, 0), (7, 1), (23, 2)]:
        ids = random_ids(n, seed)
        with torch.no_grad():
            expected = hf(input_ids=torch.tensor([ids])).logits[0, -n:].float()
        got = engine.reference.logits(prompt.embeds, ids)
        torch.testing.assert_close(got, expected, atol=FP32_ATOL, rtol=0)


@pytest.mark.parametrize("variant", list(MODEL_VARIANTS))
def test_base_model_logits_match_hf(variant, model_dir_for):
    model_dir = model_dir_for(variant)
    hf = hf_peft_model(model_dir, None)
    engine = Engine(model_dir, device="cpu", dtype="float32", backend="reference")
    ids = random_ids(17, 5)
    with torch.no_grad():
        expected = hf(input_ids=torch.tensor([ids])).logits[0].float()
    torch.testing.assert_close(engine.reference.logits(None, ids), expected, atol=FP32_ATOL, rtol=0)


@pytest.mark.parametrize("variant, eager", [("gemma2", True), ("gemma3_multimodal", False), ("llama", False)])
def test_hf_side_loads_the_reference_implementation(variant, eager, model_dir_for, monkeypatch):
    """verify, train and these tests load HF's model with `load_hf_causal_lm`: eager attention where scores are
    soft-capped (transformers <= 5.17 ran Gemma 2 on SDPA, which skips the cap: 0.19 off its eager logits here),
    and never Hub kernels (transformers 5.25 downloads them by default)."""
    from transformers import AutoConfig, PreTrainedModel

    model_dir = model_dir_for(variant)
    options = reference_load_kwargs(AutoConfig.from_pretrained(model_dir))
    assert options["use_kernels"] is False and (options.get("attn_implementation") == "eager") == eager
    seen = {}
    real = PreTrainedModel.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.update(kwargs)
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(spy))
    model = load_hf_causal_lm(model_dir)
    assert seen["use_kernels"] is False
    assert (model.config._attn_implementation == "eager") == eager  # the others keep HF's default (SDPA)


@pytest.mark.parametrize("variant", list(MODEL_VARIANTS))
def test_greedy_tokens_match_peft_generate(variant, model_dir_for, adapter_for):
    model_dir = model_dir_for(variant)
    engine = Engine(model_dir, device="cpu", dtype="float32", backend="reference")
    outputs = []
    for seed in (0, 1):
        adapter = adapter_for(variant, seed=seed)
        hf = hf_peft_model(model_dir, adapter)
        engine.add_prompt(f"task{seed}", adapter)
        ids = random_ids(9, seed + 10)
        with torch.no_grad():
            if variant in HF_CACHE_DIVERGES:  # HF's greedy tokens from its full forward, step by step
                expected = []
                for _ in range(12):
                    expected.append(int(hf(input_ids=torch.tensor([ids + expected])).logits[0, -1].argmax()))
            else:
                out = hf.generate(input_ids=torch.tensor([ids]),
                                  attention_mask=torch.ones(1, len(ids), dtype=torch.long), max_new_tokens=12,
                                  do_sample=False, pad_token_id=3)
                expected = out[0, len(ids):].tolist()
        got = engine.generate([Request(prompt=f"task{seed}", input_ids=ids,
                                       sampling=SamplingParams(max_new_tokens=12))])[0]
        assert got.token_ids == expected
        outputs.append(got.token_ids)
    assert outputs[0] != outputs[1], "degenerate test: two prompts and inputs gave the same tokens"


@pytest.mark.parametrize("variant", ["llama", "gpt2", "bloom", "qwen3", "gemma2", "phi", "opt", "olmo2", "cohere",
                                     "glm", "ernie4_5", "gpt_neo", "helium", "arcee",
                                     "nemotron", "hyperclovax", "jais2", "apertus",
                                     "codegen", "xglm", "biogpt", "deepseek_v3_dense", "deepseek_v2_dense",
                                     "youtu", "minicpm3", "vaultgemma", "hunyuan_v1_dense", "llama4_text_dense",
                                     "persimmon", "mpt", "nanochat", "gemma4", "lfm2",
                                     "granite_hybrid_dense", "nemotron_h", "mimo_v2_flash_dense"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_close_to_hf(variant, dtype, model_dir_for, adapter_for):
    """In half precision, we must be about as close to HF-half as HF-half is to the fp32 truth."""
    model_dir, adapter = model_dir_for(variant), adapter_for(variant)
    engine = Engine(model_dir, device="cpu", dtype=dtype, backend="reference")
    prompt = engine.add_prompt("task", adapter)
    assert prompt.embeds.dtype == dtype
    ids = random_ids(48, 3)
    with torch.no_grad():
        hf_half = hf_peft_model(model_dir, adapter, dtype=dtype)(input_ids=torch.tensor([ids])).logits[0, -48:].float()
        truth = hf_peft_model(model_dir, adapter)(input_ids=torch.tensor([ids])).logits[0, -48:].float()
    got = engine.reference.logits(prompt.embeds, ids)
    hf_error = (hf_half - truth).abs().max().item()
    assert hf_error < HALF_ATOL[dtype] * truth.abs().max().item()  # the test itself is meaningful
    tolerance = 2 * hf_error + 1e-2
    torch.testing.assert_close(got, hf_half, atol=tolerance, rtol=0)
    torch.testing.assert_close(got, truth, atol=tolerance, rtol=0)
    # greedy agreement wherever the fp32 top-2 margin is larger than the rounding noise (not a near-tie)
    top2 = truth.topk(2, dim=-1).values
    decisive = (top2[:, 0] - top2[:, 1]) > 2 * tolerance
    assert decisive.sum() >= 12  # enough positions for the agreement check to mean something
    assert torch.equal(got.argmax(-1)[decisive], truth.argmax(-1)[decisive])


@pytest.mark.parametrize("variant", ["qwen3_5", "mamba", "mamba2", "olmo_hybrid", "falcon_h1", "lfm3",
                                     "kimi_linear_dense"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_attention_in_half_precision(variant, dtype, model_dir_for, adapter_for):
    """Qwen3.5, Mamba, Mamba-2, OLMo Hybrid, Falcon-H1 and LFM3 in half precision: as close to the fp32 truth as HF's
    own half-precision run (their tiny models' top-2 logit margins are small, Qwen3.5's median ~0.24, too small for
    test_half_precision_close_to_hf's greedy check at twice HF's error: bf16 errors are ~0.2-0.4 here), and HF's
    greedy token wherever the fp32 margin exceeds twice our error."""
    model_dir, adapter = model_dir_for(variant), adapter_for(variant)
    engine = Engine(model_dir, device="cpu", dtype=dtype, backend="reference")
    prompt = engine.add_prompt("task", adapter)
    ids = random_ids(48, 3)
    with torch.no_grad():
        hf_half = hf_peft_model(model_dir, adapter, dtype=dtype)(input_ids=torch.tensor([ids])).logits[0, -48:].float()
        truth = hf_peft_model(model_dir, adapter)(input_ids=torch.tensor([ids])).logits[0, -48:].float()
    got = engine.reference.logits(prompt.embeds, ids)
    hf_error, ours = (hf_half - truth).abs().max().item(), (got - truth).abs().max().item()
    # (the state carries each token's rounding to the next: HF's bf16 Mamba-2 run is 5.6% of the scale off here)
    assert 0 < hf_error < 1.5 * HALF_ATOL[dtype] * truth.abs().max().item()
    assert ours < 1.5 * hf_error
    torch.testing.assert_close(got, hf_half, atol=2 * hf_error + 1e-2, rtol=0)
    top2 = truth.topk(2, dim=-1).values
    decisive = (top2[:, 0] - top2[:, 1]) > 2 * ours
    assert decisive.sum() >= 8
    assert torch.equal(got.argmax(-1)[decisive], truth.argmax(-1)[decisive])


@pytest.mark.parametrize("variant", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "granitemoe", "glm4_moe",
                                     "ernie4_5_moe", "deepseek_v3", "deepseek_v2", "glm4_moe_lite",
                                     "mistral4", "dots1", "hunyuan_v1_moe", "solar_open",
                                     "exaone_moe", "granitemoeshared", "flex_olmo", "mellum", "gpt_oss",
                                     "minimax_m2", "llama4_text", "phimoe", "afmoe", "granitemoe_swa",
                                     "cohere2_moe", "cohere2_moe_rms", "kolibri1", "flint", "deepseek_v32",
                                     "glm_moe_dsa", "dbrx", "hy_v3", "laguna", "jamba", "lfm2_moe",
                                     "mimo_v2_flash", "axk1", "longcat_flash",
                                     "kimi_linear"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_moe_layer_matches_hf(variant, dtype, model_dir_for):
    """A mixture-of-experts model's half-precision logits cannot be held to HF's fp32 ones as above: where two
    experts' router probabilities nearly tie, rounding picks either, and the logits jump (HF-half itself strays
    ~8% of the logit scale from HF-fp32 on these models). So the MoE layer is checked alone, on the same input:
    the same experts chosen (the router's GEMM and fp32 softmax as HF's), weights cast as HF casts them (Qwen's to
    the model dtype, Mixtral's kept fp32) and each token's k outputs summed at once as transformers' default
    (grouped-GEMM) experts do: equal to HF's output here (the tolerance is under a quarter of a half-precision ulp
    at the output's scale; casting the weights the other way misses by a whole one)."""
    from softprompt.engine.loader import load_model

    model_dir = model_dir_for(variant)
    ours_layer = load_model(model_dir, "cpu", dtype).model.layers[1]
    ours = getattr(ours_layer, "mlp", None) or ours_layer.feed_forward  # (LFM2-MoE's name)
    hf = hf_peft_model(model_dir, None, dtype=dtype)
    layer = hf.model.layers[1] if hasattr(hf, "model") else hf.transformer.blocks[1]  # (DBRX's names)
    theirs = next(getattr(layer, name) for name in ("block_sparse_moe", "feed_forward", "ffn", "mlp")  # (GraniteMoE's,
                  if hasattr(layer, name))  # Llama 4's, DBRX's names)
    x = torch.randn(256, ours.gate.in_features, generator=torch.Generator().manual_seed(0)).to(dtype)
    with torch.no_grad():
        expected = theirs(x[None])
        expected = expected[0] if isinstance(expected, tuple) else expected  # (gpt-oss's, Llama 4's: with router
        expected = expected.reshape(x.shape)  # scores or logits; Llama 4's flattened to [T, H])
        got = ours(x).float()
        if getattr(layer, "shared_mlp", None) is not None:  # (GraniteMoeShared's, beside the MoE block, summed after)
            expected = expected + layer.shared_mlp(x[None])[0]
        expected = expected.float()
    assert len(set(ours.route(x)[0].flatten().tolist())) == ours.moe.num_experts  # every expert takes tokens
    tolerance = {torch.bfloat16: 1e-3, torch.float16: 1.2e-4}[dtype]
    if variant in ("gpt_oss", "llama4_text") and dtype == torch.float16:  # the CPU's fp16 GEMM rounds HF's x @ W
        tolerance = 1e-3  # over its stacked [E, in, out] experts and our F.linear over [out, in] an ulp apart
    torch.testing.assert_close(got, expected, atol=tolerance * expected.abs().max().item(), rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_gemma4_experts_match_hf(dtype, model_dir_for):
    """Gemma 4's experts (26B-A4B), checked alone in half precision as the MoE layers above: routed on the layer's
    un-normed input, run on its `pre_feedforward_layernorm_2` norm, the same experts chosen and the output equal to
    HF's within a fraction of an ulp at its scale."""
    from softprompt.engine.loader import load_model

    model_dir = model_dir_for("gemma4_moe")
    ours = load_model(model_dir, "cpu", dtype).model.layers[1]
    theirs = hf_peft_model(model_dir, None, dtype=dtype).model.layers[1]
    x = torch.randn(256, ours.moe.gate.in_features, generator=torch.Generator().manual_seed(0)).to(dtype)
    with torch.no_grad():
        _, weights, experts = theirs.router(x)
        expected = theirs.experts(theirs.pre_feedforward_layernorm_2(x), experts, weights).float()
        chosen, ours_weights = ours.moe.route(x)
        got = ours.moe.mix(ours.pre_feedforward_layernorm_2(x), chosen, ours_weights).float()
    assert torch.equal(chosen.sort(dim=-1).values, experts.sort(dim=-1).values)
    assert len(set(chosen.flatten().tolist())) == ours.moe.moe.num_experts  # every expert takes tokens
    tolerance = {torch.bfloat16: 1e-3, torch.float16: 1.2e-4}[dtype]
    torch.testing.assert_close(got, expected, atol=tolerance * expected.abs().max().item(), rtol=0)


@pytest.mark.parametrize("variant, names", [
    ("olmo2", ("post_attention_layernorm", "post_feedforward_layernorm")),
    ("exaone4", ("post_attention_layernorm", "post_feedforward_layernorm")),
    ("gpt_oss", ("input_layernorm", "post_attention_layernorm"))])
def test_post_norms_round_as_hf_in_half_precision(variant, names, model_dir_for):
    """OLMo 2's and gpt-oss's RMSNorms scale in fp32 before casting back, EXAONE 4's (Llama's) casts first: in bf16
    they round differently, below the logit tolerances above, so each model's norms are held to HF's bit for bit."""
    from softprompt.engine.loader import load_model

    model_dir = model_dir_for(variant)
    ours = load_model(model_dir, "cpu", torch.bfloat16).model.layers[0]
    theirs = hf_peft_model(model_dir, None, dtype=torch.bfloat16).model.layers[0]
    x = torch.randn(32, ours.post_attention_layernorm.weight.shape[0], generator=torch.Generator().manual_seed(0)) * 3
    with torch.no_grad():
        for name in names:
            assert torch.equal(getattr(ours, name)(x.bfloat16()), getattr(theirs, name)(x.bfloat16())), name


@pytest.mark.parametrize("variant", ["deepseek_v2_dense", "deepseek_v3_dense", "glm4_moe_lite", "mistral4",
                                     "minicpm3"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_latent_attention_rounds_as_hf_in_half_precision(variant, dtype, model_dir_for):
    """DeepSeek's latent attention in half precision, on the same input and causal SDPA: bit for bit HF's (V2
    rotates in fp32 as complex numbers, V3 in the model dtype; the values padded to the keys' width for the pool;
    Mistral 4's queries scaled by position). Below the logit tolerances above, so held alone."""
    import torch.nn.functional as F

    from softprompt.engine.loader import load_model

    model_dir = model_dir_for(variant)
    ours, hf = load_model(model_dir, "cpu", dtype), hf_peft_model(model_dir, None, dtype=dtype)
    x = torch.randn(1, 40, ours.config.hidden_size, generator=torch.Generator().manual_seed(0)).to(dtype)
    positions = torch.arange(40)  # (past Mistral 4's original 16 positions: its query scale grows)
    scale = ours.config.attention_scale

    def attention(layer, q, k, v):
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale).transpose(0, 1)

    attn = ours.model.layers[0].self_attn
    with torch.no_grad():
        expected = hf.model.layers[0].self_attn(hidden_states=x, attention_mask=None, position_ids=positions[None],
                                                position_embeddings=hf.model.rotary_emb(x, positions[None]))[0][0]
        got = attn(0, attn.project_qkv(x[0]), (ours.rope_cos[positions], ours.rope_sin[positions]), attention,
                   ours.query_scale(positions, dtype))
    assert torch.equal(got, expected)


@pytest.mark.parametrize("rope", [
    {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64},
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
])
def test_rope_scaling_types_match_hf(rope, tmp_path):
    """Positions past the original context, where the scaled frequencies matter."""
    from softprompt.testing import build_tiny_checkpoint

    d = build_tiny_checkpoint("llama", tmp_path / rope["rope_type"], rope_parameters=rope, with_tokenizer=False)
    ids = random_ids(120, 7)
    with torch.no_grad():
        expected = hf_peft_model(d, None)(input_ids=torch.tensor([ids])).logits[0].float()
    engine = Engine(d, device="cpu", dtype="float32", backend="reference")
    torch.testing.assert_close(engine.reference.logits(None, ids), expected, atol=FP32_ATOL, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_apply_rotary_is_hf_rotate_half_bit_for_bit(dtype):
    """Our half-by-half RoPE gives exactly HF's `q * cos + rotate_half(q) * sin`, rounding included."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from softprompt.engine.models.common import apply_rotary, rotary_cos_sin

    gen = torch.Generator().manual_seed(0)
    t, heads, dim = 37, 6, 64
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    cos, sin = rotary_cos_sin(inv_freq, 1.0, torch.arange(100, 100 + t), dtype)
    qkv = torch.randn(t, heads + 2, dim, generator=gen).to(dtype)
    x = qkv[:, :heads]  # a strided view, as the model hands it over
    want, _ = apply_rotary_pos_emb(x.transpose(0, 1)[None], x.transpose(0, 1)[None], cos[None], sin[None])
    assert torch.equal(apply_rotary(x, cos, sin), want[0].transpose(0, 1))


@pytest.mark.parametrize("variant", ["glm4_moe", "minimax_m2", "afmoe", "kolibri1", "kimi_linear"])
def test_router_correction_bias_is_held_in_hfs_dtype(variant, model_dir_for):
    """GLM-4.5's (DeepSeek-V3's) score-correction bias stays fp32 in a bf16 model, MiniMax-M2's is cast to bf16, and
    AFMoE's and Kimi Linear's are cast before transformers 5.24 and fp32 since, as transformers holds each: a bias
    rounded otherwise can pick other experts where two nearly tie."""
    from softprompt.engine.config import hf_router_weights_in_fp32
    from softprompt.engine.loader import load_model

    model_dir = model_dir_for(variant)
    ours = load_model(model_dir, "cpu", torch.bfloat16).model.layers[1].mlp.gate.e_score_correction_bias
    layer = hf_peft_model(model_dir, None, dtype=torch.bfloat16).model.layers[1].mlp
    theirs = getattr(layer, "e_score_correction_bias", getattr(layer, "expert_bias", None))  # (AFMoE's name)
    theirs = layer.gate.e_score_correction_bias if theirs is None else theirs
    in_fp32 = variant in ("glm4_moe", "kolibri1") or (
        variant in ("afmoe", "kimi_linear") and hf_router_weights_in_fp32())
    assert ours.dtype == theirs.dtype == (torch.float32 if in_fp32 else torch.bfloat16)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("variant", ["deepseek_v3", "deepseek_v2", "glm4_moe", "dots1", "solar_open", "exaone_moe",
                                     "hy_v3", "ernie4_5_moe", "flint", "hunyuan_v1_moe", "mistral4", "qwen3_moe",
                                     "nemotron_h", "mimo_v2_flash", "axk1", "kimi_linear"])
def test_router_weight_is_held_in_hfs_dtype(variant, model_dir_for):
    """Each router's weight in a bf16 model is held in the dtype the installed transformers holds it in (fp32 for
    ERNIE 4.5's, Flint's and Hunyuan's; for DeepSeek-V2/V3's kin and Nemotron-H's from transformers 5.24 on; bf16
    otherwise), with HF's values: an fp32 checkpoint's router rounded otherwise picks other experts at near-ties."""
    from softprompt.engine.loader import load_model

    model_dir = model_dir_for(variant)
    ours_model = load_model(model_dir, "cpu", torch.bfloat16)
    hf = hf_peft_model(model_dir, None, dtype=torch.bfloat16)
    layer = ours_model.config.moe.sparse_layers[0]
    if variant == "nemotron_h":
        ours, hf_layer = ours_model.backbone.layers[layer].mixer.gate.weight, hf.model.layers[layer].mixer
    else:
        ours, hf_layer = ours_model.model.layers[layer].mlp.gate.weight, hf.model.layers[layer].mlp
    theirs = [p for name, p in hf_layer.named_parameters()
              if name.endswith(("gate.weight", "gate.wg.weight", "router.weight")) and p.shape == ours.shape
              and "expert" not in name]
    assert len(theirs) == 1, [name for name, _ in hf_layer.named_parameters()]
    assert ours.dtype == theirs[0].dtype
    assert torch.equal(ours, theirs[0])


def test_axk1_checkpoint_as_released_matches_hf(model_dir_for, adapter_for, tmp_path):
    """A.X K1's releases route without a correction bias (transformers leaves it zero) and store the MoE output norm
    on every layer, the dense ones too (where it goes unused): such a checkpoint loads, and its fp32 logits with a
    prompt-tuning adapter are HF + PEFT's; without the bias they move well past the tolerance (the test can fail)."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    source = model_dir_for("axk1")
    released = tmp_path / "released"
    shutil.copytree(source, released)
    with safe_open(str(source / "model.safetensors"), framework="pt") as f:
        state = {key: f.get_tensor(key) for key in f.keys() if not key.endswith("e_score_correction_bias")}
    assert len(state) < len(list(safe_open(str(source / "model.safetensors"), framework="pt").keys()))
    state["model.layers.0.post_mlp_layernorm.weight"] = torch.full((64,), 3.0)  # (a dense layer's: unused)
    save_file(state, released / "model.safetensors", metadata={"format": "pt"})
    ids = random_ids(24, 5)
    adapter = adapter_for("axk1")
    results = {}
    for name, d in (("source", source), ("released", released)):
        engine = Engine(d, device="cpu", dtype="float32", backend="reference")
        prompt = engine.add_prompt("task", adapter)
        with torch.no_grad():
            hf = hf_peft_model(d, adapter)(input_ids=torch.tensor([ids])).logits[0, -24:]
        results[name] = engine.reference.logits(prompt.embeds, ids)
        torch.testing.assert_close(results[name], hf, atol=FP32_ATOL, rtol=0)
    assert (results["source"] - results["released"]).abs().max() > 100 * FP32_ATOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_longcat_router_is_held_as_hf_holds_it(dtype, model_dir_for):
    """LongCat-Flash's router weight is kept in fp32 in an fp16 model only (transformers' `_keep_in_fp32_modules`),
    and its correction bias is cast as the model is: ours are HF's, dtype and values, in both half precisions."""
    from softprompt.engine.loader import load_model

    model_dir = model_dir_for("longcat_flash")
    ours = load_model(model_dir, "cpu", dtype).model.layers[1].mlp.gate
    theirs = hf_peft_model(model_dir, None, dtype=dtype).model.layers[1].mlp.router
    assert ours.weight.dtype == (torch.float32 if dtype == torch.float16 else dtype)
    for mine, hf in ((ours.weight, theirs.classifier.weight),
                     (ours.e_score_correction_bias, theirs.e_score_correction_bias)):
        assert mine.dtype == hf.dtype
        assert torch.equal(mine, hf)


def test_kimi_linear_dt_bias_is_held_in_hfs_dtype(model_dir_for):
    """Kimi Linear's forget-gate dt_bias in a bf16 model: cast before transformers 5.24, fp32 since, as transformers
    holds it (its values then HF's)."""
    from softprompt.engine.config import hf_router_weights_in_fp32
    from softprompt.engine.loader import load_model

    model_dir = model_dir_for("kimi_linear")
    ours = load_model(model_dir, "cpu", torch.bfloat16).model.layers[0].self_attn.dt_bias
    theirs = hf_peft_model(model_dir, None, dtype=torch.bfloat16).model.layers[0].self_attn.forget_gate.dt_bias
    assert ours.dtype == theirs.dtype == (torch.float32 if hf_router_weights_in_fp32() else torch.bfloat16)
    assert torch.equal(ours, theirs)


def test_flint_keeps_its_sinks_and_router_in_fp32(model_dir_for):
    """Flint's attention sinks (`softmax_offset`) and router weights stay fp32 in a bf16 model, as transformers keeps
    them (`_keep_in_fp32_modules_strict`), equal to HF's."""
    from softprompt.engine.loader import load_model

    model_dir = model_dir_for("flint")
    ours = load_model(model_dir, "cpu", torch.bfloat16).model.layers[1]
    theirs = hf_peft_model(model_dir, None, dtype=torch.bfloat16).model.layers[1]
    assert ours.self_attn.sinks.dtype == ours.mlp.gate.weight.dtype == torch.float32
    assert torch.equal(ours.self_attn.sinks, theirs.self_attn.sinks)
    assert torch.equal(ours.mlp.gate.weight, theirs.mlp.gate.weight)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_falcon_h1_scales_input_ids_not_peft_rows(backend, model_dir_for, adapter_for):
    """Falcon-H1 scales the embeddings of the input ids it is given (embedding_multiplier), not inputs_embeds: under
    PEFT's prompt learning its tokens come unscaled after the prompt's rows. So the engine scales the tokens of a
    request without a prompt or with a text prompt (transformers' input ids: the text's tokens, then the input's),
    and not those after a soft prompt; all three in one batch, each equal to its transformers / PEFT counterpart."""
    from softprompt.engine.tokenizer import load_tokenizer

    model_dir, adapter = model_dir_for("falcon_h1"), adapter_for("falcon_h1")
    engine = Engine(model_dir, device="cpu", dtype="float32", backend=backend)
    engine.add_prompt("soft", adapter)
    text_ids = load_tokenizer(model_dir).encode("the cat sat on", add_special_tokens=False)
    engine.add_prompt("text", text="the cat sat on")
    ids = random_ids(11, 8)
    base, peft_model = hf_peft_model(model_dir, None), hf_peft_model(model_dir, adapter)
    with torch.no_grad():
        bare = base(input_ids=torch.tensor([ids])).logits[0].float()
        soft = peft_model(input_ids=torch.tensor([ids])).logits[0, -len(ids):].float()
        text = base(input_ids=torch.tensor([text_ids + ids])).logits[0, -len(ids):].float()
        unscaled = base(inputs_embeds=base.get_input_embeddings()(torch.tensor([ids]))).logits[0].float()
    assert (unscaled - bare).abs().max() > 0.1  # the multiplier matters: scaling the wrong rows fails below
    got = engine.sequence_logits([(None, ids), ("soft", ids), ("text", ids)])
    for g, expected in zip(got, (bare, soft, text)):
        torch.testing.assert_close(g, expected, atol=FP32_ATOL, rtol=0)
