"""A roofline for a workload: the FLOPs and bytes of the least work any system must do (from the model's shape and
the workload's token counts), over a device's assumed peaks."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from .workloads import ModelShape, Workload


@dataclass(frozen=True)
class DevicePeak:
    name: str
    flops: float  # dense FLOP/s at the workload's dtype
    bytes_per_s: float  # memory bandwidth


# Datasheet peaks for dense bf16/fp16 tensor-core math (no sparsity) and HBM bandwidth.
PEAKS = {
    "h100-sxm": DevicePeak("H100 SXM bf16 dense", 989e12, 3.35e12),
    "h100-pcie": DevicePeak("H100 PCIe bf16 dense", 756e12, 2.0e12),
    "h200": DevicePeak("H200 SXM bf16 dense", 989e12, 4.8e12),
}


def peak_for(device_name: str) -> DevicePeak | None:
    """The assumed peaks of a CUDA device by name ("NVIDIA H100 80GB HBM3" -> H100 SXM); None if unknown."""
    name = device_name.lower()
    if "h200" in name:
        return PEAKS["h200"]
    if "h100" in name:
        return PEAKS["h100-pcie"] if "pcie" in name else PEAKS["h100-sxm"]
    return None


@dataclass(frozen=True)
class Phase:
    flops: float
    bytes: float

    def seconds(self, peak: DevicePeak) -> float:
        return max(self.flops / peak.flops, self.bytes / peak.bytes_per_s)


def layer_linear_params(m: ModelShape) -> int:
    """Weights of one decoder layer's matmuls: q, k, v, o and the MLP (gate, up, down or fc_in, fc_out)."""
    q, kv = m.num_heads * m.head_dim, m.kv_heads * m.head_dim
    return m.hidden_size * (q + 2 * kv) + q * m.hidden_size + (3 if m.gated_mlp else 2) * m.hidden_size * m.ffn_size


def ideal_phases(workload: Workload) -> list[Phase]:
    """One prefill pass (every task's prefix once, every input token, the first output token's LM head), then one
    decode pass per later output token with all requests batched. Bytes: the weights once per pass, each token's K/V
    written once, the K/V each pass attends read once (a task's prefix once per pass, shared by its requests)."""
    cfg, m = workload.config, workload.config.model
    size = torch.empty((), dtype=cfg.torch_dtype).element_size()
    h, d, layers = m.hidden_size, m.head_dim, m.num_layers
    layer_params = layer_linear_params(m)
    kv = m.kv_heads * d
    linear_flops = 2 * layers * layer_params  # per token
    head_flops = 2 * m.vocab_size * h  # per sampled row
    pair_flops = 4 * m.num_heads * d * layers  # per (query, key): QK^T and PV
    weight_bytes = (layers * layer_params + m.vocab_size * h) * size
    kv_token = layers * 2 * kv * size
    reqs, tasks, p = cfg.num_requests, cfg.num_tasks, cfg.prompt_len
    inputs = workload.input_lengths

    prefill_tokens = tasks * p + sum(inputs)
    prefill_pairs = tasks * p * (p + 1) // 2 + sum(n * p + n * (n + 1) // 2 for n in inputs)
    phases = [Phase(linear_flops * prefill_tokens + pair_flops * prefill_pairs + head_flops * reqs,
                    weight_bytes + prefill_tokens * (h * size + 2 * kv_token))]
    for s in range(1, cfg.new_tokens):
        keys = sum(p + n + s for n in inputs)
        reads = tasks * p + sum(n + s - 1 for n in inputs)
        phases.append(Phase((linear_flops + head_flops) * reqs + pair_flops * keys,
                            weight_bytes + reqs * (h * size + kv_token) + reads * kv_token))
    return phases


def roofline(workload: Workload, device_name: str, seconds: dict[str, float],
             peak: DevicePeak | None = None) -> dict[str, Any]:
    """Total FLOPs and bytes, and where the device's peaks are known, the roofline time and each system's fraction
    of it (roofline seconds / measured seconds). `peak` overrides the assumed peaks of `device_name`."""
    phases = ideal_phases(workload)
    result: dict[str, Any] = {
        "flops": sum(ph.flops for ph in phases), "bytes": sum(ph.bytes for ph in phases),
        "prefill": asdict(phases[0]),
        "decode": {"flops": sum(ph.flops for ph in phases[1:]), "bytes": sum(ph.bytes for ph in phases[1:])},
        "peak": None, "seconds": None, "fraction": None,
    }
    peak = peak or peak_for(device_name)
    if peak is not None:
        floor = sum(ph.seconds(peak) for ph in phases)
        result.update(peak=asdict(peak), seconds=floor, fraction={k: floor / v for k, v in seconds.items()})
    return result
