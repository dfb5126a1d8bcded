"""The engine on CUDA (skipped without a GPU): fp32 greedy tokens equal the reference; bf16 agrees on decisive tokens."""

from __future__ import annotations

import pytest
import torch

from softprompt import Engine, SamplingParams

from .runtime_helpers import assert_no_leaks, make_requests, register_tasks, run
from .test_soak import soak, tight_engine

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("variant", ["llama", "qwen2", "qwen3", "phi3_longrope", "mistral_window", "gemma2", "gemma3",
                                     "pythia", "phi", "stablelm_parallel", "falcon_new_arch", "opt", "gpt2", "bloom",
                                     "mixtral"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_cuda_fp32_matches_reference(variant, backend, model_dir_for):
    d = model_dir_for(variant)
    ref = Engine(d, device="cuda", dtype="float32", backend="reference")
    # 48 sequences at most (the 40 requests all fit): 9 CUDA-graph buckets to capture at start-up, not 35
    eng = Engine(d, device="cuda", dtype="float32", backend=backend, max_num_seqs=48)
    if backend == "triton":  # CUDA graphs by default, except for mixtures of experts (routed on the host)
        assert (eng.runner.decode_graphs is None) == (eng.config.moe is not None)
    names = register_tasks([ref, eng], 6) + [None]
    specs = make_requests(names, 40, seed=40, max_new_tokens=12)
    assert run(eng, specs) == run(ref, specs)
    assert_no_leaks(eng)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_cuda_bf16_close_to_fp32(backend, model_dir_for):
    d = model_dir_for("llama")
    eng = Engine(d, device="cuda", dtype="bfloat16", backend=backend)
    truth = Engine(d, device="cuda", dtype="float32", backend="reference")
    names = register_tasks([eng, truth], 4)
    specs = make_requests(names, 16, seed=41, max_new_tokens=1)
    first_tokens = [t[0] for t in run(eng, specs)]
    expected = [t[0] for t in run(truth, specs)]
    agree = sum(a == b for a, b in zip(first_tokens, expected)) / len(specs)
    assert agree >= 0.8  # bf16 rounding can flip near-ties; most first tokens must agree
    assert_no_leaks(eng)


@pytest.mark.parametrize("variant", ["llama", "gpt2", "bloom"])
def test_cuda_graph_decode_matches_eager(variant, model_dir_for):
    """Decode steps replayed from CUDA graphs (the triton backend's default on CUDA) == the same steps launched
    eagerly, over batch sizes that move across buckets as requests of different lengths finish."""
    d = model_dir_for(variant)
    eager = Engine(d, device="cuda", dtype="float32", backend="triton", cuda_graphs=False)
    graphed = Engine(d, device="cuda", dtype="float32", backend="triton")
    names = register_tasks([eager, graphed], 5) + [None]
    specs = make_requests(names, 37, seed=42)
    for i, spec in enumerate(specs):
        spec["sampling"] = SamplingParams(max_new_tokens=1 + i % 11, ignore_eos=True)
    assert run(graphed, specs) == run(eager, specs)
    graphs = graphed.runner.decode_graphs
    assert eager.runner.decode_graphs is None and graphs.replays > 0 and len(graphs.graphs) >= 2
    assert_no_leaks(graphed)


@pytest.mark.parametrize("variant", ["llama", "bloom"])
def test_cuda_random_traffic_equals_the_reference(variant, model_dir_for):
    """tests/test_soak.py's traffic on CUDA (the torch backend; tests/kernels runs it on the triton backend)."""
    d = model_dir_for(variant)
    eng = soak(d, 20, steps=140, device="cuda", **tight_engine(d))
    assert eng.scheduler.num_preemptions > 0 and eng.block_cache.stats.hit_tokens > 0
