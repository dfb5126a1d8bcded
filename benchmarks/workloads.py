"""Benchmark workloads: a random-weight model, its tasks' soft prompts and a seeded request stream, and the registry
of named workloads (C1, SERVE-CPU, RAY-CPU on the CPU; W1, W2, B560, SERVE-W1 on CUDA)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from softprompt.testing import build_prompt_tensor, build_tiny_checkpoint

LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3", "phi3")  # GQA, a gated MLP of its own width


@dataclass(frozen=True)
class ModelShape:
    arch: str = "llama"  # llama | bloom (anything build_tiny_checkpoint builds)
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2  # ignored by BLOOM/GPT-2 (as many KV heads as heads)
    intermediate_size: int = 688  # BLOOM/GPT-2: 4 x hidden
    vocab_size: int = 32000
    max_positions: int = 512
    tie_word_embeddings: bool | None = None  # None: the architecture's default

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads if self.arch in LLAMA_FAMILY else self.num_heads

    @property
    def ffn_size(self) -> int:
        return self.intermediate_size if self.arch in LLAMA_FAMILY else 4 * self.hidden_size

    @property
    def gated_mlp(self) -> bool:
        return self.arch in LLAMA_FAMILY


@dataclass(frozen=True)
class WorkloadConfig:
    """Many tasks (soft prompts of P rows) over one model; requests cycle through the tasks in arrival order."""

    name: str = "C1"
    model: ModelShape = ModelShape()
    num_tasks: int = 16
    prompt_len: int = 64  # P
    num_requests: int = 64
    min_input: int = 16
    max_input: int = 64  # inclusive
    new_tokens: int = 16
    batch_size: int = 16  # batch size of the hand-written baselines
    seed: int = 0
    device: str = "cpu"  # cpu | cuda
    dtype: str = "float32"
    max_batched_tokens: int = 2048  # the engine's chunked-prefill budget
    agreement_sample: int = 8  # requests whose greedy tokens are checked across systems

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


@dataclass(frozen=True)
class ServingConfig:
    """Poisson arrivals at each rate (requests/s) for `duration_s` seconds (at least `min_requests`), the requests
    taken in turn from the workload's. A finite run hides an overload until the backlog it builds delays the last
    arrivals past the SLO: over a window D, a rate f x capacity ends about D(f - 1) s behind, so D sets how close
    to capacity "held" can tell."""

    rates: tuple[float, ...]
    duration_s: float
    min_requests: int = 8
    ttft_slo_s: float = 1.0  # a rate is "held" when p99 TTFT stays under this
    baseline: bool = True  # also serve with HF mixed-task static batching

    def requests_at(self, rate: float) -> int:
        return max(self.min_requests, round(rate * self.duration_s))


@dataclass(frozen=True)
class ReplicaSetup:
    label: str
    replicas: int
    routing: str  # affinity | round-robin


@dataclass(frozen=True)
class ReplicaBenchConfig:
    setups: tuple[ReplicaSetup, ...] = (
        ReplicaSetup("1 replica", 1, "affinity"),
        ReplicaSetup("2 replicas, round-robin", 2, "round-robin"),
        ReplicaSetup("2 replicas, affinity", 2, "affinity"),
    )
    clients: int = 32  # concurrent HTTP clients
    replica_cpus: float = 1.0  # per replica: its Ray CPUs and torch threads


@dataclass(frozen=True)
class WorkloadSpec:
    """A named workload: what it runs, where, and its --quick variant."""

    name: str
    description: str
    config: WorkloadConfig
    quick: dict[str, Any] = field(default_factory=dict)  # WorkloadConfig overrides for --quick
    quick_model: dict[str, Any] = field(default_factory=dict)  # ModelShape overrides for --quick
    serving: ServingConfig | None = None
    quick_serving: dict[str, Any] = field(default_factory=dict)
    replicas: ReplicaBenchConfig | None = None  # Ray Serve replicas through the HTTP ingress
    targets: dict[str, float] = field(default_factory=dict)  # e.g. {"engine/hf_mixed": 3.5}
    cpu_floor: bool = False  # measure a CPU floor from matmul timings (CPU workloads)

    @property
    def needs_cuda(self) -> bool:
        return self.config.device == "cuda"

    @property
    def kind(self) -> str:
        return "serving" if self.serving is not None else "replicas" if self.replicas is not None else "throughput"

    def resolved(self, quick: bool) -> tuple[WorkloadConfig, ServingConfig | None]:
        """The workload's config (and serving config) with the --quick overrides applied if `quick`."""
        config, serving = self.config, self.serving
        if quick:
            config = dataclasses.replace(config, model=dataclasses.replace(config.model, **self.quick_model),
                                         **self.quick)
            if serving is not None:
                serving = dataclasses.replace(serving, **self.quick_serving)
        return config, serving


LLAMA_1B = ModelShape("llama", hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8, intermediate_size=8192,
                      vocab_size=128256, max_positions=512, tie_word_embeddings=True)  # Llama-3.2-1B's shape
BLOOM_560M = ModelShape("bloom", hidden_size=1024, num_layers=24, num_heads=16, num_kv_heads=16,
                        intermediate_size=4096, vocab_size=250880, max_positions=2048, tie_word_embeddings=True)

C1 = WorkloadConfig()
W1 = WorkloadConfig("W1", LLAMA_1B, num_tasks=32, prompt_len=20, num_requests=256, min_input=64, max_input=256,
                    new_tokens=64, batch_size=64, device="cuda", dtype="bfloat16", max_batched_tokens=8192,
                    agreement_sample=16)
W2 = dataclasses.replace(W1, name="W2", num_tasks=64, prompt_len=256, min_input=16, max_input=64, new_tokens=32)
B560 = dataclasses.replace(W1, name="B560", model=BLOOM_560M)
GPU_QUICK = dict(num_tasks=4, num_requests=16, new_tokens=8, batch_size=8)

WORKLOADS: dict[str, WorkloadSpec] = {spec.name: spec for spec in [
    WorkloadSpec(
        "C1", "CPU fp32: tiny Llama, 16 tasks x P=64, 64 requests (inputs 16-64), 16 new tokens", C1,
        quick=dict(num_tasks=4, num_requests=8, new_tokens=4, batch_size=4), quick_model=dict(vocab_size=2048),
        targets={"engine/hf_mixed": 3.5, "engine/peft": 6.0, "floor_fraction": 0.70}, cpu_floor=True),
    WorkloadSpec(
        "SERVE-CPU", "CPU fp32 serving: C1's model and tasks, Poisson arrivals at 6 rates for 4 s each",
        dataclasses.replace(C1, name="SERVE-CPU", num_requests=256),
        quick=dict(num_tasks=4, num_requests=8, new_tokens=4, batch_size=4), quick_model=dict(vocab_size=2048),
        serving=ServingConfig(rates=(10.0, 20.0, 40.0, 60.0, 80.0, 120.0), duration_s=4.0),
        quick_serving=dict(rates=(20.0, 80.0), duration_s=0.0)),
    WorkloadSpec(
        "RAY-CPU", "CPU fp32 on Ray Serve: C1's model and tasks, 128 requests (32 new tokens) over HTTP from 32 "
        "clients, 1 vs 2 replicas (1 CPU each), task-affinity vs round-robin routing",
        dataclasses.replace(C1, name="RAY-CPU", num_requests=128, new_tokens=32),
        quick=dict(num_tasks=4, num_requests=16, new_tokens=4), quick_model=dict(vocab_size=2048),
        replicas=ReplicaBenchConfig()),
    WorkloadSpec("W1", "GPU bf16: Llama-3.2-1B shape, 32 tasks x P=20, 256 requests (inputs 64-256), 64 new tokens",
                 W1, quick=GPU_QUICK),
    WorkloadSpec("W2", "GPU bf16: Llama-3.2-1B shape, 64 tasks x P=256, 256 requests (inputs 16-64), 32 new tokens",
                 W2, quick=GPU_QUICK),
    WorkloadSpec("B560", "GPU bf16: bloomz-560m shape, W1's traffic (32 tasks x P=20, 256 requests, 64 new tokens)",
                 B560, quick=GPU_QUICK),
    WorkloadSpec(
        "SERVE-W1", "GPU bf16 serving: W1's model and traffic, Poisson arrivals at 6 rates for 5 s each",
        dataclasses.replace(W1, name="SERVE-W1"), quick=GPU_QUICK,
        serving=ServingConfig(rates=(8.0, 16.0, 32.0, 64.0, 128.0, 256.0), duration_s=5.0),
        quick_serving=dict(rates=(8.0, 32.0), duration_s=0.0, min_requests=16)),
]}


def get_workload(name: str) -> WorkloadSpec:
    """The registered workload `name` (case-insensitive); ValueError listing the names otherwise."""
    spec = WORKLOADS.get(name.upper())
    if spec is None:
        raise ValueError(f"unknown workload {name!r}; choose one of {', '.join(WORKLOADS)}")
    return spec


@dataclass(frozen=True)
class WorkItem:
    index: int
    task: int
    input_ids: list[int]


@dataclass
class Workload:
    config: WorkloadConfig
    model_dir: Path
    prompts: list[torch.Tensor]  # [P, hidden] per task, fp32
    items: list[WorkItem]  # in arrival order

    @property
    def input_lengths(self) -> list[int]:
        return [len(it.input_ids) for it in self.items]

    @staticmethod
    def task_name(task: int) -> str:
        return f"task{task}"


def draw_items(config: WorkloadConfig) -> list[WorkItem]:
    """The seeded request stream: input lengths uniform in [min_input, max_input], tasks round-robin."""
    gen = torch.Generator().manual_seed(config.seed)
    items = []
    for i in range(config.num_requests):
        n = int(torch.randint(config.min_input, config.max_input + 1, (1,), generator=gen))
        ids = torch.randint(4, config.model.vocab_size, (n,), generator=gen).tolist()  # skip the special ids 0..3
        items.append(WorkItem(i, i % config.num_tasks, ids))
    return items


def poisson_arrivals(n: int, rate: float, seed: int) -> list[float]:
    """Arrival times (s) of `n` requests of a Poisson process of `rate` per second, starting at 0. The same seed gives
    the same unit-rate gaps at every rate (only their scale changes), so rates are compared on one pattern."""
    rng = random.Random(seed)
    times, t = [], 0.0
    for _ in range(n):
        times.append(t)
        t += rng.expovariate(1.0) / rate
    return times


def _model_key(config: WorkloadConfig) -> str:
    blob = json.dumps({"model": dataclasses.asdict(config.model), "dtype": config.dtype, "seed": config.seed},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def build_workload(config: WorkloadConfig, root: Path) -> Workload:
    """Save the random checkpoint under `root` (reused when `root` already holds one of the same shape, dtype and
    seed) and draw the prompts and requests (all seeded)."""
    m = config.model
    model_dir = root / f"model-{_model_key(config)}"
    if not (model_dir / "config.json").is_file():
        partial = root / f"{model_dir.name}.partial"  # renamed once complete: an interrupted build is never reused
        shutil.rmtree(partial, ignore_errors=True)
        build_tiny_checkpoint(
            m.arch, partial, dtype=config.torch_dtype, hidden_size=m.hidden_size, num_layers=m.num_layers,
            num_heads=m.num_heads, num_kv_heads=m.num_kv_heads, intermediate_size=m.intermediate_size,
            vocab_size=m.vocab_size, max_positions=m.max_positions, tie_word_embeddings=m.tie_word_embeddings,
            with_tokenizer=False, seed=config.seed,
        )
        partial.rename(model_dir)
    prompts = [build_prompt_tensor(m.hidden_size, config.prompt_len, seed=i) for i in range(config.num_tasks)]
    return Workload(config, model_dir, prompts, draw_items(config))
