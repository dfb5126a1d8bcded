"""Beam search (Engine.beam_search) against HF + PEFT `generate(num_beams=k)`, one request at a time as PEFT runs a
prompt-tuned model, in the same run: the same requests, the hypotheses checked equal, the best of a few timed runs.

    python -m benchmarks.beam_search [--requests 16] [--tasks 4] [--beams 4] [--new-tokens 16] [--out FILE.json]

C1's model shape (Llama, h256, 4 layers, 4/2 heads, vocabulary 32000, fp32, CPU) and PEFT prompt-tuning adapters
(P=64), random weights; inputs of 16 to 64 tokens.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from softprompt import BeamSearchParams, Engine, Request
from softprompt.testing import build_prompt_tuning_adapter, build_tiny_checkpoint

from .environment import device_name, write_results

PROMPT_LEN, VOCAB = 64, 32000


def build(workdir: Path, tasks: int) -> tuple[Path, list[Path]]:
    model = build_tiny_checkpoint("llama", workdir / "model", hidden_size=256, num_layers=4, num_heads=4,
                                  num_kv_heads=2, vocab_size=VOCAB, max_positions=512, with_tokenizer=False)
    adapters = [build_prompt_tuning_adapter(model, workdir / f"task{t}", num_virtual_tokens=PROMPT_LEN, seed=t)
                for t in range(tasks)]
    return model, adapters


def measure(model: Path, adapters: list[Path], requests: int, beams: int, new_tokens: int,
            rounds: int) -> dict[str, Any]:
    import peft

    from softprompt.engine.hf_auto import load_hf_causal_lm

    g = torch.Generator().manual_seed(0)
    inputs = [torch.randint(4, VOCAB, (int(n),), generator=g).tolist()
              for n in torch.randint(16, 65, (requests,), generator=g)]
    tasks = [i % len(adapters) for i in range(requests)]
    params = BeamSearchParams(beams, max_new_tokens=new_tokens)
    engine = Engine(model, device="cpu", dtype="float32")
    for t, adapter in enumerate(adapters):
        engine.add_prompt(f"task{t}", adapter)

    def run_engine() -> list[list[list[int]]]:
        outs = engine.beam_search([Request(prompt=f"task{t}", input_ids=ids) for t, ids in zip(tasks, inputs)],
                                  params)
        return [[s.token_ids for s in o.sequences] for o in outs]

    base = load_hf_causal_lm(model).eval()
    hf = peft.PeftModel.from_pretrained(base, adapters[0], adapter_name="task0").eval()
    for t, adapter in enumerate(adapters[1:], start=1):
        hf.load_adapter(adapter, adapter_name=f"task{t}")

    def run_hf() -> list[list[list[int]]]:
        found = []
        with torch.no_grad():
            for t, ids in zip(tasks, inputs):
                hf.set_adapter(f"task{t}")
                mask = torch.ones(1, len(ids), dtype=torch.long)
                out = hf.generate(input_ids=torch.tensor([ids]), attention_mask=mask, max_new_tokens=new_tokens,
                                  do_sample=False, num_beams=beams, num_return_sequences=beams, pad_token_id=3)
                found.append([seq[len(ids):].tolist() for seq in out])
        return found

    run_engine()  # warm-up: the prompts' K/V, the allocator
    best = {"engine": float("inf"), "hf_peft": float("inf")}
    results = {}
    for _ in range(rounds):
        for name, fn in (("engine", run_engine), ("hf_peft", run_hf)):
            started = time.perf_counter()
            results[name] = fn()
            best[name] = min(best[name], time.perf_counter() - started)
    same = sum(a == b for a, b in zip(results["engine"], results["hf_peft"]))
    return {"requests": requests, "tasks": len(adapters), "beam_width": beams, "new_tokens": new_tokens,
            "prompt_len": PROMPT_LEN, "rounds": rounds, "same_hypotheses": same,
            "engine_s": best["engine"], "hf_peft_s": best["hf_peft"], "speedup": best["hf_peft"] / best["engine"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.beam_search", description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=16, help="requests (16)")
    parser.add_argument("--tasks", type=int, default=4, help="tasks, each a PEFT prompt-tuning adapter (4)")
    parser.add_argument("--beams", type=int, default=4, help="beam width (4)")
    parser.add_argument("--new-tokens", type=int, default=16, help="new tokens at most (16)")
    parser.add_argument("--rounds", type=int, default=3, help="timed runs of each, alternating (3)")
    parser.add_argument("--out", type=Path, default=None, help="write the figures to this JSON file")
    args = parser.parse_args(argv)
    if min(args.requests, args.tasks, args.beams, args.new_tokens, args.rounds) < 1:
        print("error: --requests, --tasks, --beams, --new-tokens and --rounds must be >= 1", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(*build(Path(tmp), args.tasks), args.requests, args.beams, args.new_tokens, args.rounds)
    print(f"{args.requests} requests over {args.tasks} tasks (P={PROMPT_LEN}), beam width {args.beams}, "
          f"{args.new_tokens} new tokens ({device_name('cpu')}, fp32, best of {args.rounds}, alternating):")
    print(f"  engine (one batch)            {result['engine_s']:7.3f} s")
    print(f"  HF + PEFT generate, one by one {result['hf_peft_s']:7.3f} s  "
          f"({result['speedup']:.2f}x the engine's time)")
    print(f"  the same hypotheses, in order: {result['same_hypotheses']} of {args.requests} requests")
    if args.out is not None:
        write_results(args.out, result, "cpu", "beam_search", argv)
    return 0 if result["same_hypotheses"] == args.requests else 1


if __name__ == "__main__":
    raise SystemExit(main())
