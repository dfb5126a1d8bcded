"""End to end: backend="triton" gives the reference path's greedy tokens (fp32), on every architecture family.

On the CPU this runs the kernels under the Triton interpreter (set by this folder's conftest), so it stays tiny.
"""

from __future__ import annotations

import pytest
import torch

from softprompt import Engine
from softprompt.engine.errors import SoftPromptError
from softprompt.testing import build_p_tuning_adapter, build_prefix_tuning_adapter

from ..runtime_helpers import assert_no_leaks, make_requests, register_tasks, run
from ..test_block_cache import engines, hits_of, with_instruction
from ..test_soak import soak, tight_engine

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("variant, seed, cuda_graphs",
                         [("llama", 10, False), ("bloom", 11, True), ("mistral_window", 12, True),
                          ("gemma3", 13, True), ("qwen2_moe", 14, True), ("opt_post_norm", 15, True),
                          ("gemma4_unified", 16, True)],
                         ids=["llama-eager", "bloom-padded-decode", "sliding-window-padded-decode",
                              "gemma3-unfused-input-padded-decode", "moe-padded-decode",
                              "opt-post-norm-unfused-input-padded-decode", "kv-shape-per-layer-padded-decode"])
def test_triton_backend_under_random_traffic(variant, seed, cuda_graphs, model_dir_for):
    """tests/test_soak.py's random traffic (arrivals, aborts, tasks added and removed, chunked prefill, prefix
    eviction, preemption) on the Triton kernels; cuda_graphs=True on the CPU runs the padded decode steps."""
    d = model_dir_for(variant)
    eng = soak(d, seed, steps=16 if DEVICE == "cpu" else 140, backend="triton", device=DEVICE,
               cuda_graphs=cuda_graphs, **tight_engine(d, blocks=28))
    assert eng.scheduler.num_preemptions > 0


@pytest.mark.parametrize("variant", ["llama", "bloom"])
def test_triton_backend_reads_cached_request_blocks(variant, model_dir_for):
    """Requests that begin like earlier ones start after the cached blocks: the prefill kernel reads them in place."""
    ref, eng = engines(model_dir_for(variant), backend="triton", device=DEVICE)
    eng.generate([with_instruction("a", [7]), with_instruction(None, [7])])
    later = [with_instruction("a", [9, 10]), with_instruction(None, []), with_instruction("a", [])]
    tokens, hits = hits_of(eng, later)
    assert hits == 3 * 8 and tokens == [o.token_ids for o in ref.generate(later)]
    assert_no_leaks(eng)


@pytest.mark.parametrize("variant", ["llama", "bloom"])
def test_triton_backend_scores_continuations_after_shared_context_blocks(variant, model_dir_for):
    """Engine.score: the continuations read their context's full blocks in place (engine/scoring.py)."""
    ref, eng = engines(model_dir_for(variant), backend="triton", device=DEVICE)
    for prompt in ("a", None):
        got = eng.score(prompt, list(range(30, 39)), [[5], [6, 7, 8]])  # 9 tokens: two shared blocks of 4
        want = ref.score(prompt, list(range(30, 39)), [[5], [6, 7, 8]])
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=1e-4, rtol=0)
    assert_no_leaks(eng)


@pytest.mark.parametrize("variant", ["llama", "qwen2", "qwen3", "phi3_longrope", "gpt2", "bloom", "bloom_post_norm",
                                     "qwen2_window", "smollm3", "gemma", "gemma2", "gemma3", "pythia",
                                     "gpt_neox_serial", "gpt2_inverse_scale", "mixtral", "qwen2_moe", "olmoe",
                                     "granitemoe", "phi", "phi_qk_norm_gqa", "opt", "opt_post_norm", "gpt_bigcode",
                                     "granite", "stablelm", "stablelm_parallel", "starcoder2", "olmo", "olmo2",
                                     "olmo3", "exaone4", "falcon", "falcon_new_arch", "falcon_serial", "gptj",
                                     "cohere_qk_norm", "cohere2", "glm", "glm4", "ernie4_5", "ministral3",
                                     "gpt_neo", "helium", "arcee", "nemotron", "cwm",
                                     "hyperclovax", "jais2", "apertus", "codegen", "xglm",
                                     "biogpt", "qwen2_5_vl", "qwen3_vl", "exaone4_5",
                                     "glm4_moe", "ernie4_5_moe", "qwen3_vl_moe",
                                     "deepseek_v3", "deepseek_v2", "glm4_moe_lite", "mistral4",
                                     "mistral3_mistral4", "youtu", "minicpm3", "dots1",
                                     "vaultgemma", "hunyuan_v1_dense", "hunyuan_v1_moe",
                                     "solar_open", "exaone_moe", "granitemoeshared", "flex_olmo",
                                     "mellum", "gpt_oss", "minimax_m2", "llama4_text", "phimoe",
                                     "afmoe", "granite_swa", "granitemoe_swa", "cohere2_moe_rms",
                                     "kolibri1", "flint", "deepseek_v32", "mpt",
                                     "persimmon", "dbrx", "nanochat",
                                     "hy_v3", "gemma4", "gemma4_moe", "gemma4_unified", "laguna", "qwen3_5",
                                     "lfm2", "granite_hybrid", "nemotron_h",
                                     "bamba", "mamba", "mamba2", "jamba", "lfm2_moe", "olmo_hybrid", "falcon_h1",
                                     "lfm3", "mimo_v2_flash", "axk1", "longcat_flash",
                                     "kimi_linear"])
def test_triton_backend_matches_reference(variant, model_dir_for):
    d = model_dir_for(variant)
    ref = Engine(d, device=DEVICE, dtype="float32", backend="reference")
    # (48 sequences at most: on CUDA, 9 decode graphs to capture at start-up instead of 35)
    eng = Engine(d, device=DEVICE, dtype="float32", backend="triton", max_batched_tokens=48, max_num_seqs=48)
    names = register_tasks([ref, eng], 3) + [None]
    n = 5 if DEVICE == "cpu" else 40
    specs = make_requests(names, n, seed=30, max_new_tokens=4 if DEVICE == "cpu" else 12)
    assert run(eng, specs) == run(ref, specs)  # prefill kernel (incl. chunks), cascade decode kernel
    assert_no_leaks(eng)


@pytest.mark.parametrize("variant", ["llama", "bloom"])
def test_triton_backend_serves_p_tuning_and_prefix_tuning_adapters(variant, model_dir_for, tmp_path):
    """A prefix-tuning adapter's K/V go into the pool as they are and the kernels read them like computed ones."""
    pytest.importorskip("peft")
    d = model_dir_for(variant)
    adapters = {"ptune": build_p_tuning_adapter(d, tmp_path / "ptune", num_virtual_tokens=5),
                "kv": build_prefix_tuning_adapter(d, tmp_path / "kv", num_virtual_tokens=7, seed=1)}
    ref = Engine(d, device=DEVICE, dtype="float32", backend="reference")
    eng = Engine(d, device=DEVICE, dtype="float32", backend="triton", block_size=4)
    for e in (ref, eng):
        for name, path in adapters.items():
            e.add_prompt(name, path)
    specs = make_requests(["kv", "ptune", None, "kv"], 4, seed=31, max_new_tokens=4)
    assert run(eng, specs) == run(ref, specs)
    assert_no_leaks(eng)


def test_triton_backend_needs_power_of_two_blocks(model_dir_for):
    with pytest.raises(SoftPromptError, match="power-of-two"):
        Engine(model_dir_for("llama"), device=DEVICE, backend="triton", block_size=12)


def test_no_decode_graphs_with_linear_attention_layers(model_dir_for):
    """Qwen3.5's linear-attention layers look up each sequence's recurrent state on the host: cuda_graphs=True is
    refused naming them, and the default leaves decode graphs off."""
    d = model_dir_for("qwen3_5")
    with pytest.raises(SoftPromptError, match="linear-attention"):
        Engine(d, device=DEVICE, dtype="float32", backend="triton", cuda_graphs=True)
    assert Engine(d, device=DEVICE, dtype="float32", backend="triton").runner.decode_graphs is None
