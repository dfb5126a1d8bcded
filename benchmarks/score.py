"""Scoring labels after contexts (`Engine.score`, `softprompt eval --mode score`): engine/scoring.py, which computes
each context once and runs the LM head only on the rows that predict a label token, against the way it scored
before (one packed pass over every context + label, logits at every row: `Engine.sequence_logits`), in the same
run on the same items; both must give the same log-likelihoods (fp32, 1e-4).

    python -m benchmarks.score [--contexts 64] [--labels 4] [--context-tokens 128] [--out FILE.json]

C1's model (Llama shape, h256, 4 layers, 4/2 heads, vocab 32000, fp32, CPU) and soft prompts (P=64, 16 tasks).
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

from softprompt import Engine
from softprompt.engine.scoring import score_continuations
from softprompt.testing import build_prompt_tensor

from .environment import device_name, write_results
from .shared_instruction import PROMPT_LEN, VOCAB, build_model

TASKS = 16


def make_items(engine: Engine, contexts: int, labels: int, context_tokens: int, seed: int = 0) -> list[tuple]:
    rng = random.Random(seed)
    label_ids = [[rng.randrange(4, VOCAB) for _ in range(rng.randint(1, 3))] for _ in range(labels)]
    return [(engine.prompts.get(f"task{i % TASKS}"),
             [rng.randrange(4, VOCAB) for _ in range(rng.randint(context_tokens // 2, context_tokens * 3 // 2))],
             label_ids) for i in range(contexts)]


def full_logits(engine: Engine, items: list[tuple]) -> list[list[float]]:
    """The way before: every context + label in one packed pass, logits at every row, the label rows picked."""
    flat = [(prompt.name, ctx + c, len(ctx), c) for prompt, ctx, conts in items for c in conts]
    logits = engine.sequence_logits([(name, ids) for name, ids, _, _ in flat])
    scores = []
    for (_, _, n, c), rows in zip(flat, logits):
        lp = torch.log_softmax(rows[n - 1:n + len(c) - 1].float(), dim=-1)
        scores.append(float(lp.gather(1, torch.tensor(c)[:, None]).sum()))
    per = len(items[0][2])
    return [scores[i:i + per] for i in range(0, len(scores), per)]


def measure(model_dir: Path, contexts: int, labels: int, context_tokens: int, rounds: int = 3) -> dict[str, Any]:
    engine = Engine(model_dir, device="cpu", dtype="float32", backend="torch")
    for t in range(TASKS):
        engine.add_prompt(f"task{t}", build_prompt_tensor(256, PROMPT_LEN, seed=t), precompute=True)
    items = make_items(engine, contexts, labels, context_tokens)
    ways = {"shared context": lambda: score_continuations(engine, items),
            "every row": lambda: full_logits(engine, items)}
    for way in ways.values():
        way()  # warm-up
    best: dict[str, float] = {}
    scores: dict[str, list[list[float]]] = {}
    for _ in range(rounds):
        for name, way in ways.items():
            start = time.perf_counter()
            scores[name] = way()
            elapsed = time.perf_counter() - start
            best[name] = min(best.get(name, elapsed), elapsed)
    diff = max(abs(a - b) for x, y in zip(scores["shared context"], scores["every row"]) for a, b in zip(x, y))
    tokens = sum(len(ctx) + len(c) for _, ctx, conts in items for c in conts)
    return {"contexts": contexts, "labels": labels, "context_tokens": sum(len(ctx) for _, ctx, _ in items),
            "scored_tokens": tokens, "max_abs_diff": diff, "same": diff < 1e-4, "rounds": rounds,
            **{name: {"best_s": s} for name, s in best.items()},
            "speedup": best["every row"] / best["shared context"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.score", description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, default=64, help="contexts, the tasks taken in turn (64)")
    parser.add_argument("--labels", type=int, default=4, help="labels scored after each context, 1-3 tokens (4)")
    parser.add_argument("--context-tokens", type=int, default=128, help="mean context length (128; 0.5x-1.5x)")
    parser.add_argument("--rounds", type=int, default=3, help="timed runs of each way, alternating (3)")
    parser.add_argument("--out", type=Path, default=None, help="write the figures to this JSON file")
    args = parser.parse_args(argv)
    if min(args.contexts, args.labels, args.context_tokens, args.rounds) < 1:
        print("error: --contexts, --labels, --context-tokens and --rounds must be >= 1", file=sys.stderr)
        return 2
    if PROMPT_LEN + args.context_tokens * 3 // 2 + 3 > 512:
        print(f"error: --context-tokens must be at most {(512 - PROMPT_LEN - 3) * 2 // 3} (512 positions)",
              file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        r = measure(build_model(Path(tmp)), args.contexts, args.labels, args.context_tokens, args.rounds)
    print(f"{args.labels} labels after each of {args.contexts} contexts ({r['context_tokens']} context tokens, "
          f"16 tasks, P={PROMPT_LEN}; {device_name('cpu')}, fp32, best of {args.rounds}, alternating in this run):")
    print(f"  shared context (engine/scoring.py) {r['shared context']['best_s']:7.3f} s")
    print(f"  every row (Engine.sequence_logits) {r['every row']['best_s']:7.3f} s")
    print(f"  {r['speedup']:.2f}x; max |score diff| {r['max_abs_diff']:.2e}")
    if args.out is not None:
        write_results(args.out, r, "cpu", "score", argv)
    return 0 if r["same"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
