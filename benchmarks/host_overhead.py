"""Host time of a decode step: what the engine's Python does around the device work (scheduling, a CUDA-graph
step's metadata, sampling's bookkeeping, outputs) for B sequences decoding at once. On a GPU a W1 decode step's
device work is about a millisecond, and the host's part adds to it (each step waits for its sampled tokens), so
this is measured here, on the CPU, with the model's device work stubbed out: the padded decode step of
engine/decode_graphs.py returns a fixed tensor and the model is a 1-layer toy (its greedy head is the only
compute left, a 512-word head).

Two variants alternate in the same run, on the same sequences: the engine as it is (a step that continues the last
one updates the graph step's metadata in place) and the baseline that fills every step's metadata anew (and packs
every sequence's slice). `--outputs every` goes through `Engine.step` (an output for every request each step, as a
server streams); `--outputs finished` through what `Engine.generate` runs (outputs of finished requests only).

    python -m benchmarks.host_overhead [--batch 256] [--steps 40] [--outputs every|finished] [--out FILE.json]
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
MAX_POSITIONS = 512


PARTS = ("schedule", "model inputs", "  of which graph-step metadata", "sample")
VARIANTS = ("in-place metadata", "metadata filled anew")


def _timed(totals: list[dict[str, float]], key: str, fn: Callable) -> Callable:
    """fn, its time added to totals[0][key] (totals[0] is the variant being timed)."""
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        totals[0][key] += time.perf_counter() - start
        return result
    return wrapper


def measure(batch: int, steps: int, workdir: Path, every_output: bool = True, rounds: int = 4) -> dict[str, Any]:
    """`steps` timed decode steps of each variant, alternating in `rounds` runs of steps // rounds."""
    build_tiny_checkpoint("llama", workdir, hidden_size=HIDDEN, num_layers=1, num_heads=4, num_kv_heads=2,
                          vocab_size=512, max_positions=MAX_POSITIONS, with_tokenizer=False)
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
    rounds = max(1, min(rounds, steps))
    for i in range(batch):
        n = int(torch.randint(64, 257, (1,), generator=gen))
        ids = torch.randint(4, 512, (n,), generator=gen).tolist()
        params = SamplingParams(max_new_tokens=MAX_POSITIONS - PROMPT_LEN - 256, ignore_eos=True)  # never ends
        engine.add_request(Request(prompt=f"task{i % TASKS}", input_ids=ids, sampling=params))
    while engine.scheduler.waiting or any(s.num_computed < s.num_tokens - 1 for s in engine.scheduler.running):
        engine.step()  # prefill (eager, the toy model's real compute) until every sequence decodes
    step = engine.step if every_output else (lambda: engine._step(every_output=False))
    totals = {name: defaultdict(float) for name in VARIANTS}
    current = [totals[VARIANTS[0]]]
    engine.scheduler.schedule = _timed(current, "schedule", engine.scheduler.schedule)
    runner.hidden = _timed(current, "model inputs", runner.hidden)
    for name in ("_fill", "_fill_next", "continues"):
        setattr(graphs, name, _timed(current, PARTS[2], getattr(graphs, name)))
    runner.sample = _timed(current, "sample", runner.sample)
    continues = graphs.continues
    step_times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for r in range(rounds):
        for name in VARIANTS:
            graphs.continues = continues if name == VARIANTS[0] else (lambda seqs, num_tokens: False)
            current[0] = defaultdict(float)
            step()  # untimed: the first step after a switch fills anew in both variants
            current[0] = totals[name]
            for _ in range(steps // rounds + (r < steps % rounds)):
                start = time.perf_counter()
                step()
                step_times[name].append(time.perf_counter() - start)
    assert len(engine.scheduler.running) == batch and graphs.incremental_fills >= steps
    result: dict[str, Any] = {"batch": batch, "steps": steps, "outputs": "every" if every_output else "finished"}
    for name in VARIANTS:
        times = sorted(step_times[name])
        total = sum(times)
        parts = {k: totals[name][k] / steps for k in PARTS}
        parts["outputs and the rest"] = (total - sum(totals[name][k] for k in PARTS if k != PARTS[2])) / steps
        result[name] = {"step_s_mean": total / steps, "step_s_median": times[steps // 2], "parts_s": parts}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.host_overhead", description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256, help="sequences decoding at once (default 256)")
    parser.add_argument("--steps", type=int, default=40, help="decode steps timed (default 40)")
    parser.add_argument("--outputs", choices=("every", "finished"), default="every",
                        help="every: Engine.step (the default); finished: what Engine.generate runs")
    parser.add_argument("--out", type=Path, default=None, help="write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.batch < 1 or not 1 <= args.steps <= 100:
        print("error: --batch must be >= 1 and --steps in [1, 100]", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(args.batch, args.steps, Path(tmp), every_output=args.outputs == "every")
    what = "every request's output each step" if args.outputs == "every" else "outputs of finished requests only"
    print(f"host time per decode step, {args.batch} sequences, {what} "
          f"({device_name('cpu')}, 1 thread; the variants alternate in this run):")
    for name in VARIANTS:
        r = result[name]
        print(f"{name}: mean {r['step_s_mean'] * 1e3:.2f} ms, median {r['step_s_median'] * 1e3:.2f} ms")
        for key, value in r["parts_s"].items():
            print(f"  {key:<40} {value * 1e3:6.2f} ms")
    ratio = result[VARIANTS[1]]["step_s_median"] / result[VARIANTS[0]]["step_s_median"]
    print(f"{VARIANTS[0]} vs {VARIANTS[1]}: {ratio:.2f}x less host time per step (medians)")
    if args.out is not None:
        result.update(device=device_name("cpu"), git_commit=git_commit(),
                      command=" ".join(["python -m benchmarks.host_overhead", *(argv or sys.argv[1:])]))
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
