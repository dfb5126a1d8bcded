"""Sampled tokens: the engine's draw (engine/sampling.py: the CDF inverted at one uniform) against
torch.multinomial (what the engine used before, and what HF's sampling calls), in the same run on the same
probabilities and generators; both are exact draws from the same distribution. Then a step's worth of sampled
rows (--rows, temperature 1 and top_p 0.9 each): the engine's batched filters and draws against the way it
sampled before (row by row: a sort of the whole vocabulary for top_p, then torch.multinomial), on LM-like rows
(logits N(0, 6^2): about 1.9 nats of entropy, a 0.9-nucleus of about a dozen tokens) and on flat ones (N(0, 3^2):
about 6 nats, a nucleus of about 1500 of 32000, past the 256 candidates the engine looks among first).

    python -m benchmarks.sampling [--vocab 32000 128256] [--draws 400] [--rows 64] [--device cpu] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

from softprompt.engine.sampling import SamplingParams, draw, draw_rows, filtered_probs

from .environment import device_name, write_results


def _time(fn, draws: int, device: torch.device) -> float:
    """Microseconds a call, best of 3 rounds of `draws` calls."""
    best = float("inf")
    for _ in range(3):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(draws):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, (time.perf_counter() - start) / draws * 1e6)
    return best


def measure(vocabs: list[int], draws: int, rows: int, device: torch.device) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for vocab in vocabs:
        gen = torch.Generator(device=device).manual_seed(0)
        cpu_gen = torch.Generator().manual_seed(0)  # the engine's request generators live on the CPU
        probs = torch.softmax(torch.randn(vocab, generator=gen, device=device) * 3, dim=-1)
        multinomial = lambda: int(torch.multinomial(probs, 1, generator=gen))  # noqa: E731
        engine_draw = lambda: draw(probs, cpu_gen)  # noqa: E731
        multinomial(), engine_draw()  # warm-up
        times = {"draw": _time(engine_draw, draws, device), "torch.multinomial": _time(multinomial, draws, device)}
        out[str(vocab)] = {**{f"{k}_us": v for k, v in times.items()},
                           "speedup": times["torch.multinomial"] / times["draw"]}
        params = [SamplingParams(temperature=1.0, top_p=0.9)] * rows
        gens = [torch.Generator().manual_seed(i) for i in range(rows)]
        device_gens = [torch.Generator(device=device).manual_seed(i) for i in range(rows)]
        for kind, spread in (("lm-like", 6.0), ("flat", 3.0)):
            logits = torch.randn(rows, vocab, generator=gen, device=device) * spread

            def batched() -> list[int]:
                return draw_rows(filtered_probs(logits, params), gens)

            def before() -> list[int]:
                return [int(torch.multinomial(_top_p_sorted(torch.softmax(logits[i], dim=-1), 0.9), 1, generator=g))
                        for i, g in enumerate(device_gens)]

            batched(), before()
            step_draws = max(1, draws // rows)
            now_us, before_us = _time(batched, step_draws, device), _time(before, step_draws, device)
            out[str(vocab)][f"{rows} rows {kind}"] = {"batched_us": now_us, "before_us": before_us,
                                                      "speedup": before_us / now_us}
    return out


def _top_p_sorted(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """The engine's top_p before (one row, the whole vocabulary sorted)."""
    sorted_probs, order = torch.sort(probs, descending=True)
    before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)
    probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return probs / probs.sum()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sampling", description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256], help="vocabulary sizes")
    parser.add_argument("--draws", type=int, default=400, help="draws per timed round (400)")
    parser.add_argument("--rows", type=int, default=64, help="sampled rows in the step comparison (64)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None, help="write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.draws < 1 or args.rows < 1 or min(args.vocab) < 2:
        print("error: --draws and --rows must be >= 1 and each --vocab >= 2", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    result = {"draws": args.draws, "rows": args.rows, "vocabs": measure(args.vocab, args.draws, args.rows, device)}
    print(f"sampled tokens ({device_name(args.device)}, best of 3 rounds):")
    for vocab, r in result["vocabs"].items():
        print(f"  vocab {vocab:>6}, one token: draw {r['draw_us']:8.1f} us   torch.multinomial "
              f"{r['torch.multinomial_us']:8.1f} us   ({r['speedup']:.1f}x)")
        for kind in ("lm-like", "flat"):
            step = r[f"{args.rows} rows {kind}"]
            print(f"  vocab {vocab:>6}, {args.rows} {kind} rows, top_p 0.9: batched {step['batched_us']:9.1f} us   "
                  f"row by row as before {step['before_us']:9.1f} us   ({step['speedup']:.1f}x)")
    if args.out is not None:
        write_results(args.out, result, args.device, "sampling", argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
