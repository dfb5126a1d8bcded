"""What a structured output costs (engine/structured.py, xgrammar): the same requests with a JSON schema and
without, in the same run, alternating. The unconstrained run generates exactly as many tokens per request as the
constrained one did (ignore_eos, max_new_tokens set to that count), so both do the same model work and the
difference is the masks: each guided row's xgrammar matcher following its tokens and filling its bitmask, every step.

    python -m benchmarks.structured [--requests 64] [--tasks 16] [--out FILE.json]

C1's model shape (Llama, h256, 4 layers, 4/2 heads, fp32, CPU) and soft prompts (P=64), with a 32000-token
byte-level BPE tokenizer trained here on the Python sources of the installed transformers and torch (no download;
a code-and-text vocabulary like a real model's, so xgrammar's masks have a realistic vocabulary to cover).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from softprompt import Engine, Request, SamplingParams
from softprompt.engine import sampling
from softprompt.testing import build_prompt_tensor, build_tiny_checkpoint, build_tokenizer

from .environment import device_name, write_results
from .shared_instruction import PROMPT_LEN, VOCAB

NEW_TOKENS = 64
SCHEMA = {
    "type": "object",
    "properties": {
        "sentiment": {"enum": ["positive", "negative", "neutral"]},
        "confident": {"type": "boolean"},
        "topics": {"type": "array", "items": {"enum": ["price", "quality", "service", "delivery"]}, "maxItems": 3},
    },
    "required": ["sentiment", "confident", "topics"],
}
REVIEWS = ["the delivery was late but the product works", "great value for the price", "support never answered",
           "it broke after two days of use", "exactly what the description promised"]


def _sources(limit: int = 30_000_000) -> Iterator[str]:
    """Python sources of the installed transformers and torch (sorted, so the same versions train the same)."""
    root = Path(torch.__file__).parent.parent
    seen = 0
    for path in sorted(p for pkg in ("transformers", "torch") for p in (root / pkg).rglob("*.py")):
        text = path.read_text(errors="ignore")
        seen += len(text)
        yield text
        if seen > limit:
            return


def build_model(workdir: Path) -> Path:
    model = build_tiny_checkpoint("llama", workdir / "model", hidden_size=256, num_layers=4, num_heads=4,
                                  num_kv_heads=2, intermediate_size=688, vocab_size=VOCAB, max_positions=512,
                                  with_tokenizer=False)
    build_tokenizer(model, vocab_size=VOCAB, corpus=_sources())
    return model


class MaskTimer:
    """Wall time spent in the guided rows' masks (engine/structured.py's apply_guides, as sampling.py calls it),
    and its calls and rows."""

    def __init__(self):
        self.seconds, self.calls, self.rows = 0.0, 0, 0
        self._apply = sampling.apply_guides

    def __enter__(self) -> MaskTimer:
        def timed(logits, guides, histories):
            start = time.perf_counter()
            self._apply(logits, guides, histories)
            self.seconds += time.perf_counter() - start
            self.calls += 1
            self.rows += len(guides)

        sampling.apply_guides = timed
        return self

    def __exit__(self, *exc) -> None:
        sampling.apply_guides = self._apply


def measure(model_dir: Path, tasks: int, requests: int, rounds: int = 3) -> dict[str, Any]:
    engine = Engine(model_dir, device="cpu", dtype="float32", backend="torch")
    for t in range(tasks):
        engine.add_prompt(f"task{t}", build_prompt_tensor(256, PROMPT_LEN, seed=t), precompute=True)
    start = time.perf_counter()
    engine.structured_outputs.compile("json", json.dumps(SCHEMA), False)
    compile_s = time.perf_counter() - start

    def guided(i: int) -> Request:
        return Request(prompt=f"task{i % tasks}", text=f"review: {REVIEWS[i % len(REVIEWS)]} #{i}\njson:",
                       sampling=SamplingParams(max_new_tokens=NEW_TOKENS, temperature=1.0, seed=i, guided_json=SCHEMA,
                                               disable_any_whitespace=True))

    def run(reqs: list[Request]) -> tuple[float, list]:
        engine.block_cache.clear()
        start = time.perf_counter()
        outs = engine.generate(reqs)
        return time.perf_counter() - start, outs

    run([guided(0)])  # warm-up
    constrained = [guided(i) for i in range(requests)]
    _, outs = run(constrained)
    counts = [len(o.token_ids) for o in outs]
    free = [Request(prompt=r.prompt, text=r.text, sampling=SamplingParams(max_new_tokens=n, temperature=1.0, seed=i,
                                                                          ignore_eos=True))
            for i, (r, n) in enumerate(zip(constrained, counts))]
    best = {"json schema": float("inf"), "unconstrained": float("inf")}
    timer = MaskTimer()
    for _ in range(rounds):
        with timer:
            seconds, outs = run(constrained)
        best["json schema"] = min(best["json schema"], seconds)
        assert [len(o.token_ids) for o in outs] == counts  # seeded: the same tokens each round
        seconds, free_outs = run(free)
        best["unconstrained"] = min(best["unconstrained"], seconds)
        assert [len(o.token_ids) for o in free_outs] == counts
    valid = 0
    for out in outs:
        try:
            value = json.loads(out.text)
            valid += set(value) == set(SCHEMA["required"]) and value["sentiment"] in ("positive", "negative", "neutral")
        except ValueError:
            pass
    generated = sum(counts)
    result: dict[str, Any] = {
        "tasks": tasks, "requests": requests, "prompt_len": PROMPT_LEN, "vocab": VOCAB, "max_new_tokens": NEW_TOKENS,
        "generated_tokens": generated, "stopped_at_eos": sum(o.finish_reason == "stop" for o in outs),
        "valid_json": valid, "schema_compile_s": compile_s, "rounds": rounds,
        "mask_s_per_run": timer.seconds / rounds, "mask_us_per_row": 1e6 * timer.seconds / max(timer.rows, 1),
        "mask_calls_per_run": timer.calls // rounds,
    }
    for name, seconds in best.items():
        result[name] = {"best_s": seconds, "output_tok_s": generated / seconds}
    result["overhead"] = best["json schema"] / best["unconstrained"] - 1
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.structured", description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64, help="requests (64)")
    parser.add_argument("--tasks", type=int, default=16, help="tasks, each with its soft prompt (16)")
    parser.add_argument("--rounds", type=int, default=3, help="timed runs of each variant, alternating (3)")
    parser.add_argument("--out", type=Path, default=None, help="write the figures to this JSON file")
    args = parser.parse_args(argv)
    if min(args.requests, args.tasks, args.rounds) < 1:
        print("error: --requests, --tasks and --rounds must be >= 1", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(build_model(Path(tmp)), args.tasks, args.requests, args.rounds)
    print(f"{args.requests} requests over {args.tasks} tasks (P={PROMPT_LEN}), a JSON schema each (compact), sampled, "
          f"vocabulary {VOCAB} ({device_name('cpu')}, fp32, best of {args.rounds}, alternating):")
    for name in ("json schema", "unconstrained"):
        r = result[name]
        print(f"  {name:<14} {r['best_s']:7.3f} s  {r['output_tok_s']:8.1f} output tok/s")
    print(f"  {result['generated_tokens']} tokens each; overhead {100 * result['overhead']:.1f}%; masks "
          f"{result['mask_s_per_run']:.3f} s a run ({result['mask_us_per_row']:.0f} us a guided row a step, "
          f"{result['mask_calls_per_run']} steps); schema compiled in {1e3 * result['schema_compile_s']:.0f} ms; "
          f"{result['valid_json']} of {args.requests} outputs are valid JSON of the schema "
          f"({result['stopped_at_eos']} ended at EOS)")
    if args.out is not None:
        write_results(args.out, result, "cpu", "structured", argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
