"""Our engine as a benchmark system (the baselines live in baselines.py)."""

from __future__ import annotations

import torch

from softprompt import Engine, Request, SamplingParams

from .workloads import WorkItem, Workload, WorkloadConfig


def kv_pool_bytes(config: WorkloadConfig, block_size: int = 16, headroom: float = 1.25) -> int:
    """Enough KV for every prefix and every request resident at once (+ headroom), so the engine never preempts and
    leaves the rest of a GPU to the baselines that share the process."""
    m = config.model
    itemsize = torch.empty((), dtype=config.torch_dtype).element_size()
    per_block = m.num_layers * 2 * block_size * m.kv_heads * m.head_dim * itemsize
    blocks = config.num_tasks * -(-config.prompt_len // block_size)
    blocks += config.num_requests * -(-(config.max_input + config.new_tokens) // block_size)
    return int(per_block * blocks * headroom)


class EngineSystem:
    """Our engine; `reset` re-registers every prompt and empties the request-block cache, so the next run computes
    prefixes and inputs cold. On the CPU the KV pool
    keeps the engine's default size; on CUDA it is sized to the workload (see `kv_pool_bytes`)."""

    def __init__(self, workload: Workload, backend: str = "torch", precompute: bool = False, name: str = "engine"):
        cfg = workload.config
        self.name = name
        self.workload = workload
        self.backend = backend
        self.label = f'engine (backend="{backend}")'
        kv_bytes = kv_pool_bytes(cfg) if cfg.device == "cuda" else None
        self.engine = Engine(workload.model_dir, device=cfg.device, dtype=cfg.dtype, backend=backend,
                             kv_cache_bytes=kv_bytes, max_batched_tokens=cfg.max_batched_tokens)
        self.prefix_misses: list[int] = []
        for task, prompt in enumerate(workload.prompts):
            self.engine.add_prompt(Workload.task_name(task), prompt, precompute=precompute)

    def reset(self) -> None:
        if self.engine.block_cache is not None:  # no request of a timed run finds another run's blocks
            self.engine.block_cache.clear()
        for task, prompt in enumerate(self.workload.prompts):
            self.engine.remove_prompt(Workload.task_name(task))
            self.engine.add_prompt(Workload.task_name(task), prompt, precompute=False)

    def request(self, item: WorkItem, request_id: str | None = None) -> Request:
        params = SamplingParams(max_new_tokens=self.workload.config.new_tokens, ignore_eos=True)
        return Request(prompt=Workload.task_name(item.task), input_ids=item.input_ids, sampling=params,
                       request_id=request_id)

    def generate(self, items: list[WorkItem]) -> list[list[int]]:
        misses = self.engine.prefix_cache.stats.misses
        outs = self.engine.generate([self.request(it) for it in items])
        self.prefix_misses.append(self.engine.prefix_cache.stats.misses - misses)
        return [o.token_ids for o in outs]

    def warmup(self) -> None:
        self.generate(self.workload.items[:2])

    def info(self) -> dict:
        pool = self.engine.pool
        return {"backend": self.backend, "kv_pool_blocks": pool.num_blocks, "block_size": pool.block_size,
                "max_batched_tokens": self.workload.config.max_batched_tokens}
