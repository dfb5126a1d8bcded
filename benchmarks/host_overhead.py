"""Host time of a decode step: what the engine's Python does around the device work (scheduling, a CUDA-graph
step's metadata, sampling's bookkeeping, outputs) for B sequences decoding at once. On a GPU a W1 decode step's
device work is about a millisecond, and the host's part adds to it (each step waits for its sampled tokens), so
this is measured here, on the CPU, with the model's device work stubbed out: the padded decode step of
engine/decode_graphs.py returns a fixed tensor and the model is a 1-layer toy (its greedy head is the only
compute left, a 512-word head).

    python -m benchmarks.host_overhead [--batch 256] [--steps 40] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from softprompt import Engine, Request, SamplingParams
from softprompt.engine.decode_graphs import DecodeGraphs
from softprompt.engine.testing import build_prompt_tensor, build_tiny_checkpoint

from .environment import device_name, git_commit

HIDDEN, TASKS, PROMPT_LEN = 64, 32, 20  # W1's traffic: 32 tasks x P=20, inputs 64-256, 64 new tokens


def _timed(totals: dict[str, float], key: str, fn: Callable) -> Callable:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        totals[key] += time.perf_counter() - start
        return result
    return wrapper


def measure(batch: int, steps: int, workdir: Path) -> dict[str, Any]:
    build_tiny_checkpoint("llama", workdir, hidden_size=HIDDEN, num_layers=1, num_heads=4, num_kv_heads=2,
                          vocab_size=512, max_positions=512, with_tokenizer=False)
    engine = Engine(workdir, device="cpu", dtype="float32", backend="torch", max_num_seqs=batch,
                    kv_cache_bytes=64 << 20)
    runner = engine.runner
    graphs = DecodeGraphs(runner.model, engine.pool, None, batch, torch.device("cpu"))
    stub = torch.randn(batch, HIDDEN)
    graphs._step = lambda size: stub[:size]  # the device work a graph replay would do
    runner.decode_graphs = graphs
    runner.greedy_head = None  # as on a GPU: fp32 logits and their argmax (the CPU's int8 screen is compute)
    for t in range(TASKS):
        engine.add_prompt(f"task{t}", build_prompt_tensor(HIDDEN, PROMPT_LEN, seed=t))
    gen = torch.Generator().manual_seed(0)
    for i in range(batch):
        n = int(torch.randint(64, 257, (1,), generator=gen))
        ids = torch.randint(4, 512, (n,), generator=gen).tolist()
        params = SamplingParams(max_new_tokens=200, ignore_eos=True)
        engine.add_request(Request(prompt=f"task{i % TASKS}", input_ids=ids, sampling=params))
    while engine.scheduler.waiting or any(s.num_computed < s.num_tokens - 1 for s in engine.scheduler.running):
        engine.step()  # prefill (eager, the toy model's real compute) until every sequence decodes
    totals: dict[str, float] = defaultdict(float)
    engine.scheduler.schedule = _timed(totals, "schedule", engine.scheduler.schedule)
    runner.hidden = _timed(totals, "model inputs", runner.hidden)
    graphs._fill = _timed(totals, "  of which graph-step metadata", graphs._fill)
    runner.sample = _timed(totals, "sample", runner.sample)
    graphs.replays, step_times = 0, []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        step_times.append(time.perf_counter() - start)
    assert graphs.replays == steps and len(engine.scheduler.running) == batch
    total = sum(step_times)
    parts = {k: totals[k] / steps for k in ("schedule", "model inputs", "  of which graph-step metadata", "sample")}
    parts["outputs and the rest"] = (total - totals["schedule"] - totals["model inputs"] - totals["sample"]) / steps
    step_times.sort()
    return {"batch": batch, "steps": steps, "step_s_mean": total / steps, "step_s_median": step_times[steps // 2],
            "parts_s": parts}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.host_overhead", description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256, help="sequences decoding at once (default 256)")
    parser.add_argument("--steps", type=int, default=40, help="decode steps timed (default 40)")
    parser.add_argument("--out", type=Path, default=None, help="write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.batch < 1 or not 1 <= args.steps <= 100:
        print("error: --batch must be >= 1 and --steps in [1, 100]", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(args.batch, args.steps, Path(tmp))
    print(f"host time per decode step, {args.batch} sequences: mean {result['step_s_mean'] * 1e3:.2f} ms, "
          f"median {result['step_s_median'] * 1e3:.2f} ms ({device_name('cpu')}, 1 thread)")
    for key, value in result["parts_s"].items():
        print(f"  {key:<40} {value * 1e3:6.2f} ms")
    if args.out is not None:
        result.update(device=device_name("cpu"), git_commit=git_commit(),
                      command=" ".join(["python -m benchmarks.host_overhead", *(argv or sys.argv[1:])]))
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
