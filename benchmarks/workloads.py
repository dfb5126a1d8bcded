"""Benchmark workloads: a tiny model, its tasks' soft prompts and a seeded request stream."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from softprompt.testing import build_prompt_tensor, build_tiny_checkpoint


@dataclass(frozen=True)
class ModelShape:
    arch: str = "llama"
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 688
    vocab_size: int = 32000
    max_positions: int = 512

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


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


@dataclass(frozen=True)
class WorkItem:
    index: int
    task: int
    input_ids: list[int]


@dataclass
class Workload:
    config: WorkloadConfig
    model_dir: Path
    prompts: list[torch.Tensor]  # [P, hidden] per task
    items: list[WorkItem]  # in arrival order

    @property
    def input_lengths(self) -> list[int]:
        return [len(it.input_ids) for it in self.items]

    @staticmethod
    def task_name(task: int) -> str:
        return f"task{task}"


def build_workload(config: WorkloadConfig, root: Path) -> Workload:
    """Save the tiny checkpoint under `root` and draw the prompts and requests (all seeded)."""
    m = config.model
    model_dir = build_tiny_checkpoint(
        m.arch, root / "model", hidden_size=m.hidden_size, num_layers=m.num_layers, num_heads=m.num_heads,
        num_kv_heads=m.num_kv_heads, intermediate_size=m.intermediate_size, vocab_size=m.vocab_size,
        max_positions=m.max_positions, with_tokenizer=False, seed=config.seed,
    )
    prompts = [build_prompt_tensor(m.hidden_size, config.prompt_len, seed=i) for i in range(config.num_tasks)]
    gen = torch.Generator().manual_seed(config.seed)
    items = []
    for i in range(config.num_requests):
        n = int(torch.randint(config.min_input, config.max_input + 1, (1,), generator=gen))
        ids = torch.randint(4, m.vocab_size, (n,), generator=gen).tolist()  # skip the special ids 0..3
        items.append(WorkItem(i, i % config.num_tasks, ids))
    return Workload(config, model_dir, prompts, items)
