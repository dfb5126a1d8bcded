"""Requests that begin with their task's shared instruction (few-shot examples, a system prompt): the engine with the
request-block cache (engine/block_cache.py) against the same engine with the cache but no in-batch sharing (a
request never waits for a block another one is computing) and without the cache, in the same run on the same
requests, all with their task prefixes already computed. The variants alternate; each run starts with an empty
block cache, so a task's first requests compute its instruction and the later ones find it.

    python -m benchmarks.shared_instruction [--instruction 192] [--requests 64] [--tasks 16] [--samples 1]
                                            [--out FILE.json]

C1's model (Llama shape, h256, 4 layers, 4/2 heads, vocab 32000, fp32, CPU) and soft prompts (P=64); each input
is its task's instruction followed by 16-64 tokens of its own; 16 new tokens each, greedy. `--samples N` sends
each input N times, one after the other, sampled (temperature 1, a seed each): OpenAI's `n`.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from softprompt import Engine, Request, SamplingParams
from softprompt.engine.scheduler import SchedulerConfig
from softprompt.testing import build_prompt_tensor, build_tiny_checkpoint

from .environment import device_name, write_results

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


VARIANTS = ("block cache", "no in-batch sharing", "no block cache")


def build_engine(model_dir: Path, tasks: int, variant: str) -> Engine:
    engine = Engine(model_dir, device="cpu", dtype="float32", backend="torch",
                    enable_prefix_caching=variant != "no block cache")
    if variant == "no in-batch sharing":
        engine.scheduler.config = SchedulerConfig(engine.scheduler.config.max_num_seqs,
                                                  engine.scheduler.config.max_batched_tokens,
                                                  share_in_flight_blocks=False)
    for t in range(tasks):
        engine.add_prompt(f"task{t}", build_prompt_tensor(256, PROMPT_LEN, seed=t), precompute=True)
    return engine


def run(engine: Engine, requests: list[tuple[str, list[int]]], samples: int) -> tuple[float, list[list[int]], int]:
    """Seconds, tokens and input tokens found cached, for one run from an empty block cache."""
    cache = engine.block_cache
    if cache is not None:
        cache.clear()
    hits_before = 0 if cache is None else cache.stats.hit_tokens
    if samples == 1:
        params = [SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)]
    else:
        params = [SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True, temperature=1.0, seed=s)
                  for s in range(samples)]
    start = time.perf_counter()
    outs = engine.generate([Request(prompt=task, input_ids=ids, sampling=p) for task, ids in requests for p in params])
    seconds = time.perf_counter() - start
    return seconds, [o.token_ids for o in outs], 0 if cache is None else cache.stats.hit_tokens - hits_before


def measure(model_dir: Path, tasks: int, requests: int, instruction: int, samples: int = 1,
            rounds: int = 3) -> dict[str, Any]:
    work = make_requests(tasks, requests, instruction)
    engines = {name: build_engine(model_dir, tasks, name) for name in VARIANTS}
    for engine in engines.values():  # warm-up (also the first call's one-off costs)
        run(engine, work[:2], samples)
    best: dict[str, float] = {}
    tokens: dict[str, list[list[int]]] = {}
    hits: dict[str, int] = {}
    for _ in range(rounds):
        for name, engine in engines.items():
            seconds, tokens[name], hits[name] = run(engine, work, samples)
            best[name] = min(best.get(name, seconds), seconds)
    # greedy: every token must agree; sampled: a draw within the last bits' rounding of a boundary may not (the
    # fp32 logits of a row can differ in their last bits with the batch's layout), so the agreement is reported
    agree = sum(all(tokens[name][i] == tokens["no block cache"][i] for name in VARIANTS)
                for i in range(len(tokens["no block cache"])))
    same = agree == len(tokens["no block cache"])
    input_tokens = samples * sum(len(ids) for _, ids in work)
    result: dict[str, Any] = {
        "tasks": tasks, "requests": requests * samples, "inputs": requests, "samples": samples,
        "instruction_tokens": instruction, "prompt_len": PROMPT_LEN, "new_tokens": NEW_TOKENS,
        "input_tokens": input_tokens, "identical_tokens": same, "requests_with_identical_tokens": agree,
        "rounds": rounds,
    }
    for name, seconds in best.items():
        result[name] = {"best_s": seconds, "output_tok_s": requests * samples * NEW_TOKENS / seconds,
                        "total_tok_s": (input_tokens + requests * samples * NEW_TOKENS) / seconds,
                        "hit_tokens_per_run": hits[name]}
    result["speedup"] = best["no block cache"] / best["block cache"]
    result["speedup_over_no_in_batch_sharing"] = best["no in-batch sharing"] / best["block cache"]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.shared_instruction",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--instruction", type=int, default=192, help="tokens of each task's instruction (192)")
    parser.add_argument("--requests", type=int, default=64, help="requests (64)")
    parser.add_argument("--tasks", type=int, default=16, help="tasks, each with its soft prompt and instruction (16)")
    parser.add_argument("--samples", type=int, default=1, help="sampled copies of each input sent in a row (1)")
    parser.add_argument("--rounds", type=int, default=3, help="timed runs of each variant, alternating (3)")
    parser.add_argument("--out", type=Path, default=None, help="write the figures to this JSON file")
    args = parser.parse_args(argv)
    if min(args.instruction, args.requests, args.tasks, args.samples, args.rounds) < 1:
        print("error: --instruction, --requests, --tasks, --samples and --rounds must be >= 1", file=sys.stderr)
        return 2
    if PROMPT_LEN + args.instruction + 64 + NEW_TOKENS > 512:
        print(f"error: --instruction must be at most {512 - PROMPT_LEN - 64 - NEW_TOKENS} (512 positions)",
              file=sys.stderr)
        return 2
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(build_model(Path(tmp)), args.tasks, args.requests, args.instruction, args.samples,
                         args.rounds)
    copies = "" if args.samples == 1 else f" x {args.samples} samples"
    print(f"{args.requests} inputs{copies} over {args.tasks} tasks (P={PROMPT_LEN}), each a {args.instruction}-token "
          f"instruction of its task + 16-64 own tokens, {NEW_TOKENS} new tokens ({device_name('cpu')}, fp32, best "
          f"of {args.rounds}, the variants alternate in this run):")
    for name in VARIANTS:
        r = result[name]
        print(f"  {name:<19} {r['best_s']:7.3f} s  {r['output_tok_s']:8.1f} output tok/s  "
              f"{r['total_tok_s']:9.1f} total tok/s  {r['hit_tokens_per_run']:6d} of {result['input_tokens']} input "
              "tokens found cached")
    print(f"  {result['speedup']:.2f}x over no block cache, {result['speedup_over_no_in_batch_sharing']:.2f}x over "
          f"no in-batch sharing; {result['requests_with_identical_tokens']} of {result['requests']} requests have "
          "identical tokens in every variant")
    if args.out is not None:
        write_results(args.out, result, "cpu", "shared_instruction", argv)
    return 0 if result["identical_tokens"] or args.samples > 1 else 1  # (sampled: see measure)


if __name__ == "__main__":
    raise SystemExit(main())
