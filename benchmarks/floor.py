"""A measured CPU floor: the workload's unavoidable matmuls (and attention at mean lengths), timed at its shapes."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from softprompt.engine.models.linear import linear, transposed_storage

from .workloads import Workload, WorkloadConfig

# the ways an fp32 projection can run here: MKL's sgemm through F.linear (what HF and PEFT get, and what the
# issue's floor assumes) and oneDNN on [in, out] storage (what the engine uses)
GEMMS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], Callable]] = {
    "mkl": (lambda w: w, F.linear),
    "onednn": (transposed_storage, linear),
}
ISSUE_GEMM = "mkl"  # the floor the targets are judged against


def gemm_times(rows: int, weights: list[torch.Tensor]) -> dict[str, float]:
    """Seconds for `rows` random inputs through each [out, in] weight in turn, per GEMM of GEMMS."""
    inputs = {w.shape[1]: torch.randn(rows, w.shape[1]) for w in weights}
    times = {}
    for name, (layout, gemm) in GEMMS.items():
        stored = [layout(w) for w in weights]
        times[name] = best_time(lambda: [gemm(inputs[w.shape[1]], w) for w in stored])  # noqa: B023
    return times


def best_time(fn: Callable[[], Any], repeats: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def layer_linears_times(cfg: WorkloadConfig, rows: int) -> dict[str, float]:
    """q/k/v/o, gate/up/down of every layer for `rows` tokens (random weights of the model's shapes), separate or
    fused (qkv, gate+up), whichever is faster, per GEMM."""
    m = cfg.model
    h, q, kv, inter = m.hidden_size, m.num_heads * m.head_dim, m.kv_heads * m.head_dim, m.ffn_size
    mlp = [(h, inter), (h, inter), (inter, h)] if m.gated_mlp else [(h, inter), (inter, h)]
    fused_mlp = [(h, 2 * inter), (inter, h)] if m.gated_mlp else mlp
    layouts = [[(h, q), (h, kv), (h, kv), (q, h), *mlp],  # (in, out)
               [(h, q + 2 * kv), (q, h), *fused_mlp]]
    per_layout = [gemm_times(rows, [torch.randn(n, k) for _ in range(m.num_layers) for k, n in shapes])
                  for shapes in layouts]
    return {name: min(times[name] for times in per_layout) for name in GEMMS}


def attention_time(cfg: WorkloadConfig, batch: int, queries: int, prefix: int, own_keys: int) -> float:
    """SDPA (GQA) for `batch` sequences of `queries` new tokens over `prefix` visible + `own_keys` causal keys,
    every layer."""
    m = cfg.model
    q = torch.randn(batch, m.num_heads, queries, m.head_dim)
    k = torch.randn(batch, m.kv_heads, prefix + own_keys, m.head_dim)
    own_q = torch.arange(own_keys - queries, own_keys)
    mask = torch.cat([torch.ones(queries, prefix, dtype=torch.bool),
                      torch.arange(own_keys)[None, :] <= own_q[:, None]], dim=1)

    def run() -> None:
        for _ in range(m.num_layers):
            F.scaled_dot_product_attention(q, k, k, attn_mask=mask, enable_gqa=True)

    return best_time(run)


def cpu_floor(workload: Workload) -> dict[str, Any]:
    """Seconds of the unavoidable matmuls (+ attention at mean lengths): each prefix once, each input token,
    each output token (LM head on the last prefill row and on every decode row). The parts and total use MKL's
    GEMM, as the issue's floor does; `fastest_gemm` holds the same with the faster GEMM for each part."""
    cfg, m = workload.config, workload.config.model
    reqs, steps = cfg.num_requests, cfg.new_tokens - 1  # the last output token is never fed back
    mean_in = round(sum(workload.input_lengths) / reqs)
    decode = layer_linears_times(cfg, reqs)
    head = gemm_times(reqs, [torch.randn(m.vocab_size, m.hidden_size)])
    gemm_parts = {
        "prefix_linears": layer_linears_times(cfg, cfg.num_tasks * cfg.prompt_len),
        "input_linears": layer_linears_times(cfg, sum(workload.input_lengths)),
        "decode_linears": {name: steps * t for name, t in decode.items()},
        "lm_head": {name: cfg.new_tokens * t for name, t in head.items()},
    }
    attention = {
        "prefix_attention": attention_time(cfg, cfg.num_tasks, cfg.prompt_len, 0, cfg.prompt_len),
        "input_attention": attention_time(cfg, reqs, mean_in, cfg.prompt_len, mean_in),
        "decode_attention": sum(attention_time(cfg, reqs, 1, cfg.prompt_len, mean_in + s + 1) for s in range(steps)),
    }
    parts: dict[str, Any] = {k: v[ISSUE_GEMM] for k, v in gemm_parts.items()} | attention
    parts["total"] = sum(parts.values())
    fastest = {k: min(v.values()) for k, v in gemm_parts.items()} | attention
    fastest["total"] = sum(fastest.values())
    parts["fastest_gemm"] = fastest
    return parts
