"""One sampled token: the engine's draw (engine/sampling.py: the CDF inverted at one uniform) against
torch.multinomial (what the engine used before, and what HF's sampling calls), in the same run on the same
probabilities and generators, alternating; both are exact draws from the same distribution.

    python -m benchmarks.sampling [--vocab 32000 128256] [--draws 400] [--device cpu] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from softprompt.engine.sampling import draw

from .environment import device_name, environment


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


def measure(vocabs: list[int], draws: int, device: torch.device) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for vocab in vocabs:
        gen = torch.Generator(device=device).manual_seed(0)
        probs = torch.softmax(torch.randn(vocab, generator=gen, device=device) * 3, dim=-1)
        multinomial = lambda: int(torch.multinomial(probs, 1, generator=gen))  # noqa: E731
        engine_draw = lambda: draw(probs, gen)  # noqa: E731
        multinomial(), engine_draw()  # warm-up
        times = {"draw": _time(engine_draw, draws, device), "torch.multinomial": _time(multinomial, draws, device)}
        out[str(vocab)] = {**{f"{k}_us": v for k, v in times.items()},
                           "speedup": times["torch.multinomial"] / times["draw"]}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sampling", description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256], help="vocabulary sizes")
    parser.add_argument("--draws", type=int, default=400, help="draws per timed round (400)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None, help="write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.draws < 1 or min(args.vocab) < 2:
        print("error: --draws must be >= 1 and each --vocab >= 2", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    result = {"draws": args.draws, "vocabs": measure(args.vocab, args.draws, device)}
    print(f"one sampled token ({device_name(args.device)}, best of 3 x {args.draws} draws):")
    for vocab, r in result["vocabs"].items():
        print(f"  vocab {vocab:>6}: draw {r['draw_us']:8.1f} us   torch.multinomial {r['torch.multinomial_us']:8.1f} us"
              f"   ({r['speedup']:.1f}x)")
    if args.out is not None:
        command = " ".join(["python -m benchmarks.sampling", *(sys.argv[1:] if argv is None else argv)])
        result["environment"] = environment(args.device, command)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
