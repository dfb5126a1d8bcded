"""Requests that begin with their task's shared instruction (few-shot examples, a system prompt): the engine with the
request-block cache (engine/block_cache.py) against the same engine without it, in the same run on the same
requests, both with their task prefixes already computed. The two variants alternate; each run starts with an
empty block cache, so a task's first requests compute its instruction and the later ones find it.

    python -m benchmarks.shared_instruction [--instruction 192] [--requests 64] [--tasks 16] [--out FILE.json]

C1's model (Llama shape, h256, 4 layers, 4/2 heads, vocab 32000, fp32, CPU) and soft prompts (P=64); each input
is its task's instruction followed by 16-64 tokens of its own; 16 new tokens each, greedy.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from softprompt import Engine, Request, SamplingParams
from softprompt.testing import build_prompt_tensor, build_tiny_checkpoint

from .environment import device_name, environment

PROMPT_LEN, NEW_TOKENS, VOCAB = 64, 16, 32000


def build_model(workdir: Path) -> Path:
    return build_tiny_checkpoint("llama", workdir / "model", hidden_size=256, num_layers=4, num_heads=4,
                                 num_kv_heads=2, intermediate_size=688, vocab_size=VOCAB, max_positions=512,
                                 with_tokenizer=False)


def make_requests(tasks: int, requests: int, instruction: int, seed: int = 0) -> list[tuple[str, list[int]]]:
    """(task, input ids) in arrival order, the tasks taken in turn."""
    rng = random.Random(seed)
    shared = [[rng.randrange(4, VOCAB) for _ in range(instruction)] for _ in range(tasks)]
    return [(f"task{i % tasks}", shared[i % tasks] + [rng.randrange(4, VOCAB) for _ in range(rng.randint(16, 64))])
            for i in range(requests)]


def build_engine(model_dir: Path, tasks: int, cache: bool) -> Engine:
    engine = Engine(model_dir, device="cpu", dtype="float32", backend="torch", enable_prefix_caching=cache)
    for t in range(tasks):
        engine.add_prompt(f"task{t}", build_prompt_tensor(256, PROMPT_LEN, seed=t), precompute=True)
    return engine


def run(engine: Engine, requests: list[tuple[str, list[int]]]) -> tuple[float, list[list[int]]]:
    if engine.block_cache is not None:
        engine.block_cache.clear()
    params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    start = time.perf_counter()
    outs = engine.generate([Request(prompt=task, input_ids=ids, sampling=params) for task, ids in requests])
    return time.perf_counter() - start, [o.token_ids for o in outs]


def measure(model_dir: Path, tasks: int, requests: int, instruction: int, rounds: int = 3) -> dict[str, Any]:
    work = make_requests(tasks, requests, instruction)
    engines = {"block cache": build_engine(model_dir, tasks, True), "no block cache": build_engine(model_dir, tasks,
                                                                                                      False)}
    for engine in engines.values():  # warm-up (also the first call's one-off costs)
        run(engine, work[:2])
    best: dict[str, float] = {}
    tokens: dict[str, list[list[int]]] = {}
    cache = engines["block cache"].block_cache
    for _ in range(rounds):
        for name, engine in engines.items():
            hits_before = cache.stats.hit_tokens
            seconds, tokens[name] = run(engine, work)
            best[name] = min(best.get(name, seconds), seconds)
            if engine is engines["block cache"]:
                hit_tokens = cache.stats.hit_tokens - hits_before
    same = tokens["block cache"] == tokens["no block cache"]
    input_tokens = sum(len(ids) for _, ids in work)
    result: dict[str, Any] = {
        "tasks": tasks, "requests": requests, "instruction_tokens": instruction, "prompt_len": PROMPT_LEN,
        "new_tokens": NEW_TOKENS, "input_tokens": input_tokens, "hit_tokens_per_run": hit_tokens,
        "identical_tokens": same, "rounds": rounds,
    }
    for name, seconds in best.items():
        result[name] = {"best_s": seconds, "output_tok_s": requests * NEW_TOKENS / seconds,
                        "total_tok_s": (input_tokens + requests * NEW_TOKENS) / seconds}
    result["speedup"] = best["no block cache"] / best["block cache"]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.shared_instruction",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--instruction", type=int, default=192, help="tokens of each task's instruction (192)")
    parser.add_argument("--requests", type=int, default=64, help="requests (64)")
    parser.add_argument("--tasks", type=int, default=16, help="tasks, each with its soft prompt and instruction (16)")
    parser.add_argument("--rounds", type=int, default=3, help="timed runs of each variant, alternating (3)")
    parser.add_argument("--out", type=Path, default=None, help="write the figures to this JSON file")
    args = parser.parse_args(argv)
    if min(args.instruction, args.requests, args.tasks, args.rounds) < 1:
        print("error: --instruction, --requests, --tasks and --rounds must be >= 1", file=sys.stderr)
        return 2
    if PROMPT_LEN + args.instruction + 64 + NEW_TOKENS > 512:
        print(f"error: --instruction must be at most {512 - PROMPT_LEN - 64 - NEW_TOKENS} (512 positions)",
              file=sys.stderr)
        return 2
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(build_model(Path(tmp)), args.tasks, args.requests, args.instruction, args.rounds)
    print(f"{args.requests} requests over {args.tasks} tasks (P={PROMPT_LEN}), each a {args.instruction}-token "
          f"instruction of its task + 16-64 own tokens, {NEW_TOKENS} new tokens ({device_name('cpu')}, fp32, best "
          f"of {args.rounds}, the variants alternate in this run):")
    for name in ("block cache", "no block cache"):
        r = result[name]
        print(f"  {name:<15} {r['best_s']:7.3f} s  {r['output_tok_s']:8.1f} output tok/s  "
              f"{r['total_tok_s']:9.1f} total tok/s")
    print(f"  {result['speedup']:.2f}x; {result['hit_tokens_per_run']} of {result['input_tokens']} input tokens "
          f"found cached per run; identical tokens: {result['identical_tokens']}")
    if args.out is not None:
        command = " ".join(["python -m benchmarks.shared_instruction", *(sys.argv[1:] if argv is None else argv)])
        result["environment"] = environment("cpu", command)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["identical_tokens"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
